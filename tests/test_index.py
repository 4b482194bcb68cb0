"""The done index (issue 18, item 1) on real files, local and memory://.

The reference for "which pairs are done" is the per-unit scan the store used before the index
(`ResultsStore.committed()`: every folder's `_SUCCESS` and `_done.json`, read and checked); the
index must agree with it on healthy, damaged, orphaned and pre-index roots. A commit's cost is
counted in filesystem calls, which must not grow with the number of units in the root.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pytest
from fixtures_store import RUN_ID
from typer.testing import CliRunner

from zoospectra.cli import VERIFY_DAMAGED, app
from zoospectra.io.refs import ModelRef
from zoospectra.run.plan import WorkUnit
from zoospectra.run.store import ResultsStore
from zoospectra.schemas.tables import to_table


def unit_tables(unit_id: str, tensor: str, uids: list[str], n_vectors: int = 3) -> dict[str, pa.Table]:
    """A small valid unit: one matrices row and n_vectors vectors rows per member."""
    mat, vec = [], []
    for uid in uids:
        ident = dict(run_id=RUN_ID, unit_id=unit_id, model_uid=uid, model_id=f"org/{uid}", tensor=tensor)
        mat.append(dict(ident, base_uid="base", role="linear", kind="lora", m=8, n=4, intr_k=2,
                        intr_eps=0.5, intruders_u=1, intruders_v=0, mode="exact", device="cpu", seconds=0.1))
        vec += [dict(ident, side="U", j=j, sigma=1.0, max_cos=0.1 * j, argmax_i=j, base_sigma=1.0)
                for j in range(1, n_vectors + 1)]
    return {"matrices": to_table("matrices", mat), "vectors": to_table("vectors", vec)}


def fill(store: ResultsStore, n: int, prefix: str = "u") -> None:
    for i in range(n):
        uids = [f"m{i}", f"m{i + 1}"]
        unit_id = f"{prefix}{i:05d}"
        assert store.commit_unit(unit_id, unit_tables(unit_id, f"t{i % 7}", uids),
                                 done=[(u, f"t{i % 7}") for u in uids])


def scanned_pairs(root) -> set[tuple[str, str]]:
    """The reference: pairs of every unit the per-unit scan accepts."""
    out = set()
    for check in ResultsStore(root).committed().values():
        out.update((str(m), str(t)) for m, t in check.manifest["done"])
    return out


def test_index_agrees_with_the_unit_scan_on_a_messy_root(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    fill(store, 40)
    units = sorted((tmp_path / "units").iterdir())
    # damage: a truncated file, a deleted marker, an edited manifest
    f = units[0] / "vectors.parquet"
    f.write_bytes(f.read_bytes()[:-10])
    (units[1] / "_SUCCESS").unlink()
    done = json.loads((units[2] / "_done.json").read_text())
    done["done"].append(["zz", "t0"])
    (units[2] / "_done.json").write_text(json.dumps(done))
    # an orphan entry (a writer killed between its entry and its publish) claiming new pairs
    orphan = {"unit_id": "u99999", "fingerprint": "0" * 64, "sizes": {"_SUCCESS": 1},
              "done": [["ghost", "t1"]]}
    (tmp_path / "_index" / f"u99999.{'0' * 16}.json").write_text(json.dumps(orphan))
    # a unit of before the index: its entry is gone
    for entry in (tmp_path / "_index").glob(f"{units[3].name}.*.json"):
        entry.unlink()
    want = scanned_pairs(tmp_path)
    fresh = ResultsStore(tmp_path)
    assert fresh.done_pairs() == want and ("ghost", "t1") not in want and ("zz", "t0") not in want
    assert fresh.done_units() == set(ResultsStore(tmp_path).committed())
    assert len(list((tmp_path / "_index").glob(f"{units[3].name}.*.json"))) == 1  # rebuilt itself
    # the commit check asks whether a committed unit holds the pair now: the damaged unit still
    # does, until a run moves it to quarantine/ (run_plan does, before executing)
    probe = [("ghost", "t1"), ("m5", "t5"), ("m0", "t0")]
    assert fresh.claimed_pairs(probe) == {("m5", "t5"), ("m0", "t0")}
    assert {m["unit"] for m in fresh.quarantine_known_damage()} == {u.name for u in units[:3]}
    assert fresh.claimed_pairs(probe) == {("m5", "t5")}
    assert fresh.done_pairs() == want


def test_index_rebuilds_from_the_units_and_verify_checks_it(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    fill(store, 12)
    want = scanned_pairs(tmp_path)
    shutil.rmtree(tmp_path / "_index")
    assert ResultsStore(tmp_path).done_pairs() == want
    assert len(list((tmp_path / "_index").iterdir())) == 12
    runner = CliRunner()
    assert runner.invoke(app, ["verify", str(tmp_path)]).exit_code == 0
    entry = sorted((tmp_path / "_index").iterdir())[4]
    record = json.loads(entry.read_text())
    record["done"] = record["done"][:1]  # an index that forgot a pair: a later run would redo it
    entry.write_text(json.dumps(record))
    result = runner.invoke(app, ["verify", str(tmp_path)])
    assert result.exit_code == VERIFY_DAMAGED and "INDEX index entry of units/" in result.output
    assert "lists other pairs" in result.output
    result = runner.invoke(app, ["verify", str(tmp_path), "--rebuild-index"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(entry.read_text())["done"]) == 2
    assert ResultsStore(tmp_path).done_pairs() == want


class Counting:
    """A store's filesystem with every call counted (reads, listings, existence checks)."""

    def __init__(self, fs) -> None:
        self.fs, self.calls = fs, 0

    def __getattr__(self, name):
        attr = getattr(self.fs, name)
        if callable(attr):
            def counted(*a, **k):
                self.calls += 1
                return attr(*a, **k)
            return counted
        return attr


