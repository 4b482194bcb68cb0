"""Secrets and output confinement.

A Hub token is planted the standard way (HF_TOKEN) and also where strangers' text flows into
outputs: an adapter config that quotes it, a config naming it as the base, a gated repo that
needs it (so it is really sent), a flaky file (so retries are logged). Then a crawl on a local Ray
through the CLI, a local analyze, report and status. Every file under the results root, the
report directory and Ray's session logs, every Parquet file decoded, and all captured output are
scanned: the token appears nowhere. Plus: no trust_remote_code anywhere in the code, and every
name that becomes a path under the results root is confined to it.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import string
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from fixtures_hub import hub_env
from hub_server import FakeHub

from zoospectra.errors import InvalidNameError
from zoospectra.run.store import ResultsStore, model_file_name

torch.set_num_threads(1)
BASE = "sentence-transformers/all-MiniLM-L6-v2"
SECRET = "hf_" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(34))
REPO_ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zoospectra.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=600)


def adapter_files(path: Path, **config: object) -> dict[str, bytes]:
    cfg = json.loads((path / "adapter_config.json").read_text()) | {"base_model_name_or_path": BASE, **config}
    return {"adapter_config.json": json.dumps(cfg).encode(),
            "adapter_model.safetensors": (path / "adapter_model.safetensors").read_bytes()}


@pytest.fixture(scope="module")
def ray_tmp() -> Iterator[Path]:
    """A private RAY_TMPDIR (short: Ray's socket paths must fit in 107 bytes), scanned for logs."""
    path = Path(tempfile.mkdtemp(prefix="zsr", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def planted(module_hub: FakeHub, tiny_loras: list[Path], minilm_dir: Path,
            tmp_path_factory: pytest.TempPathFactory, ray_tmp: Path) -> dict:
    """Crawl (CLI, local Ray), analyze (CLI, in-process), report and status, with the token planted."""
    fake_hub, tmp_path = module_hub, tmp_path_factory.mktemp("secrets")
    fake_hub.grant(SECRET, "org/gated")
    fake_hub.add_repo(BASE, {n: (minilm_dir / n).read_bytes() for n in ("model.safetensors", "config.json")})
    a, b, c = tiny_loras
    fake_hub.add_repo("org/public", adapter_files(a), base_model=BASE, relation="adapter")
    fake_hub.add_repo("org/gated", adapter_files(b), base_model=BASE, relation="adapter", gated="manual")
    fake_hub.add_repo("org/quotes-token", adapter_files(c, revision=SECRET, notes=f"token={SECRET}"),
                      base_model=BASE, relation="adapter")
    fake_hub.add_repo("org/names-token-as-base", adapter_files(a) | {
        "adapter_config.json": json.dumps({**json.loads(adapter_files(a)["adapter_config.json"]),
                                           "base_model_name_or_path": f"org/{SECRET}"}).encode()},
                      base_model=BASE, relation="adapter")
    fake_hub.add_repo("org/private", adapter_files(a), base_model=BASE, relation="adapter", private=True)
    fake_hub.inject("org/public", "adapter_model.safetensors", status=503, times=1)  # a logged retry
    local = tmp_path / "local-quoting-token"
    shutil.copytree(c, local)
    cfg = json.loads((local / "adapter_config.json").read_text()) | {"revision": SECRET}
    (local / "adapter_config.json").write_text(json.dumps(cfg))

    out, report = tmp_path / "results", tmp_path / "report"
    env = {**hub_env(fake_hub), "HF_TOKEN": SECRET, "RAY_TMPDIR": str(ray_tmp), "HF_DEBUG": "1"}
    procs = [
        run("crawl", "--base-model", BASE, "--out", str(out), "--name", "secrets", env=env),
        run("analyze", "--base", str(minilm_dir), f"local-quoting-token={local}", f"plain={a}", "--out", str(out),
            "--local", env=env),
        run("report", str(out), "--out", str(report), env=env),
        run("status", str(out), env=env),
        run("sql", str(out), "SELECT * FROM errors", "--format", "json", env=env),
    ]
    return {"out": out, "report": report, "procs": procs, "ray_tmp": ray_tmp, "hub": fake_hub}


def texts_of(path: Path) -> Iterator[tuple[Path, str]]:
    """Every file as raw bytes (latin-1, so any byte sequence matches) and, for Parquet, decoded."""
    for p in sorted(path.rglob("*")):
        if p.is_file() and not p.is_symlink():
            yield p, p.read_bytes().decode("latin-1")
            if p.suffix == ".parquet":
                yield p, json.dumps(pq.read_table(p).to_pylist(), default=str)


def test_the_token_is_used_and_found_nowhere(planted: dict) -> None:
    hub, out = planted["hub"], planted["out"]
    for proc in planted["procs"]:
        assert proc.returncode in (0, 3), proc.stderr  # 3: finished with error rows
    assert any(r.authorized for r in hub.requests("org/gated"))          # the token really was sent
    status = json.loads(planted["procs"][3].stdout)
    assert status["pairs_done"] == 5 * 6                                   # public, gated, quotes-token, 2 local
    errors = json.loads(planted["procs"][4].stdout)
    assert {e["model_id"] for e in errors} >= {"org/names-token-as-base"}
    scanned = 0
    for root in (out, planted["report"], planted["ray_tmp"]):
        for path, text in texts_of(root):
            scanned += 1
            assert SECRET not in text, f"token found in {path}"
    assert scanned > 50 and any((planted["ray_tmp"]).rglob("*.log")), "Ray's logs must have been scanned"
    for proc in planted["procs"]:
        assert SECRET not in proc.stdout + proc.stderr
    assert "retry" in planted["procs"][0].stderr  # the logged retry was captured (and is clean)


def test_stored_configs_and_error_rows_redact_token_like_text(planted: dict) -> None:
    out = planted["out"]
    models = [r for p in (out / "models").glob("*.parquet") for r in pq.read_table(p).to_pylist()]
    quoting = [m for m in models if m["model_id"] in ("org/quotes-token", "local-quoting-token")]
    assert len(quoting) == 2
    for m in quoting:
        cfg = json.loads(m["config_json"])
        assert cfg["revision"] == "***" or cfg["revision"].startswith("hf_***")
    errors = [r for p in (out / "errors").glob("*/*.parquet") for r in pq.read_table(p).to_pylist()]
    (named,) = [e for e in errors if e["model_id"] == "org/names-token-as-base"]
    assert "hf_***" in named["message"] or "***" in named["message"]


# --- no remote code, ever -----------------------------------------------------------------
def test_no_trust_remote_code_in_the_code() -> None:
    """Loading a stranger's model with trust_remote_code runs their Python: the only allowed
    spelling anywhere is an explicit False."""
    hits, scanned = [], 0
    for folder in ("pipeline", "jobs", "schemas", "bench", "deploy"):
        for p in (REPO_ROOT / folder).rglob("*"):
            if p.is_file() and p.suffix in (".py", ".yaml", ".yml", ".sql", ".toml", ".sh", ".json"):
                scanned += 1
                for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
                    for m in re.finditer(r"trust_remote_code\W*(\w*)", line):
                        if m.group(1) not in ("False", "false"):
                            hits.append(f"{p}:{i}: {line.strip()}")
    assert scanned > 20 and not hits, hits


# --- every output path stays inside the results root ---------------------------------------
BAD_NAMES = ["../x", "../../etc/passwd", "a/../../b", "/abs", "..", ".", ".hidden", "a/b", "a\\b", "x\x00y",
             "", "~root", "a" * 201]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_store_refuses_every_unsafe_name(bad: str, tmp_path: Path) -> None:
    store = ResultsStore(tmp_path / "root")
    calls = [
        lambda: store.commit_unit(bad, {}, done=[]),
        lambda: store.is_done(bad),
        lambda: store.write_errors(bad, "k", [{"stage": "x"}]),
        lambda: store.write_errors("run", bad, [{"stage": "x"}]),
        lambda: store.write_catalog(bad, []),
        lambda: store.start_run(bad, "{}", "cmd"),
        lambda: store.finish_run(bad, "finished"),
        lambda: store.run(bad),
    ]
    for call in calls:
        with pytest.raises(InvalidNameError):
            call()
    assert not any(p for p in tmp_path.rglob("*") if not p.resolve().is_relative_to((tmp_path / "root").resolve())
                   and p != tmp_path / "root")


@pytest.mark.parametrize("uid", ["../../x", "/abs/path", "a/b", "..", "x\x00y", "💥", "a" * 500])
def test_model_files_are_single_safe_names(uid: str, tmp_path: Path) -> None:
    name = model_file_name(uid)
    assert re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}", name), name
    store = ResultsStore(tmp_path / "root")
    row = {"run_id": "r", "model_uid": uid, "model_id": uid, "kind": "lora", "source": "local",
           "base_uid": "b", "base_id": "b"}
    store.write_models([row])
    (written,) = list((tmp_path / "root" / "models").iterdir())
    assert written.parent == tmp_path / "root" / "models" and written.suffix == ".parquet"


def test_every_file_of_a_real_run_is_inside_its_root(planted: dict) -> None:
    for root in (planted["out"], planted["report"]):
        resolved = root.resolve()
        for p in root.rglob("*"):
            assert not p.is_symlink() and p.resolve().is_relative_to(resolved), p
