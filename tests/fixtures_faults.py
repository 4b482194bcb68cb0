"""Shared by the reliability tests (test_faults, test_secrets, test_load) and bench/load_crawl.py:
three tiny real LoRAs on MiniLM's query matrices, and row comparisons that ignore bookkeeping.

    from fixtures_faults import tiny_loras  # noqa: F401   (a session fixture)
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import duckdb
import pytest

from zoospectra.demo.zoo import build_zoo, lora

# Columns that differ between runs of the same work: bookkeeping, and the batch a row came from.
VOLATILE = {"run_id", "unit_id", "seconds", "device", "created_at", "at"}
# Per-member tables: a member's rows do not depend on which batch it was analysed in (pairs do).
MEMBER_TABLES = ("matrices", "vectors", "spectra", "similarity")
# Natural key of each per-member table: a duplicate is two rows with the same key.
# (spectra rows of W0 carry the base's uid and are written once per unit by design: not counted.)
KEYS = {"matrices": ("model_uid", "tensor"), "vectors": ("model_uid", "tensor", "side", "j"),
        "spectra": ("model_uid", "tensor", "which", "idx"), "similarity": ("model_uid", "tensor", "i", "j")}


def tiny_lora_specs() -> list:
    return [lora("tiny_a", 4, 8, targets=("query",)),
            lora("tiny_b", 4, 8, targets=("query",), use_rslora=True),
            lora("tiny_c", 2, 4, targets=("query",))]


@pytest.fixture(scope="session")
def tiny_loras(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three real LoRAs (6 query matrices each). Built once per session: build_zoo skips an output
    that is already there, and every module asks for the same directory."""
    return build_zoo(tmp_path_factory.getbasetemp() / "tiny_loras", tiny_lora_specs(), steps=3)


def unit_files(root: Path, table: str) -> list[str]:
    return sorted(str(p) for p in (root / "units").glob(f"*/{table}.parquet"))


def table_rows(root: Path, table: str, models: Optional[Iterable[str]] = None) -> list[tuple]:
    """Rows of a table under a results root, volatile columns dropped, sorted (optionally only of
    some model ids)."""
    files = unit_files(root, table)
    if not files:
        return []
    rel = duckdb.read_parquet(files)
    cols = [c for c in rel.columns if c not in VOLATILE]
    if models is not None:
        rel = rel.filter("model_id IN (" + ", ".join(f"'{m}'" for m in models) + ")")
    return sorted(rel.select(", ".join(f'"{c}"' for c in cols)).fetchall(), key=repr)


def duplicates(root: Path) -> dict[str, int]:
    """Rows beyond the first per natural key, per table, over every committed unit."""
    out = {}
    for table, key in KEYS.items():
        files = unit_files(root, table)
        if not files:
            out[table] = 0
            continue
        cols = ", ".join(key)
        where = " WHERE which <> 'w0'" if table == "spectra" else ""
        ((n, distinct),) = duckdb.sql(f"SELECT count(*), count(DISTINCT ({cols})) "
                                      f"FROM read_parquet({files!r}){where}").fetchall()
        out[table] = n - distinct
    return out
