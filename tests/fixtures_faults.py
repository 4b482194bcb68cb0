"""Shared by the reliability tests (test_faults, test_secrets, test_load) and bench/load_crawl.py:
three tiny real LoRAs on MiniLM's query matrices, and row comparisons that ignore bookkeeping.

The fixture is registered by conftest.py (pytest_plugins); tests take `tiny_loras` as an argument.
"""
from __future__ import annotations

from pathlib import Path

import duckdb
import pytest
from rows import unit_files

from zoospectra.demo.zoo import build_zoo, lora

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
