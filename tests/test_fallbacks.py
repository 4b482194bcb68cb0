"""Fast-engine dense-SVD fallbacks are counted, not printed: per unit -> run summary -> runs table.

The solver is the real one with its expansion budget set to zero, so every Krylov solve falls
back; the independent count is the number of solves that returned method 'dense-fallback'.
"""
from __future__ import annotations

import logging
from pathlib import Path

import duckdb
import pytest

import zoospectra.spectral.fast as fast_mod
from zoospectra.config import AnalysisConfig
from zoospectra.io.refs import local_ref
from zoospectra.run.execute import run_plan
from zoospectra.run.plan import build_plan


def test_fallbacks_are_counted_into_the_summary_and_the_runs_table(
        monkeypatch: pytest.MonkeyPatch, tiny_loras: list[Path], minilm_dir: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(fast_mod, "DENSE_FRACTION", 10.0)  # use the solver at CI sizes
    seen = {"fallbacks": 0, "solves": 0}
    real = fast_mod.top_triplets

    def starved(*args, **kwargs):
        kwargs["max_iter"] = 0  # no expansion allowed: the solver must fall back
        t = real(*args, **kwargs)
        seen["solves"] += 1
        seen["fallbacks"] += t.method == "dense-fallback"
        return t

    monkeypatch.setattr(fast_mod, "top_triplets", starved)
    refs = [local_ref(p, f"m{i}") for i, p in enumerate(tiny_loras[:2])]
    plan = build_plan(local_ref(minilm_dir), refs, AnalysisConfig(mode="fast", k=8, k_store=8, k_spec=8),
                      batch_size=1)
    out = tmp_path / "r"
    with caplog.at_level(logging.DEBUG, logger="zoospectra"):
        summary = run_plan(plan, str(out), executor="local", device="cpu")
    assert summary.n_done == len(plan.units) == 12
    assert seen["fallbacks"] > 0 and seen["fallbacks"] == seen["solves"]
    assert summary.n_solver_fallbacks == seen["fallbacks"]
    ((stored,),) = duckdb.sql(f"SELECT n_solver_fallbacks FROM read_parquet('{out}/runs/*.parquet')").fetchall()
    assert stored == seen["fallbacks"]
    fast_records = [r for r in caplog.records if r.name == fast_mod.log.name]
    assert fast_records and all(r.levelno == logging.DEBUG for r in fast_records)  # never a warning


def test_a_run_without_fallbacks_records_zero(tiny_loras: list[Path], minilm_dir: Path, tmp_path: Path) -> None:
    plan = build_plan(local_ref(minilm_dir), [local_ref(tiny_loras[0], "a")],
                      AnalysisConfig(k=8, k_store=8, k_spec=8), batch_size=4)
    summary = run_plan(plan, str(tmp_path / "r"), executor="local", device="cpu")  # exact mode: no solver
    assert summary.n_solver_fallbacks == 0
    ((stored,),) = duckdb.sql(f"SELECT n_solver_fallbacks FROM read_parquet('{tmp_path}/r/runs/*.parquet')").fetchall()
    assert stored == 0