def commit_calls(root: Path, n_units: int) -> int:
    """Filesystem calls of the duplicate check + commit of one new unit into a root of n_units,
    by a store that has committed before (as a Ray worker's does after its first unit)."""
    store = ResultsStore(root)
    fill(store, n_units)
    assert store.claimed_pairs([("m0", "t0")]) == {("m0", "t0")}
    counting = Counting(store._fs)
    store._fs = store._index._fs = counting
    pairs = [("new-a", "t1"), ("m3", "t3"), ("new-b", "t1")]
    assert store.claimed_pairs(pairs) == {("m3", "t3")}
    assert store.commit_unit("fresh", unit_tables("fresh", "t1", ["new-a", "new-b"]),
                             done=[("new-a", "t1"), ("new-b", "t1")])
    return counting.calls


def test_a_commit_costs_its_own_pairs_not_the_root(tmp_path: Path) -> None:
    small, large = commit_calls(tmp_path / "small", 10), commit_calls(tmp_path / "large", 150)
    assert small == large and small < 12, (small, large)
    # the unit scan the commit path used before: at least one call per unit
    store = ResultsStore(tmp_path / "large")
    counting = Counting(store._fs)
    store._fs = counting
    store.committed()
    assert counting.calls > 150


def _overlapping_writer(root: str, worker: int, barrier) -> None:  # a child process
    from zoospectra.run.unit import _commit_new_pairs

    base = ModelRef("base", "r0", "/base")
    refs = [ModelRef(f"m{i}", "r0", f"/m{i}") for i in range(12)]
    barrier.wait()
    # each writer batches the same 12 artifacts differently: other unit ids, shared pairs
    size = 2 + worker
    for start in range(0, 12, size):
        members = refs[start:start + size]
        unit_id = f"w{worker}-{start}"
        tables = unit_tables(unit_id, "t", [m.uid for m in members])
        unit = WorkUnit(unit_id, base, "t", (8, 4), "linear", tuple(members))
        _commit_new_pairs(root, unit, tables, list(members))


@pytest.mark.parametrize("where", ["local", "memory"])
def test_concurrent_overlapping_commits_keep_each_pair_once(where: str, tmp_path: Path) -> None:
    if where == "memory":  # threads share the in-process memory filesystem (no lock there)
        pytest.importorskip("fsspec")
        root = f"memory://zs-{uuid.uuid4().hex[:8]}"
        import threading

        barrier = threading.Barrier(4)
        workers = [threading.Thread(target=_overlapping_writer, args=(root, w, barrier)) for w in range(4)]
    else:
        root = str(tmp_path)
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        barrier = ctx.Barrier(4)
        workers = [ctx.Process(target=_overlapping_writer, args=(root, w, barrier)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    from zoospectra.study.sql import connect

    con = connect(root)
    try:
        (n, distinct), = con.sql("SELECT count(*), count(DISTINCT (model_uid, tensor)) FROM matrices").fetchall()
    finally:
        con.close()
    assert distinct == 12
    if where == "local":  # the commit lock: exactly once
        assert n == 12
    assert ResultsStore(root).done_pairs() == {(ModelRef(f"m{i}", "r0", f"/m{i}").uid, "t") for i in range(12)}


def test_the_snapshot_is_only_a_shortcut(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A load that read many entry files writes them into one file for the next process; an
    entry of the snapshot whose file is gone is not used, and a rebuild drops the snapshot."""
    import zoospectra.run.index as index_mod

    monkeypatch.setattr(index_mod, "SNAPSHOT_AFTER", 5)
    store = ResultsStore(tmp_path)
    fill(store, 8)
    want = scanned_pairs(tmp_path)
    assert ResultsStore(tmp_path).done_pairs() == want
    snapshot = tmp_path / "_index" / index_mod.SNAPSHOT
    assert len(json.loads(snapshot.read_text())) == 8
    victim = sorted((tmp_path / "units").iterdir())[0]
    for entry in (tmp_path / "_index").glob(f"{victim.name}.*.json"):
        entry.unlink()  # its snapshot copy must not stand in for it: the load rebuilds it
    shutil.rmtree(victim)
    fresh = ResultsStore(tmp_path)
    assert fresh.done_pairs() == scanned_pairs(tmp_path) and len(fresh.done_units()) == 7
    assert fresh.claimed_pairs([("m0", "t0")]) == set()
    fresh.verify(rebuild_index=True)
    ResultsStore(tmp_path)._index.rebuild(sorted(ResultsStore(tmp_path).committed()))
    assert not snapshot.exists() and ResultsStore(tmp_path).done_pairs() == scanned_pairs(tmp_path)
