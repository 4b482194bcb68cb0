"""Cost of a results root that checks itself, on a synthetic root of N small units.

    python -m bench.verify_bench [--units 1000 --vectors 96 --keep DIR]

Writes N units with the store's own commit API (ResultsStore.commit_unit: matrices + vectors
+ spectra of 3 models each, as in tests/fixtures_store.py), then times, in one run:

- verify:   `ResultsStore.verify()`, the full pass of `zoospectra verify` (sha256 of every file,
            Parquet footers, row counts), and what analyze/crawl run before planning;
- scan:     the cheap per-unit checks that connect() runs (no hashing);
- connect:  zoospectra.study.sql.connect() (scan + building the views over the explicit list);
- query:    SELECT count(*) FROM vectors through the views;
- glob:     the same count through a plain read_parquet glob (what views read before this change).

Prints one JSON line: seconds of each, and verify/glob, connect/glob, query/glob ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_root(root: Path, n_units: int, n_vectors: int) -> int:
    """N units through commit_unit; returns the number of files written under units/."""
    sys.path.insert(0, str(REPO / "tests"))
    from fixtures_store import one_unit  # small real units with the data contract's tables

    from zoospectra.run.store import ResultsStore

    store = ResultsStore(root)
    for i in range(n_units):
        uid = f"{i:024x}"
        tables = {}
        for m in ("a1", "b2", "c3"):
            one = one_unit(uid, model_uid=m, n_vectors=n_vectors)
            for name, t in one.items():
                tables[name] = t if name not in tables else _concat(tables[name], t)
        assert store.commit_unit(uid, tables, done=[(m, f"t{i}") for m in ("a1", "b2", "c3")])
    return sum(1 for _ in (root / "units").glob("*/*"))


def _concat(a, b):
    import pyarrow as pa

    return pa.concat_tables([a, b])


def timed(fn, repeat: int = 3) -> tuple[float, object]:
    """Best of `repeat` wall times (the machine is shared) and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", type=int, default=1000)
    ap.add_argument("--vectors", type=int, default=96, help="vector rows per model and unit")
    ap.add_argument("--keep", type=Path, default=None, help="build the root here and keep it")
    args = ap.parse_args()

    import duckdb

    from zoospectra.run.store import ResultsStore
    from zoospectra.study.sql import connect

    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="verify-bench-")
    root = args.keep or Path(tmp.name) / "results"
    t0 = time.perf_counter()
    n_files = build_root(root, args.units, args.vectors)
    build_s = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in (root / "units").rglob("*") if p.is_file())

    verify_s, record = timed(lambda: ResultsStore(root).verify())
    assert record["healthy"] and record["units_ok"] == args.units, record
    scan_s, _ = timed(lambda: ResultsStore(root).committed())

    def via_views() -> int:
        con = connect(root)
        try:
            return con.execute("SELECT count(*) FROM vectors").fetchall()[0][0]
        finally:
            con.close()

    connect_s, _ = timed(lambda: connect(root).close())
    views_s, n_views = timed(via_views)
    glob_s, n_glob = timed(lambda: duckdb.sql(
        f"SELECT count(*) FROM read_parquet('{root}/units/*/vectors.parquet')").fetchall()[0][0])
    assert n_views == n_glob == args.units * 3 * args.vectors
    print(json.dumps({
        "units": args.units, "files": n_files, "mib": round(size / 2**20, 1),
        "build_s": round(build_s, 2), "verify_s": round(verify_s, 3), "scan_s": round(scan_s, 3),
        "connect_s": round(connect_s, 3), "connect_and_query_s": round(views_s, 3),
        "glob_query_s": round(glob_s, 3),
        "verify_per_unit_ms": round(1000 * verify_s / args.units, 3),
        "ratio_verify_over_glob_query": round(verify_s / glob_s, 2),
        "ratio_connect_and_query_over_glob_query": round(views_s / glob_s, 2),
        "cpus": os.cpu_count(),
    }))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
