"""One `errors` row and one redactor for every stage, the Ray task-failure path included."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from zoospectra.demo.zoo import build_zoo, lora
from zoospectra.errors import MESSAGE_LIMIT, AdapterConfigError, error_row

ENV_SECRET = "s3cret-not-token-shaped-0042"           # HF_TOKEN of this process: masked by value
TOKEN_LIKE = "hf_QwErTyUiOpAsDfGhJkLzXcVbNm1234"      # anyone's token: masked by shape


@pytest.fixture(scope="module")
def one_lora(tmp_path_factory) -> Path:
    return build_zoo(tmp_path_factory.mktemp("zoo"), [lora("lora_q", 4, 8, targets=("query",))], steps=1)[0]


@pytest.mark.slow
def test_ray_task_failure_stores_redacted_message(minilm_dir, one_lora, tmp_path) -> None:
    """A task that raises on a real local Ray worker: the driver's row carries no secret."""
    out = tmp_path / "results"
    inject = str(Path(__file__).parent / "inject")  # sitecustomize: units raise in Ray workers only
    env = {**os.environ, "HF_TOKEN": ENV_SECRET, "INJECT_UNIT_FAILURE": f"worker saw {ENV_SECRET} and {TOKEN_LIKE}",
           "PYTHONPATH": os.pathsep.join(filter(None, [inject, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "zoospectra.cli", "analyze", "--base", str(minilm_dir),
                           f"q={one_lora}", "--out", str(out), "--batch-size", "6"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 3, proc.stderr                      # completed, with error rows
    rows = duckdb.sql(f"SELECT stage, error_type, message, context_json, model_id, tensor "
                      f"FROM read_parquet('{out}/errors/*/*.parquet')").fetchall()
    assert len(rows) == 6 and {r[0] for r in rows} == {"execute"}  # one row per layer's member
    for _stage, error_type, message, context, model_id, tensor in rows:
        assert "worker saw *** and hf_***" in message, message     # the worker's own text, masked
        assert ENV_SECRET not in message + context and TOKEN_LIKE not in message + context
        assert error_type.startswith("RayTaskError") and model_id == "q" and "query" in tensor
        assert len(message) <= MESSAGE_LIMIT + 4
    stored = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert ENV_SECRET.encode() not in stored and TOKEN_LIKE.encode() not in stored
    assert ENV_SECRET not in proc.stderr + proc.stdout


@pytest.mark.slow
def test_ray_base_task_failure_is_a_warning_and_error_rows(minilm_dir, one_lora, tmp_path) -> None:
    """A prepare-base task that raises on a real Ray worker: the driver logs one redacted warning
    per tensor and the tensor's units, which depend on it, become error rows; the run completes
    (this path once raised NameError in the driver)."""
    out = tmp_path / "results"
    inject = str(Path(__file__).parent / "inject")  # sitecustomize: prepare-base tasks raise in Ray workers
    env = {**os.environ, "HF_TOKEN": ENV_SECRET, "INJECT_BASE_FAILURE": f"base saw {ENV_SECRET} and {TOKEN_LIKE}",
           "PYTHONPATH": os.pathsep.join(filter(None, [inject, os.environ.get("PYTHONPATH")]))}
    # two members, one per unit: each tensor has two units, so it gets a prepare-base task
    proc = subprocess.run([sys.executable, "-m", "zoospectra.cli", "analyze", "--base", str(minilm_dir),
                           f"a={one_lora}", f"b={one_lora}", "--out", str(out), "--batch-size", "1"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr and "NameError" not in proc.stderr, proc.stderr
    # one warning per tensor (6 query matrices); Ray's remote traceback follows on later lines
    assert proc.stderr.count("base decomposition of") == 6, proc.stderr
    assert "base saw *** and hf_***" in proc.stderr.split("base decomposition of", 1)[1], proc.stderr
    rows = duckdb.sql(f"SELECT stage, message, model_id, tensor "
                      f"FROM read_parquet('{out}/errors/*/*.parquet')").fetchall()
    assert len(rows) == 12 and {r[0] for r in rows} == {"execute"}  # 6 layers x 2 members
    assert {r[2] for r in rows} == {"a", "b"} and all("base saw *** and hf_***" in r[1] for r in rows), rows
    assert ENV_SECRET not in proc.stderr + proc.stdout and TOKEN_LIKE not in proc.stderr + proc.stdout


def test_error_row_redacts_context_and_caps_message(monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", ENV_SECRET)
    err = AdapterConfigError("x" * 5000 + ENV_SECRET, file=f"/cache/{TOKEN_LIKE}/adapter_config.json",
                             tensor="layer.0.q")
    row = error_row("plan", err)
    assert len(row["message"]) == MESSAGE_LIMIT + 4 and row["message"].endswith(" ...")
    assert json.loads(row["context_json"]) == {"file": "/cache/hf_***/adapter_config.json", "tensor": "layer.0.q"}
    assert row["tensor"] == "layer.0.q" and row["model_uid"] is None and row["stage"] == "plan"
