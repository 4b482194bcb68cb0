"""Plan and commit against a results root of N committed units; file count before/after compaction.

    python -m bench.store_bench [--units 10000 --commits 100 --keep DIR]

Builds N small valid units through the store's own commit path (ResultsStore.commit_unit: a
matrices row and 4 vectors rows for each of 3 members, as tests/fixtures_store.py), then, in
one run:

- plan:          a fresh store's done_pairs() + done_units() (what a plan and run_plan ask):
                 the done index, one listing per unit folder, no unit file read;
- plan_scan:     the same pairs from the per-unit scan the store used before the index (ratio);
- repair:        ResultsStore.repair(), the full checksum pass analyze/crawl run before planning
                 (unchanged by the index: reported so the plan figure is not mistaken for it);
- commit:        per commit of a new 3-member unit through zoospectra.run.unit._commit_new_pairs
                 (commit lock, duplicate check, publish), by a store that committed before (as a
                 Ray worker's): mean and p95 over --commits commits;
- commit_scan:   what the duplicate check cost per commit before the index (a warmed scan);
- compact:       `compact` of the whole root: seconds, files before and after, unit folders left;
- after:         plan, commit and connect() again on the compacted root.

Prints one JSON object (seconds; milliseconds for commits).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.verify_bench import timed

REPO = Path(__file__).resolve().parents[1]
MEMBERS = 3


def _refs(i: int):
    from zoospectra.io.refs import ModelRef

    return [ModelRef(f"org/m{(i * MEMBERS + k)}", "r0", f"/m{i * MEMBERS + k}") for k in range(MEMBERS)]


def _tables(unit_id: str, tensor: str, uids: list[str]):
    import pyarrow as pa

    sys.path.insert(0, str(REPO / "tests"))
    from fixtures_store import one_unit  # small real units with the data contract's tables

    parts = [one_unit(unit_id, model_uid=u) for u in uids]
    out = {}
    for name in parts[0]:
        t = pa.concat_tables([p[name] for p in parts])
        out[name] = t.set_column(t.schema.get_field_index("tensor"), "tensor",
                                 pa.array([tensor] * t.num_rows, pa.string()))
    return out


def build_root(root: Path, n_units: int) -> None:
    """N units through commit_unit, with fsync switched off while building (only the build: every
    timed commit below fsyncs as always), so that 10,000 units take minutes on a shared disk."""
    import os

    from zoospectra.run.store import ResultsStore

    store = ResultsStore(root)
    fsync, os.fsync = os.fsync, lambda fd: None
    try:
        for i in range(n_units):
            refs, tensor = _refs(i), f"layers.{i % 224}.weight"
            uid = f"{i:024x}"
            assert store.commit_unit(uid, _tables(uid, tensor, [r.uid for r in refs]),
                                     done=[(r.uid, tensor) for r in refs])
    finally:
        os.fsync = fsync
    os.sync()


def files_under(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file() and "_staging" not in p.parts)


def plan(root: Path) -> tuple[set, set]:
    from zoospectra.run.store import ResultsStore

    store = ResultsStore(root)
    return store.done_pairs(), store.done_units()


def scan_pairs(root: Path) -> set:
    from zoospectra.run.store import ResultsStore

    return {(str(m), str(t)) for c in ResultsStore(root).committed().values() for m, t in c.manifest["done"]}


def commits(root: Path, first: int, n: int) -> list[float]:
    """Milliseconds per commit of n new units through the worker's commit path."""
    from zoospectra.run.plan import WorkUnit
    from zoospectra.run.unit import _commit_new_pairs, _store

    _store.cache_clear()
    out = []
    for i in range(first, first + n + 1):
        refs, tensor = _refs(i), f"layers.{i % 224}.weight"
        uid = f"{i:024x}"
        unit = WorkUnit(uid, refs[0], tensor, (8, 4), "linear", tuple(refs))
        tables = _tables(uid, tensor, [r.uid for r in refs])
        t0 = time.perf_counter()
        landed, members = _commit_new_pairs(str(root), unit, tables, list(refs))
        ms = (time.perf_counter() - t0) * 1e3
        assert landed and len(members) == MEMBERS
        if i > first:  # the first commit of a process loads what it has not seen: not counted
            out.append(ms)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", type=int, default=10_000)
    ap.add_argument("--commits", type=int, default=100)
    ap.add_argument("--keep", type=Path, default=None, help="build the root here and keep it")
    args = ap.parse_args()

    from zoospectra.run.compact import compact
    from zoospectra.run.store import ResultsStore
    from zoospectra.study.sql import connect

    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="store-bench-")
    root = args.keep or Path(tmp.name) / "results"
    t0 = time.perf_counter()
    build_root(root, args.units)
    out: dict = {"units": args.units, "build_s": round(time.perf_counter() - t0, 1)}

    plan_s, (pairs, units) = timed(lambda: plan(root))
    assert len(pairs) == args.units * MEMBERS and len(units) == args.units
    scan_s, ref = timed(lambda: scan_pairs(root), repeat=1)
    assert ref == pairs  # the index answers what the per-unit scan answers
    repair_s, _ = timed(lambda: ResultsStore(root).repair(), repeat=1)
    ms = commits(root, args.units, args.commits)
    warmed = ResultsStore(root)
    warmed.committed()
    scan_commit_s, _ = timed(lambda: warmed.committed(), repeat=3)
    out |= {"plan_s": round(plan_s, 3), "plan_scan_s": round(scan_s, 3),
            "plan_scan_over_plan": round(scan_s / plan_s, 1), "repair_s": round(repair_s, 2),
            "commit_ms_mean": round(statistics.mean(ms), 2),
            "commit_ms_p95": round(sorted(ms)[int(0.95 * (len(ms) - 1))], 2),
            "commit_scan_ms": round(scan_commit_s * 1e3, 1)}

    n_before, n_units = files_under(root), args.units + args.commits + 1
    connect_before_s, con = timed(lambda: connect(root), repeat=1)
    con.close()
    result = compact(root, grace_s=0)
    assert result.units == n_units and result.units_removed == n_units
    out |= {"files_before": n_before, "files_after": files_under(root),
            "compact_s": round(result.seconds, 1),
            "unit_folders_after": sum(1 for _ in (root / "units").iterdir())}

    plan2_s, (pairs2, _) = timed(lambda: plan(root))
    assert len(pairs2) == n_units * MEMBERS
    ms2 = commits(root, n_units, args.commits)
    connect_after_s, con = timed(lambda: connect(root), repeat=1)
    n = con.sql("SELECT count(*) FROM matrices").fetchall()[0][0]
    con.close()
    assert n == (n_units + args.commits + 1) * MEMBERS
    out |= {"after_plan_s": round(plan2_s, 3), "after_commit_ms_mean": round(statistics.mean(ms2), 2),
            "connect_before_s": round(connect_before_s, 2), "connect_after_s": round(connect_after_s, 2)}
    print(json.dumps(out))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
