"""Row helpers shared by every test that reads a results root: one `table_rows`, one comparison."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import duckdb
import pytest

# Columns that differ between runs of the same work: bookkeeping, and the batch a row came from.
VOLATILE = frozenset({"run_id", "unit_id", "seconds", "device", "created_at", "at"})


def unit_files(root: Path, table: str) -> list[str]:
    return sorted(str(p) for p in (root / "units").glob(f"*/{table}.parquet"))


def table_rows(root: Path, table: str, *, run_id: str | None = None, models: Iterable[str] | None = None,
               volatile: Iterable[str] = VOLATILE) -> list[tuple]:
    """Rows of a per-unit table under a results root, `volatile` columns dropped, optionally only
    of one run or some model ids; sorted by their non-float values first, so two runs whose
    floats differ in the last bits still line up row for row (see assert_rows_close)."""
    files = unit_files(root, table)
    if not files:
        return []
    rel = duckdb.read_parquet(files)
    cols = [c for c in rel.columns if c not in set(volatile)]
    if run_id is not None:
        rel = rel.filter(f"run_id = '{run_id}'")
    if models is not None:
        rel = rel.filter("model_id IN (" + ", ".join(f"'{m}'" for m in models) + ")")
    rows = rel.select(", ".join(f'"{c}"' for c in cols)).fetchall()
    return sorted(rows, key=lambda r: (repr(tuple(x for x in r if not isinstance(x, float))), repr(r)))


def assert_rows_close(got: list[tuple], want: list[tuple], rel: float = 1e-4) -> None:
    """Same rows; floats equal to float32-SVD precision (thread counts change LAPACK's rounding)."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g, w, strict=True):
            if isinstance(a, float) and isinstance(b, float):
                assert a == pytest.approx(b, rel=rel, abs=1e-6), (g, w)
            else:
                assert a == b, (g, w)
