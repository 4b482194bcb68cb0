"""A real PEFT-made PiSSA adapter on the shipped MiniLM: the loader's typed `base_rewritten` and
`warnings` fields reach the `matrices` table (no hand-built notes anywhere)."""
from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from zoospectra.adapters import open_artifact
from zoospectra.config import AnalysisConfig
from zoospectra.demo.zoo import build_zoo, lora
from zoospectra.io.refs import local_ref
from zoospectra.run.execute import run_plan
from zoospectra.run.plan import build_plan


@pytest.fixture(scope="module")
def pissa_and_plain(tmp_path_factory) -> tuple[Path, Path]:
    specs = [lora("pissa", 4, 8, targets=("query", "value"), init_lora_weights="pissa"),
             lora("plain", 4, 8, targets=("query", "value"))]
    pissa, plain = build_zoo(tmp_path_factory.mktemp("zoo"), specs, steps=2)
    return pissa, plain


def test_peft_saved_a_pissa_config(pissa_and_plain) -> None:
    """Guards the premise: PEFT itself wrote init_lora_weights = pissa, so the flag is derived."""
    art = open_artifact(pissa_and_plain[0])
    assert art.init.lower().startswith("pissa") and art.describe()["base_rewritten"] is True


def test_pissa_matrices_say_base_rewritten(minilm_dir, pissa_and_plain, tmp_path) -> None:
    pissa, plain = pissa_and_plain
    out = tmp_path / "results"
    cfg = AnalysisConfig(k_store=10, k_spec=8, sim_k=2)
    plan = build_plan(local_ref(str(minilm_dir), "minilm"), [local_ref(str(pissa), "pissa"),
                                                              local_ref(str(plain), "plain")], cfg)
    summary = run_plan(plan, str(out), executor="local")
    assert summary.n_failed == 0 and summary.n_member_errors == 0
    rows = duckdb.sql(f"""SELECT model_id, count(*), bool_and(base_rewritten), bool_or(base_rewritten),
                                 min(len(warnings)), max(len(warnings)),
                                 bool_and(list_any_value(warnings) LIKE '%modified base%')
                          FROM read_parquet('{out}/units/*/matrices.parquet', union_by_name = true)
                          GROUP BY model_id ORDER BY model_id""").fetchall()
    # 6 layers x (query, value) per adapter; every PiSSA matrix flagged and warned, no plain one
    assert rows[0][:6] == ("pissa", 12, True, True, 1, 1) and rows[0][6] is True
    assert rows[1][:6] == ("plain", 12, False, False, 0, 0)
