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


def _run_and_watch(args: list[str], interrupt: bool, env: dict | None = None,
                   flags: tuple[str, ...] = ()) -> tuple[int, list, str]:
    """Start the CLI (the driver's interpreter given `flags`), wait until a worker runs a unit, note
    every process below the driver, then let it finish (or send it a Ctrl-C): its exit code, that
    process list and its stderr."""
    import tempfile

    from workers import busy_worker, descendants

    with tempfile.TemporaryFile("w+") as err:   # a file, not a pipe nobody reads while waiting
        proc = subprocess.Popen([sys.executable, *flags, "-m", "zoospectra.cli", *args], stdout=subprocess.DEVNULL,
                                stderr=err, text=True, env=env,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal
        try:
            deadline = time.time() + 300
            while busy_worker() is None and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            assert proc.poll() is None, "the run ended before a unit was seen running"
            tree = descendants(proc.pid)
            assert any(p.name() == "raylet" for p in tree), [p.name() for p in tree]
            if interrupt:
                proc.send_signal(signal.SIGINT)
            code = proc.wait(300)
        finally:
            if proc.poll() is None:
                proc.kill()
        err.seek(0)
        return code, tree, err.read()


def test_a_finished_run_leaves_no_ray_process_behind(minilm_dir, small_zoo, tmp_path):
    """The CLI leaves without the interpreter's teardown once a run is over (cli.main): Ray must
    be shut down by then, agents included (a bare exit would leave the raylet's dashboard and
    runtime-env agents running for a minute or more).

    The driver plans from headers and hands every matrix to Ray workers: it never imports torch
    (2-3 s of CPU that would compete with Ray's start on a small machine). `-X importtime` lists
    the driver's imports only (Ray starts its workers without the flag)."""
    from workers import still_running

    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}   # Ray's default: token auth
    code, tree, err = _run_and_watch(analyze_args(minilm_dir, small_zoo, tmp_path / "results"), interrupt=False,
                                     env=env, flags=("-X", "importtime"))
    assert code == 0, err
    assert still_running(tree) == []
    imported = {line.rsplit("|", 1)[1].strip() for line in err.splitlines() if line.startswith("import time:")}
    assert {"ray", "zoospectra.run.plan", "zoospectra.adapters.peft_adapter", "zoospectra.adapters.full"} <= imported
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}
    err = "\n".join(line for line in err.splitlines() if not line.startswith("import time:"))
    # Ray's notice that it protects the new local cluster with a token is not the user's business
    assert "Token authentication" not in err, err


def test_ctrl_c_mid_unit_leaves_no_ray_process_behind(minilm_dir, small_zoo, tmp_path):
    """Ctrl-C while a worker runs a unit: exit 130, and nothing the run started outlives it. Ray
    starts its GCS and raylet fate-sharing with the driver, but not the raylet's dashboard and
    runtime-env agents nor its workers; the CLI stops them itself (cli._kill_descendants)."""
    from workers import still_running

    code, tree, _ = _run_and_watch(analyze_args(minilm_dir, small_zoo, tmp_path / "results"), interrupt=True)
    assert code == 130
    assert still_running(tree) == []


def test_local_executor_runs_units_side_by_side_each_after_its_base(minilm_dir, small_zoo, reference_run,
                                                                   tmp_path, monkeypatch):
    """--local on the CPU: units on one thread per core; a tensor's units start only once its
    base decomposition is done; the rows equal the Ray run's."""
    import threading

    import torch

    import zoospectra
    from zoospectra.run import execute

    log: list[tuple[str, str, str, float, float]] = []
    real_unit, real_base = execute.process_unit, execute.prepare_base

    def spy(kind, real):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            out = real(*args, **kwargs)
            tensor = args[0].tensor if kind == "unit" else args[1]
            log.append((kind, tensor, threading.current_thread().name, t0, time.perf_counter()))
            return out
        return run

    monkeypatch.setattr(execute, "process_unit", spy("unit", real_unit))
    monkeypatch.setattr(execute, "prepare_base", spy("base", real_base))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = tmp_path / "results"
        summary = zoospectra.analyze({p.name: p for p in small_zoo}, base=minilm_dir, out=out,
                                     executor="local", batch_size=1, config=zoospectra.AnalysisConfig(pairs=True))
    finally:
        torch.set_num_threads(threads)
    assert summary.n_done == 66 and summary.n_failed == 0
    assert torch.get_num_threads() == threads  # restored after the run
    units = [e for e in log if e[0] == "unit"]
    assert len({name for _, _, name, _, _ in units}) == 2, "units ran on two threads"
    base_end = {tensor: end for kind, tensor, _, _, end in log if kind == "base"}
    assert base_end, "tensors with several units get a base task"
    for _, tensor, _, start, _ in units:
        if tensor in base_end:
            assert start >= base_end[tensor], tensor
    for t in ("matrices", "spectra"):
        assert_rows_close(table_rows(out, t), table_rows(reference_run, t))


def test_ray_starts_during_planning_only_when_there_is_new_work(minilm_dir, small_zoo, reference_run, tmp_path):
    """api.analyze starts Ray while it plans when an artifact has nothing committed yet; a rerun
    of finished work starts no Ray at all; a planning error is raised as such, Ray or not."""
    script = """
import sys, ray, zoospectra
from zoospectra.errors import ConfigError
zoo = {p.split('/')[-1]: p for p in sys.argv[3:]}
cfg = zoospectra.AnalysisConfig(pairs=True)
run = zoospectra.analyze(zoo, base=sys.argv[1], out=sys.argv[2], batch_size=1, config=cfg)
print("rerun", run.n_done, ray.is_initialized())
try:
    zoospectra.analyze(zoo, base=sys.argv[1], out=sys.argv[2] + "-new", batch_size=0, config=cfg)
except ConfigError as err:
    print("error", type(err).__name__, ray.is_initialized())
"""
    proc = subprocess.run([sys.executable, "-c", script, str(minilm_dir), str(reference_run),
                           *map(str, small_zoo)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    assert "rerun 0 False" in lines, proc.stdout   # nothing new: no Ray started
    assert "error ConfigError True" in lines, proc.stdout   # new work: Ray started, the plan's error raised
