"""Faults: killed drivers, killed workers, full disks, concurrent writers, a flaky Hub.

- A driver killed at several random points of one job (in-process executor, in a subprocess),
  and once a real `zoospectra analyze` on a local Ray whose worker also dies mid-task: every kill
  leaves only whole units visible, and resuming gives exactly the rows of an uninterrupted run.
- Writes that fail with ENOSPC (disk full) or EIO at any point of a run: no partial file is ever
  visible to the SQL views, and the rerun completes to the reference rows.
- Three processes writing one results root at once, two with the same adapters and one
  overlapping them in other batches: no corruption, no duplicate row, nothing missing.
- A Hub that keeps failing: bounded retries, then `errors` rows; a briefly failing one recovers.
"""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from fixtures_faults import MEMBER_TABLES, duplicates
from rows import table_rows
from workers import WorkerKiller

from zoospectra.config import AnalysisConfig
from zoospectra.io.refs import local_ref
from zoospectra.run.execute import run_plan
from zoospectra.run.plan import build_plan
from zoospectra.run.store import ResultsStore
from zoospectra.study.sql import connect

torch.set_num_threads(1)
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
IDS = ("tiny_a", "tiny_b", "tiny_c")
KILL_SEED = 20240917  # the "random" kill points are reproducible

# A driver in its own process: plan + in-process executor, one matrix per unit.
DRIVER = """
import sys, torch
torch.set_num_threads(1)
from zoospectra.config import AnalysisConfig
from zoospectra.run.execute import run_plan
from zoospectra.run.plan import build_plan
from zoospectra.io.refs import local_ref
from zoospectra.run.store import ResultsStore
base, out, batch, *arts = sys.argv[1:]
refs = [local_ref(p, n) for n, p in (a.split("=", 1) for a in arts)]
plan = build_plan(local_ref(base), refs, AnalysisConfig(mode="exact"), batch_size=int(batch),
                  done_pairs=ResultsStore(out).done_pairs())
print(run_plan(plan, out, executor="local", device="cpu"))
"""


def refs_of(paths: list[Path], ids: tuple[str, ...] = IDS) -> list:
    return [local_ref(p, n) for n, p in zip(ids, paths, strict=True)]


# The exact engine: its rows are bit-identical whatever the batch composition, so a run killed at
# any point and resumed with other batches must give the reference's rows exactly. (The fast
# engine shares one float32 product per batch, so across batch sizes its rows agree to rounding,
# ~1e-7 relative: the CLI test below compares those approximately.)
def run_local(minilm_dir: Path, paths: list[Path], out: Path, batch: int = 64, ids: tuple[str, ...] = IDS):
    plan = build_plan(local_ref(minilm_dir), refs_of(paths, ids), AnalysisConfig(mode="exact"), batch_size=batch,
                      done_pairs=ResultsStore(out).done_pairs())
    return run_plan(plan, str(out), executor="local", device="cpu")


