"""Execution on a real local Ray: end to end through the CLI, resume after a killed driver,
a worker that dies mid-task, and idempotent reruns."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rows import assert_rows_close, table_rows
from workers import WorkerKiller

from zoospectra.demo.zoo import ZooSpec, build_zoo, lora
from zoospectra.run.store import ResultsStore

TABLES = ("matrices", "vectors", "spectra", "similarity", "pairs")


@pytest.fixture(scope="session")
def small_zoo(tmp_path_factory) -> list[Path]:
    specs = [
        lora("lora_r4", 4, 8, targets=("query", "value")),
        lora("lora_r8", 8, 16, targets=("query", "value", "intermediate.dense")),
        ZooSpec("full_ft"),
    ]
    return build_zoo(tmp_path_factory.mktemp("zoo"), specs, steps=6)


def cli(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "zoospectra.cli", *args], capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=600, **kw,
    )


def analyze_args(minilm_dir: Path, zoo: list[Path], out: Path, *extra: str) -> list[str]:
    return ["analyze", "--base", str(minilm_dir), *[f"{p.name}={p}" for p in zoo], "--out", str(out),
            "--pairs", "--batch-size", "1", *extra]


@pytest.fixture(scope="session")
def reference_run(minilm_dir, small_zoo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "results"
    proc = cli(*analyze_args(minilm_dir, small_zoo, out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_cli_end_to_end_writes_every_table(reference_run, small_zoo):
    # 2 + 3 LoRA matrices (6 layers each) + the full fine-tune's 36 linear matrices
    expected_matrices = 6 * (2 + 3) + 6 * 6
    assert len(table_rows(reference_run, "matrices")) == expected_matrices
    status = ResultsStore(reference_run).status()
    assert status["units_done"] == expected_matrices  # batch size 1: one unit per pair
    # every matrix has K_store=32 vectors per side (all these matrices have min(m, n) = 384)
    assert len(table_rows(reference_run, "vectors")) == expected_matrices * 32 * 2
    # pairs: for each query/value matrix of the 3 artifacts there are 3 pairs, intermediate 1
    assert table_rows(reference_run, "pairs") == []  # batch size 1 -> no pairs inside a unit


def test_rerun_is_idempotent(minilm_dir, small_zoo, reference_run):
    before = {t: table_rows(reference_run, t) for t in TABLES}
    proc = cli(*analyze_args(minilm_dir, small_zoo, reference_run))
    assert proc.returncode == 0, proc.stderr
    assert "0 (artifact, matrix) pairs to analyse" in proc.stderr
    assert {t: table_rows(reference_run, t) for t in TABLES} == before


def test_killed_driver_resumes_to_identical_rows(minilm_dir, small_zoo, reference_run, tmp_path):
    out = tmp_path / "results"
    proc = subprocess.Popen(
        [sys.executable, "-m", "zoospectra.cli", *analyze_args(minilm_dir, small_zoo, out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(list((out / "units").glob("*"))) < 5:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    n_partial = len(list((out / "units").glob("*")))
    assert 5 <= n_partial < 66, "the kill must land mid-run"

    resumed = cli(*analyze_args(minilm_dir, small_zoo, out))
    assert resumed.returncode == 0, resumed.stderr
    for t in TABLES:
        assert table_rows(out, t) == table_rows(reference_run, t), t


def test_worker_killed_mid_task_is_retried(minilm_dir, small_zoo, reference_run, tmp_path):
    """A Ray worker SIGKILLed from outside while it runs a unit: the task is retried elsewhere."""
    out = tmp_path / "results"
    killer = WorkerKiller()
    killer.start()
    try:
        proc = cli(*analyze_args(minilm_dir, small_zoo, out))
    finally:
        killer.stop()
    assert proc.returncode == 0, proc.stderr
    assert killer.killed is not None, "a worker must have been killed mid-task"
    assert ResultsStore(out).status()["units_done"] == 66
    for t in TABLES:
        assert table_rows(out, t) == table_rows(reference_run, t), t


def test_local_executor_matches_ray(minilm_dir, small_zoo, reference_run, tmp_path):
    out = tmp_path / "results"
    proc = cli(*analyze_args(minilm_dir, small_zoo, out, "--local"))
    assert proc.returncode == 0, proc.stderr
    for t in ("matrices", "spectra"):  # sorted row order is stable for these (keys lead)
        assert_rows_close(table_rows(out, t), table_rows(reference_run, t))
