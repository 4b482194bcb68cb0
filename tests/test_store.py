"""The results store on real files: atomic unit commits, skip/resume, manifests, path safety."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import threading
import time
import uuid
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from fixtures_store import RUN_ID, model_row, one_unit

import zoospectra.run.store as store_mod
from zoospectra.errors import InvalidNameError, ResultsError, SchemaMismatchError
from zoospectra.run.store import ResultsStore
from zoospectra.schemas.tables import META_TABLE, META_VERSION, SCHEMA_VERSION, to_table


def _rows(root: Path, table: str) -> int:
    files = sorted(root.glob(f"units/*/{table}.parquet"))
    return ds.dataset([str(f) for f in files], format="parquet").count_rows() if files else 0


def _visible_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
                  and not p.relative_to(root).parts[0] == "_staging")


# --- commits ---------------------------------------------------------------------------------
def test_commit_publishes_unit_with_manifest_and_schema_metadata(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    assert store.done_units() == set() and store.done_pairs() == set()
    assert store.commit_unit("u1", one_unit(), done=[("a1", "t"), ("b2", "t")]) is True

    assert store.is_done("u1") and store.done_units() == {"u1"}
    assert store.done_pairs() == {("a1", "t"), ("b2", "t")}
    unit = tmp_path / "units" / "u1"
    assert sorted(p.name for p in unit.iterdir()) == ["_SUCCESS", "_done.json", "matrices.parquet",
                                                       "vectors.parquet"]
    meta = pq.read_schema(unit / "vectors.parquet").metadata
    assert meta[META_VERSION] == SCHEMA_VERSION.encode() and meta[META_TABLE] == b"vectors"
    manifest = json.loads((unit / "_done.json").read_text())
    assert manifest["rows"] == {"matrices": 1, "vectors": 4} and manifest["run_ids"] == [RUN_ID]
    assert not list((tmp_path / "_staging").iterdir())  # nothing left behind
    # a fresh store (another process, a later run) sees the same
    assert ResultsStore(str(tmp_path)).done_pairs() == {("a1", "t"), ("b2", "t")}


def test_second_commit_of_a_unit_is_discarded(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    assert store.commit_unit("u1", one_unit(), done=[("a1", "t")])
    assert store.commit_unit("u1", one_unit(n_vectors=7), done=[("a1", "t")]) is False
    assert _rows(tmp_path, "vectors") == 4  # the first copy, once
    assert not list((tmp_path / "_staging").iterdir())


def test_threads_racing_on_one_unit_leave_exactly_one_copy(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    barrier, results = threading.Barrier(8), []

    def commit() -> None:
        barrier.wait()
        results.append(store.commit_unit("u1", one_unit(), done=[("a1", "t")]))

    threads = [threading.Thread(target=commit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    assert _rows(tmp_path, "vectors") == 4


def _commit_in_child(root: str, barrier, queue) -> None:  # runs in a child process
    barrier.wait()
    queue.put(ResultsStore(root).commit_unit("u1", one_unit(), done=[("a1", "t")]))


def test_processes_racing_on_one_unit_leave_exactly_one_copy(tmp_path: Path) -> None:
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    barrier, queue = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_commit_in_child, args=(str(tmp_path), barrier, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results == [False, False, False, True]
    assert _rows(tmp_path, "vectors") == 4 and len(list((tmp_path / "units").iterdir())) == 1


def test_failed_commit_leaves_nothing_visible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = store_mod._write_synced

    def failing(path, data):  # the disk fills up after the first file
        calls.append(path)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        real(path, data)

    store = ResultsStore(tmp_path)
    monkeypatch.setattr(store_mod, "_write_synced", failing)
    with pytest.raises(OSError):
        store.commit_unit("u1", one_unit(), done=[("a1", "t")])
    monkeypatch.undo()
    assert not store.is_done("u1") and store.done_pairs() == set()
    assert _visible_files(tmp_path) == [] and not list((tmp_path / "_staging").iterdir())
    assert store.commit_unit("u1", one_unit(), done=[("a1", "t")])  # a retry goes through


def _crash_before_publish(root: str) -> None:  # runs in a child process: dies like kill -9
    def die(*_a, **_k):
        os._exit(9)

    os.rename = die
    ResultsStore(root).commit_unit("u1", one_unit(), done=[("a1", "t")])


def test_killed_commit_leaves_only_staging_junk_that_is_ignored_and_cleaned(tmp_path: Path) -> None:
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    proc = ctx.Process(target=_crash_before_publish, args=(str(tmp_path),))
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == 9
    junk = list((tmp_path / "_staging").iterdir())
    assert len(junk) == 1 and (junk[0] / "vectors.parquet").is_file()  # fully written, unpublished
    store = ResultsStore(tmp_path)
    # the done-index entry is written before the publish: the killed writer's counts for nothing
    orphan = [f for f in _visible_files(tmp_path) if f.startswith("_index/")]
    assert len(orphan) == 1 and store.claimed_pairs([("a1", "t")]) == set()
    assert store.done_units() == set() and store.done_pairs() == set()
    assert [f for f in _visible_files(tmp_path) if f not in orphan] == []

    assert store.clean_staging(max_age_hours=1) == 0  # young junk may be a live writer: kept
    old = time.time() - 7200
    os.utime(junk[0], (old, old))
    assert store.clean_staging(max_age_hours=1) == 1 and not junk[0].exists()
    assert store.commit_unit("u1", one_unit(), done=[("a1", "t")])  # the resumed run commits


def test_foreign_directory_in_units_is_reported(tmp_path: Path) -> None:
    (tmp_path / "units" / "u1").mkdir(parents=True)
    (tmp_path / "units" / "u1" / "notes.txt").write_text("hand-made")
    store = ResultsStore(tmp_path)
    assert not store.is_done("u1") and store.done_units() == set()
    with pytest.raises(ResultsError, match="_SUCCESS missing"):
        store.commit_unit("u1", one_unit(), done=[])


# --- validation ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["../x", "a/b", "..", ".", ".hidden", "", "a b", "x\x00", "/abs",
                                 "a\\b", "é", "x" * 201])
def test_unsafe_names_are_refused(tmp_path: Path, bad: str) -> None:
    store = ResultsStore(tmp_path / "root")
    with pytest.raises(InvalidNameError):
        store.commit_unit(bad, one_unit(), done=[])
    with pytest.raises(ValueError):  # InvalidNameError is a ValueError too
        store.write_errors(RUN_ID, bad, [_error_row()])
    with pytest.raises(InvalidNameError):
        store.write_errors(bad, "k", [_error_row()])
    with pytest.raises(InvalidNameError):
        store.start_run(bad, "{}", "cmd")
    with pytest.raises(InvalidNameError):
        store.is_done(bad)
    assert not (tmp_path / "x").exists() and not (tmp_path / "root" / "units").exists()


def test_tables_must_match_the_contract(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    with pytest.raises(SchemaMismatchError, match="not a per-unit table"):
        store.commit_unit("u1", {"models": to_table("models", [model_row("a1")])}, done=[])
    wrong = one_unit()["vectors"].drop_columns(["sigma"])
    with pytest.raises(SchemaMismatchError, match="columns"):
        store.commit_unit("u1", {"vectors": wrong}, done=[])
    missing_required = to_table("vectors", [{"side": "U", "j": 1}])  # non-null columns left null
    with pytest.raises(SchemaMismatchError, match="non-nullable"):
        store.commit_unit("u1", {"vectors": missing_required}, done=[])
    with pytest.raises(SchemaMismatchError):
        store.write_models([{"model_uid": "a1"}])
    assert _visible_files(tmp_path) == []


# --- models, errors, catalog, runs -------------------------------------------------------------
def test_write_models_is_one_file_per_model_and_idempotent(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    store.write_models([model_row("a1"), model_row("b2")])
    store.write_models([dict(model_row("a1"), r=64)])  # a later run rewrites a1
    table = pq.read_table(tmp_path / "models" / "a1.parquet")
    assert table.num_rows == 1 and table.column("r").to_pylist() == [64]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["a1.parquet", "b2.parquet"]
    odd = "hub:org/name@main"  # not a safe file name: mapped, deterministically, inside models/
    store.write_models([dict(model_row("a1"), model_uid=odd)])
    store.write_models([dict(model_row("a1"), model_uid=odd)])
    odd_files = [p for p in (tmp_path / "models").iterdir() if p.name not in ("a1.parquet", "b2.parquet")]
    assert len(odd_files) == 1 and pq.read_table(odd_files[0]).column("model_uid").to_pylist() == [odd]


def _error_row(unit_id: str = "u1") -> dict:
    return dict(run_id=RUN_ID, unit_id=unit_id, stage="load", error_type="CorruptSafetensorsError",
                message="truncated file x.safetensors: re-download it", tensor="t")


def test_errors_and_catalog_are_written_whole(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    store.write_errors(RUN_ID, "u1", [_error_row(), _error_row()])
    store.write_errors(RUN_ID, "u1", [_error_row()])  # a retry of the same key replaces it
    store.write_errors(RUN_ID, "u2", [])  # no rows, no file
    errors = pq.read_table(tmp_path / "errors" / RUN_ID / "u1.parquet")
    assert errors.num_rows == 1 and errors.column("at").null_count == 0
    assert not (tmp_path / "errors" / RUN_ID / "u2.parquet").exists()
    store.write_catalog(RUN_ID, [dict(repo_id="org/a", sha="abc", kind="adapter", base_model="m")])
    catalog = pq.read_table(tmp_path / "catalog" / f"{RUN_ID}.parquet")
    assert catalog.column("run_id").to_pylist() == [RUN_ID]


def test_run_manifest_lifecycle_and_status(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    store.start_run(RUN_ID, json.dumps({"k": 10, "eps": 0.5}), "zoospectra analyze x")
    assert store.runs()[0]["status"] == "running"
    store.commit_unit("u1", one_unit(), done=[("a1", "t")])
    store.write_models([model_row("a1")])
    store.write_errors(RUN_ID, "u1", [
        _error_row("u1"),  # about the whole unit, committed since: closed
        dict(_error_row("u1"), model_uid="a1"),  # a1 x t is done: closed
        dict(_error_row("u1"), model_uid="b2"),  # a member that failed inside a committed unit: open
    ])
    store.write_errors(RUN_ID, "u9", [_error_row("u9"), _error_row("u9")])  # unit never committed
    store.finish_run(RUN_ID, "finished", n_units=2, n_done=1, n_skipped=0, n_failed=1)

    manifest = json.loads((tmp_path / "runs" / f"{RUN_ID}.json").read_text())
    assert manifest["status"] == "finished" and manifest["config"] == {"k": 10, "eps": 0.5}
    assert manifest["n_done"] == 1 and manifest["finished_at"] >= manifest["started_at"]
    row = pq.read_table(tmp_path / "runs" / f"{RUN_ID}.parquet").to_pylist()[0]
    assert row["status"] == "finished" and row["n_failed"] == 1 and row["command"] == "zoospectra analyze x"
    status = store.status()
    assert (status["runs"], status["units_done"], status["pairs_done"], status["models"]) == (1, 1, 1, 1)
    assert (status["errors"], status["open_errors"]) == (5, 3)
    assert status["last_run"]["run_id"] == RUN_ID

    with pytest.raises(ResultsError, match="start_run"):
        store.finish_run("never-started", "finished")
    with pytest.raises(ResultsError, match="status"):
        store.finish_run(RUN_ID, "done")
    with pytest.raises(ResultsError, match="JSON"):
        store.start_run("run-2", "{not json", "cmd")


# --- other filesystems ------------------------------------------------------------------------
def test_file_uri_is_the_local_store(tmp_path: Path) -> None:
    ResultsStore(f"file://{tmp_path}").commit_unit("u1", one_unit(), done=[("a1", "t")])
    assert ResultsStore(tmp_path).done_units() == {"u1"} and ResultsStore(tmp_path).is_local


@pytest.fixture
def memory_root():
    fsspec = pytest.importorskip("fsspec")
    name = f"zs-{uuid.uuid4().hex[:8]}"
    yield f"memory://{name}"
    fsspec.filesystem("memory").rm(f"/{name}", recursive=True)


def test_memory_fsspec_root(memory_root: str) -> None:
    store = ResultsStore(memory_root)
    assert not store.is_local and store.done_units() == set()
    assert store.commit_unit("u1", one_unit(), done=[("a1", "t")]) is True
    assert store.commit_unit("u1", one_unit(), done=[("a1", "t")]) is False
    store.write_models([model_row("a1"), model_row("a1")])
    store.start_run(RUN_ID, "{}", "cmd")
    store.finish_run(RUN_ID, "finished", n_done=1)
    fresh = ResultsStore(memory_root)
    assert fresh.is_done("u1") and fresh.done_pairs() == {("a1", "t")}
    assert fresh.runs()[0]["n_done"] == 1 and fresh.status()["models"] == 1


def test_remote_unit_without_success_marker_is_not_done(memory_root: str) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    base = memory_root.removeprefix("memory://")
    with fs.open(f"/{base}/units/u1/vectors.parquet", "wb") as f:  # a writer died before _SUCCESS
        pq.write_table(one_unit()["vectors"], f)
    store = ResultsStore(memory_root)
    assert store.done_units() == set() and not store.is_done("u1") and store.done_pairs() == set()
    assert store.commit_unit("u1", one_unit(), done=[("a1", "t")]) is True  # the rerun completes it
    assert store.done_units() == {"u1"}