@pytest.fixture(scope="module")
def reference(minilm_dir: Path, tiny_loras: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "results"
    run_local(minilm_dir, tiny_loras, out)
    return out


def assert_same_rows(out: Path, reference: Path, ids: tuple[str, ...] = IDS, exact: bool = True) -> None:
    for table in MEMBER_TABLES:
        got, want = table_rows(out, table, models=ids), table_rows(reference, table, models=ids)
        assert len(got) == len(want) > 0, table
        if exact:
            assert got == want, table
        else:  # Ray workers vs in-process: float32 SVDs agree to rounding
            for g, w in zip(got, want, strict=True):
                assert all(a == pytest.approx(b, rel=1e-4, abs=1e-6) if isinstance(a, float) else a == b
                           for a, b in zip(g, w, strict=True)), (table, g, w)
    assert duplicates(out) == {t: 0 for t in MEMBER_TABLES}


def assert_only_whole_units_visible(out: Path) -> None:
    """Every visible unit is committed; every visible file is whole; the views count them all."""
    units = out / "units"
    for d in (units.iterdir() if units.exists() else []):
        assert (d / "_SUCCESS").exists(), f"partial unit visible: {d}"
        done = json.loads((d / "_done.json").read_text())
        for table, n in done["rows"].items():
            if n:
                assert pq.read_table(d / f"{table}.parquet").num_rows == n
    for p in out.rglob("*.parquet"):
        if "_staging" not in p.parts:
            pq.read_table(p)  # raises on a torn file
    for p in out.rglob("*.json"):
        if "_staging" not in p.parts:
            json.loads(p.read_text())
    committed = sum(json.loads((d / "_done.json").read_text())["rows"].get("matrices", 0)
                    for d in (units.iterdir() if units.exists() else []))
    con = connect(out)
    try:
        assert con.execute("SELECT count(*) FROM matrices").fetchone()[0] == committed
    finally:
        con.close()


def wait_for_units(out: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if n == 0 or (out / "units").exists() and sum(1 for _ in (out / "units").iterdir()) >= n:
            return
        time.sleep(0.01)


def settle(out: Path, quiet_for: float = 2.0, timeout: float = 30.0) -> None:
    """Wait until no unit has appeared for `quiet_for` seconds."""
    deadline, last, since = time.time() + timeout, -1, time.time()
    while time.time() < deadline:
        n = len(list((out / "units").glob("*"))) if (out / "units").exists() else 0
        if n != last:
            last, since = n, time.time()
        elif time.time() - since >= quiet_for:
            return
        time.sleep(0.1)


# --- killed drivers ------------------------------------------------------------------------
def test_driver_killed_at_random_points_resumes_to_identical_rows(minilm_dir: Path, tiny_loras: list[Path],
                                                                  reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    args = [sys.executable, "-c", DRIVER, str(minilm_dir), str(out), "1",
            *[f"{n}={p}" for n, p in zip(IDS, tiny_loras, strict=True)]]
    rng = random.Random(KILL_SEED)
    kills = sorted(rng.sample(range(0, 15), 3))  # units committed before each kill (of 18)
    seen = []
    for n in kills:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env={**os.environ, **ONE_THREAD})
        wait_for_units(out, n, proc)
        time.sleep(rng.uniform(0.0, 0.2))  # land anywhere: mid-SVD, mid-commit, mid-manifest
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert_only_whole_units_visible(out)
        seen.append(len(ResultsStore(out).done_units()))
    assert seen[-1] < 18, f"the kills must land mid-job: units after each kill {seen}"
    summary = run_local(minilm_dir, tiny_loras, out, batch=1)
    assert summary.n_failed == 0
    assert ResultsStore(out).status()["units_done"] == 18
    assert_same_rows(out, reference)


def test_ray_cli_driver_killed_with_a_dead_worker_resumes(minilm_dir: Path, tiny_loras: list[Path],
                                                          reference: Path, tmp_path: Path) -> None:
    """A real `zoospectra analyze` on a local Ray: one worker dies hard (retried), then the whole
    process group (driver and Ray) is killed at a random point; a rerun finishes the job."""
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "zoospectra.cli", "analyze", "--base", str(minilm_dir),
           *[f"{n}={p}" for n, p in zip(IDS, tiny_loras, strict=True)], "--out", str(out), "--batch-size", "1",
           "--mode", "exact"]  # the exact engine, as the in-process reference and resume
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, **ONE_THREAD})
    killer = WorkerKiller()  # one worker SIGKILLed from outside while it runs a unit
    killer.start()
    n = random.Random(KILL_SEED + 1).randint(3, 12)
    wait_for_units(out, n, proc, timeout=300)
    killer.stop()
    assert proc.poll() is None, "the run ended before the kill"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    settle(out)  # a worker may finish the commit it was in, a moment after its raylet died
    assert killer.killed is not None, "a Ray worker must have died mid-task (and its task been retried)"
    partial = len(ResultsStore(out).done_units())
    assert n <= partial < 18
    assert_only_whole_units_visible(out)
    errors = list((out / "errors").glob("*/*.parquet"))
    assert not errors, "the dead worker's task was retried, not given up"
    run_local(minilm_dir, tiny_loras, out, batch=1)
    assert ResultsStore(out).status()["units_done"] == 18
    assert_same_rows(out, reference, exact=False)


