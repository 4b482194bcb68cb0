"""The reviewer studies (null, intruder-norms, groups, layer-map; issue 15) on the real study zoo
against the engine's own numbers (tests/fixtures_studies.py), and the report's closing note."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa
import pytest
from fixtures_studies import CFG, EngineNumbers, StudyZoo

from zoospectra.run.records import split_tensor_key
from zoospectra.study.studies import STUDIES, connect_scoped, run_study
from zoospectra.study.uncertainty import mean_ci


@pytest.fixture(scope="module")
def tables(study_zoo: StudyZoo) -> dict[str, pa.Table]:
    con = connect_scoped(study_zoo.root)
    try:
        return {name: run_study(con, STUDIES[name]) for name in ("null", "intruder-norms", "groups", "layer-map")}
    finally:
        con.close()


def _count(x: np.ndarray, k: int, eps: float) -> int:
    return int(np.count_nonzero(x[:k] < eps))


def test_null_study_matches_the_engine_draws(tables, engine: EngineNumbers) -> None:
    rows = {r["model_id"]: r for r in tables["null"].to_pylist()}
    assert set(rows) == set(engine.models())
    for model in engine.models():
        items = list(engine.of(model).values())
        observed = sum(_count(it.u.max_cos, CFG.k, CFG.eps) for it in items)
        sums = sum((it.null.max_cos_u[:, :CFG.k] < CFG.eps).sum(1) for it in items)   # [B] per draw
        r = rows[model]
        assert (r["n_intruders"], r["n_draws"], r["n_matrices"]) == (observed, CFG.null_draws, len(items))
        assert r["null_mean"] == pytest.approx(sums.mean())
        assert r["p_tail"] == pytest.approx((1 + np.sum(sums >= observed)) / (1 + CFG.null_draws))


def test_intruder_norms_match_the_engine(tables, engine: EngineNumbers) -> None:
    rows = tables["intruder-norms"].to_pylist()
    assert len(rows) == CFG.k * len(engine.items)
    for r in rows:
        it = engine.items[(r["model_id"], r["tensor"])]
        s = it.u.sigma[r["j"] - 1]
        assert r["share_w0"] == pytest.approx(s * s / it.norm_w0**2, rel=1e-6)
        assert r["share_dw"] == pytest.approx(s * s / it.norm_dw**2, rel=1e-6)
        assert r["intruder"] == bool(it.u.max_cos[r["j"] - 1] < CFG.eps)


def _per_model(engine: EngineNumbers) -> dict[str, dict[str, float]]:
    out = {}
    for model in engine.models():
        if "@step" in model:
            continue
        items = list(engine.of(model).values())
        n = sum(_count(it.u.max_cos, CFG.k, CFG.eps) for it in items)
        energy = sum(float(np.sum(it.u.sigma[:CFG.k][it.u.max_cos[:CFG.k] < CFG.eps] ** 2)) for it in items)
        out[model] = {"intruders_per_matrix": n / len(items),
                      "intruder_share_w0": energy / sum(it.norm_w0**2 for it in items),
                      "eff_rank_mean": float(np.mean([it.eff_rank for it in items]))}
    return out


def test_groups_study_intervals_over_the_engine_numbers(tables, engine: EngineNumbers) -> None:
    per = _per_model(engine)
    kinds = {"full_ft": "full"}
    rows = [r for r in tables["groups"].to_pylist() if r["grouping"] == "kind"]
    assert {r["grp"] for r in rows} == {"lora", "full"} and all(r["reference"] == "full" for r in rows)
    for r in rows:
        members = [m for m in per if kinds.get(m, "lora") == r["grp"]]
        values = [per[m][r["metric"]] for m in sorted(members)]
        assert r["n_artifacts"] == len(values) and r["mean"] == pytest.approx(np.mean(values), rel=1e-6)
        if len(values) > 1:     # the interval of the engine's values (order-free: resampling a
            ci = mean_ci(values, f"kind/{r['grp']}/{r['metric']}")  # set of equal values aside)
            assert r["lo"] == pytest.approx(ci.lo, rel=1e-6, abs=1e-12)
            assert r["hi"] == pytest.approx(ci.hi, rel=1e-6, abs=1e-12)
            assert r["lo"] <= r["mean"] <= r["hi"]
            assert r["diff"] == pytest.approx(r["mean"] - per["full_ft"][r["metric"]], rel=1e-6, abs=1e-12)


def test_layer_map_matches_the_engine(tables, engine: EngineNumbers) -> None:
    rows = tables["layer-map"].to_pylist()
    cells: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
    for (model, tensor), it in engine.items.items():
        if "@step" in model:
            continue
        layer, module = split_tensor_key(tensor)
        got = next(r for r in rows if r["level"] == "model" and r["model_id"] == model
                   and r["layer"] == layer and r["module"] == module)
        assert got["intruders"] == _count(it.u.max_cos, CFG.k, CFG.eps)
        assert got["eff_rank"] == pytest.approx(it.eff_rank, rel=1e-6)
        cells[("full" if model == "full_ft" else "lora", layer, module)].append(
            (_count(it.u.max_cos, CFG.k, CFG.eps), it.eff_rank))
    groups = [r for r in rows if r["level"] == "group"]
    assert len(groups) == len(cells)
    for r in groups:
        vals = cells[(r["kind"], r["layer"], r["module"])]
        assert r["n_models"] == len(vals)
        assert r["intruders"] == pytest.approx(np.mean([v[0] for v in vals]))
        assert r["eff_rank"] == pytest.approx(np.mean([v[1] for v in vals]), rel=1e-6)
        assert (r["intruders_lo"] is None) == (len(vals) == 1)


def test_report_closes_with_the_null_table(study_zoo: StudyZoo, tmp_path) -> None:
    from zoospectra.study.report import NULL_NOTE_SQL, build_report

    text = build_report(study_zoo.root, tmp_path / "report").read_text(encoding="utf-8")
    assert 'id="closing"' in text and "tail_probability" in text and "null_mean" in text
    for name in ("null", "intruder-norms", "groups", "layer-map"):
        assert f'id="{name}"' in text
    closing = text[text.index('id="closing"'):]
    assert "lora_r8_a16" in closing and "full_ft" in closing
    assert NULL_NOTE_SQL.split(" FROM ")[1].split(" ORDER")[0] in closing