# --- write failures -----------------------------------------------------------------------
class DiskFull:
    """store._write_synced that writes half of a file and then fails, from the n-th file on."""

    def __init__(self, real, fail_from: int, err: int = errno.ENOSPC, once: bool = False) -> None:
        self.real, self.fail_from, self.err, self.once, self.calls = real, fail_from, err, once, 0

    def __call__(self, path: Path, data: bytes) -> None:
        self.calls += 1
        if self.calls >= self.fail_from and not (self.once and self.calls > self.fail_from):
            with open(path, "xb") as f:
                f.write(data[: len(data) // 2])
            raise OSError(self.err, os.strerror(self.err), str(path))
        self.real(path, data)


@pytest.mark.parametrize("fail_from, err, once", [
    (1, errno.ENOSPC, False),    # the run manifest
    (3, errno.ENOSPC, False),    # model rows
    (7, errno.ENOSPC, False),    # inside the first unit
    (14, errno.ENOSPC, False),   # inside a later unit
    (10, errno.EIO, True),       # one transient I/O error
])
def test_write_failures_never_show_partial_files(fail_from: int, err: int, once: bool, minilm_dir: Path,
                                                 tiny_loras: list[Path], reference: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import zoospectra.run.store as store_mod

    out = tmp_path / "results"
    fault = DiskFull(store_mod._write_synced, fail_from, err, once)
    monkeypatch.setattr(store_mod, "_write_synced", fault)
    with pytest.raises(OSError) as info:
        run_local(minilm_dir, tiny_loras, out, batch=2)
    assert info.value.errno == err
    assert_only_whole_units_visible(out)
    monkeypatch.setattr(store_mod, "_write_synced", fault.real)  # space freed
    run_local(minilm_dir, tiny_loras, out, batch=2)
    assert_same_rows(out, reference)
    assert ResultsStore(out).runs()[-1]["status"] == "finished"


def test_a_failed_rename_leaves_nothing_visible(minilm_dir: Path, tiny_loras: list[Path], reference: Path,
                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, real, calls = tmp_path / "results", os.rename, []

    def flaky_rename(src: str, dst: str) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.EIO, "I/O error", str(dst))
        real(src, dst)

    monkeypatch.setattr(os, "rename", flaky_rename)
    with pytest.raises(OSError):
        run_local(minilm_dir, tiny_loras, out, batch=1)
    assert_only_whole_units_visible(out)
    monkeypatch.setattr(os, "rename", real)
    run_local(minilm_dir, tiny_loras, out, batch=1)
    assert_same_rows(out, reference)


# --- concurrent writers -------------------------------------------------------------------
def test_concurrent_runs_into_one_root(minilm_dir: Path, tiny_loras: list[Path], reference: Path,
                                       tmp_path: Path) -> None:
    """Same adapters twice (same units: one rename wins) and an overlapping set (other batches,
    so other unit ids: the commit lock keeps each pair once)."""
    out = tmp_path / "results"
    a, b, c = (f"{n}={p}" for n, p in zip(IDS, tiny_loras, strict=True))
    jobs = [[a, b], [a, b], [b, c]]
    procs = [subprocess.Popen([sys.executable, "-c", DRIVER, str(minilm_dir), str(out), "64", *job],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **ONE_THREAD}) for job in jobs]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    assert_only_whole_units_visible(out)
    assert_same_rows(out, reference)
    status = ResultsStore(out).status()
    assert status["pairs_done"] == 18 and status["errors"] == 0


# --- a flaky Hub --------------------------------------------------------------------------
def test_flaky_hub_bounded_retries_then_error_rows(fake_hub, minilm_dir: Path, tiny_loras: list[Path],
                                                   tmp_path: Path) -> None:
    from huggingface_hub import constants

    from zoospectra.io.hub import HubOptions
    from zoospectra.jobs.spec import CrawlSpec
    from zoospectra.run.crawl import run_crawl

    base = "sentence-transformers/all-MiniLM-L6-v2"
    fake_hub.add_repo(base, {n: (minilm_dir / n).read_bytes() for n in ("model.safetensors", "config.json")})
    for name, path in zip(IDS, tiny_loras, strict=True):
        cfg = json.loads((path / "adapter_config.json").read_text()) | {"base_model_name_or_path": base}
        weights = (path / "adapter_model.safetensors").read_bytes()
        fake_hub.add_repo(f"org/{name}", {"adapter_config.json": json.dumps(cfg).encode(),
                                          "adapter_model.safetensors": weights},
                          base_model=base, relation="adapter")
    retries = 2
    dead = fake_hub.inject("org/tiny_a", "adapter_model.safetensors", status=503, times=-1)
    blip = fake_hub.inject("org/tiny_b", "adapter_model.safetensors", status=502, times=retries)
    opts = HubOptions(endpoint=fake_hub.url, cache_dir=constants.HF_HUB_CACHE, timeout=5, max_retries=retries,
                      backoff=0.01, backoff_max=0.02)
    out = tmp_path / "results"
    spec = CrawlSpec.from_dict({"name": "flaky", "base_models": [base], "out": str(out), "batch_size": 64})
    (report,) = run_crawl(spec, options=opts, executor="local").bases
    assert blip.hits == retries  # recovered within its retries
    tries_per_read = retries + 1
    assert dead.hits % tries_per_read == 0 and 0 < dead.hits <= 3 * tries_per_read, dead.hits  # bounded
    rows = [r for p in (out / "errors").glob("*/*.parquet") for r in pq.read_table(p).to_pylist()]
    assert {r["model_id"] for r in rows} == {"org/tiny_a"}
    assert {r["error_type"] for r in rows} == {"HubUnavailableError"}
    assert all(f"{tries_per_read} tries" in r["message"] for r in rows)
    assert ResultsStore(out).status()["pairs_done"] == 12  # tiny_b and tiny_c, 6 matrices each
    assert report.error_rows == len(rows)
