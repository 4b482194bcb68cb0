"""Studies: every figure's numbers against the engine, every figure read back as an image.

The zoo is real (PEFT adapters and a full fine-tune on the shipped MiniLM base, analysed by the
real planner and executor); the reference numbers come from spectral.analyze_batch on the same
matrices (tests/fixtures_studies.py), or straight from the adapter files, never from the tables.
"""
from __future__ import annotations

import json
import math
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from fixtures_studies import BASE_ID, CFG, CKPT_STEPS, EngineNumbers, StudyZoo, one_thread

from zoospectra.errors import ConfigError, ResultsError
from zoospectra.study.studies import (
    STUDIES,
    Scope,
    checkpoint_refs,
    connect_scoped,
    parse_param,
    run_study,
    save_plot,
    sql_literal,
    svg_text,
)

EPS_GRID = [i / 10 for i in range(1, 10)]
LORAS = ["lora_r2_a4", "lora_r8_a16", "lora_r2_a8", "lora_r8_a8"]
CKPTS = [f"lora_ckpt@step{n}" for n in CKPT_STEPS]


@pytest.fixture(scope="module")
def tables(study_zoo: StudyZoo) -> dict[str, pa.Table]:
    con = connect_scoped(study_zoo.root)
    try:
        return {name: run_study(con, study) for name, study in STUDIES.items()}
    finally:
        con.close()


def _count(max_cos: np.ndarray, k: int, eps: float) -> int:
    return int(np.count_nonzero(max_cos[:k] < eps))


# --- numbers vs the engine -------------------------------------------------------------------
def test_intruders_eps_matches_engine(tables, engine: EngineNumbers) -> None:
    rows = tables["intruders-eps"].to_pylist()
    got = {(r["model_id"], r["eps"]): (r["n_intruders"], r["n_intruders_v"]) for r in rows}
    assert {m for m, _ in got} == set(engine.models())
    for model in engine.models():
        items = engine.of(model).values()
        for eps in EPS_GRID:
            want = (sum(_count(it.u.max_cos, CFG.k, eps) for it in items),
                    sum(_count(it.v.max_cos, CFG.k, eps) for it in items))
            assert got[(model, _eps(got, model, eps))] == want, (model, eps)
    assert sum(n for n, _ in got.values()) > 0, "the zoo should have intruders somewhere"
    kinds = {r["model_id"]: (r["kind"], r["r"]) for r in rows}
    assert kinds["full_ft"] == ("full", None) and kinds["lora_r8_a16"] == ("lora", 8)


def _eps(got: dict, model: str, eps: float) -> float:
    """The eps key as DuckDB computed it (i / 10 in floating point)."""
    return next(e for m, e in got if m == model and abs(e - eps) < 1e-9)


def test_intruders_fraction_matches_engine_and_stops_at_k_store(tables, engine: EngineNumbers) -> None:
    rows = tables["intruders-fraction"].to_pylist()
    fractions = sorted({r["fraction"] for r in rows})
    # K_store = 32 of min(m, n) = 384 everywhere: fractions up to 32/384 are answerable, no more
    assert fractions == [0.005, 0.01, 0.02, 0.03, 0.05, 0.08]
    for r in rows:
        items = engine.of(r["model_id"])
        k_f = {t: max(1, math.ceil(r["fraction"] * min(engine.shapes[t]))) for t in items}
        assert r["n_intruders"] == sum(_count(it.u.max_cos, k_f[t], 0.5) for t, it in items.items())
        assert r["n_vectors"] == sum(k_f.values())
        assert r["intruder_share"] == pytest.approx(r["n_intruders"] / r["n_vectors"])


def test_effective_rank_matches_engine(tables, engine: EngineNumbers) -> None:
    from zoospectra.run.records import split_tensor_key

    rows = tables["effective-rank"].to_pylist()
    assert len(rows) == len(engine.items)
    for r in rows:
        (tensor,) = [t for t in engine.of(r["model_id"])
                     if split_tensor_key(t) == (r["layer"], r["module"])]
        it = engine.items[(r["model_id"], tensor)]
        if it.eff_rank is None:  # dW = 0 (the unused pooler of the full fine-tune)
            assert r["eff_rank"] is None
        else:
            assert r["eff_rank"] == pytest.approx(it.eff_rank, rel=1e-6)
            assert r["rel_update"] == pytest.approx(it.rel_update, rel=1e-6)


def test_similarity_picks_the_matrix_with_most_intruders(tables, engine: EngineNumbers) -> None:
    rows = tables["similarity"].to_pylist()
    model, tensor = rows[0]["model_id"], rows[0]["tensor"]
    most = max(it.intruders_u for it in engine.items.values())
    it = engine.items[(model, tensor)]
    assert it.intruders_u == most > 0
    assert len(rows) == it.similarity.size == CFG.sim_k ** 2
    for r in rows:
        assert r["value"] == pytest.approx(it.similarity[r["i"] - 1, r["j"] - 1], abs=1e-6)
        assert r["intruder_j"] == bool(it.u.max_cos[r["j"] - 1] < 0.5)
    assert sum(r["intruder_j"] for r in rows if r["i"] == 1) == it.intruders_u


def test_similarity_of_a_named_matrix(study_zoo: StudyZoo, engine: EngineNumbers) -> None:
    tensor = "encoder.layer.1.attention.self.value.weight"
    con = connect_scoped(study_zoo.root)
    try:
        table = run_study(con, STUDIES["similarity"], {"model_name": "lora_r2_a8", "tensor_name": tensor})
    finally:
        con.close()
    it = engine.items[("lora_r2_a8", tensor)]
    grid = np.zeros_like(it.similarity)
    for r in table.to_pylist():
        grid[r["i"] - 1, r["j"] - 1] = r["value"]
    np.testing.assert_allclose(grid, it.similarity, atol=1e-6)


def test_checkpoints_in_step_order_match_engine(tables, engine: EngineNumbers) -> None:
    rows = tables["checkpoints"].to_pylist()
    assert [(r["series"], r["step"]) for r in rows] == [("lora_ckpt", n) for n in CKPT_STEPS]
    for r in rows:
        items = engine.of(r["model_id"]).values()
        assert r["n_intruders"] == sum(it.intruders_u for it in items)
        assert r["eff_rank_mean"] == pytest.approx(np.mean([it.eff_rank for it in items]), rel=1e-6)
    # the update grows with training
    norms = [r["rel_update_mean"] for r in rows]
    assert norms == sorted(norms) and norms[0] < norms[-1]


def test_alpha_rule_and_numbers(tables, engine: EngineNumbers) -> None:
    rows = {r["model_id"]: r for r in tables["alpha"].to_pylist()}
    assert set(rows) == set(LORAS)           # checkpoints of a run are not part of the sweep
    assert {m: rows[m]["alpha_rule"] for m in LORAS} == {
        "lora_r2_a4": "alpha = 2r", "lora_r8_a16": "alpha = 2r",
        "lora_r2_a8": "alpha = 8", "lora_r8_a8": "alpha = 8"}
    for model, r in rows.items():
        items = engine.of(model).values()
        assert r["n_intruders"] == sum(it.intruders_u for it in items)
        assert r["rel_update_mean"] == pytest.approx(np.mean([it.rel_update for it in items]), rel=1e-6)


def test_ab_balance_matches_the_adapter_files(tables, study_zoo: StudyZoo) -> None:
    from safetensors.torch import load_file

    rows = tables["ab-balance"].to_pylist()
    assert {r["model_id"] for r in rows} == set(LORAS) | set(CKPTS)
    for r in rows:
        weights = load_file(str(Path(study_zoo.refs[r["model_id"]].location) / "adapter_model.safetensors"))
        stem = "base_model.model." + r["tensor"][: -len(".weight")]
        norm_a = float(weights[f"{stem}.lora_A.weight"].double().norm())
        norm_b = float(weights[f"{stem}.lora_B.weight"].double().norm())
        assert r["norm_a"] == pytest.approx(norm_a, rel=1e-5)
        assert r["norm_b"] == pytest.approx(norm_b, rel=1e-5)
        assert r["ab_ratio"] == pytest.approx(norm_b / norm_a, rel=1e-5)


def test_pairs_match_engine(tables, engine: EngineNumbers) -> None:
    rows = tables["pairs"].to_pylist()
    grids: dict[tuple[str, str], dict] = {}
    for r in rows:
        grids.setdefault((r["model_id_a"], r["model_id_b"]), {})[(r["i"], r["j"])] = r
    assert {frozenset(p) for p in grids} == {frozenset((a, b)) for a, b, _ in engine.pairs}
    for (a, b), cells in grids.items():
        tensors = [t for (x, y, t) in engine.pairs if (x, y) == (a, b)]
        want = np.mean([engine.pairs[(a, b, t)] for t in tensors], axis=0)
        assert want.shape == (max(i for i, _ in cells), max(j for _, j in cells)), (a, b)
        for (i, j), r in cells.items():
            assert r["phi"] == pytest.approx(want[i - 1, j - 1], abs=1e-6)
            assert r["n_matrices"] == len(tensors)
    # Hu et al.: a rank-2 and a rank-8 adapter of one task share their top direction far more
    # than random 2- and 8-dim subspaces of R^384 would (expected phi(1, 1) ~ 1/384)
    top = [cells[(1, 1)]["phi"] for (a, b), cells in grids.items() if {a, b} == {"lora_r2_a4", "lora_r8_a16"}]
    assert top and top[0] > 10 / 384


# --- figures ---------------------------------------------------------------------------------
EXPECTED_TEXT = {
    "intruders-eps": "lora_r8_a16", "intruders-fraction": "lora_r2_a8",
    "effective-rank": "attention.self.query", "similarity": "pre-trained singular vector",
    "checkpoints": "lora_ckpt", "alpha": "alpha = 2r", "ab-balance": "lora_r8_a8",
    "pairs": "phi(i, j)", "null": "random-direction null", "intruder-norms": "||W0||_F^2",
    "groups": "bootstrap intervals", "layer-map": "effective rank", "components": "attention",
}


@pytest.mark.parametrize("name", list(STUDIES))
def test_figure_reads_back(study_zoo: StudyZoo, tables, tmp_path: Path, name: str) -> None:
    """The PNG of `zoospectra plot` decodes to a drawn figure; the report's inline SVG parses
    and carries its labels as text."""
    import matplotlib.image as mpimg

    out = save_plot(study_zoo.root, name, tmp_path / f"{name}.png")
    img = mpimg.imread(out)                        # [h, w, 4] floats in [0, 1]
    h, w = img.shape[:2]
    assert h > 200 and w > 300
    rgb = (img[..., :3] * 255).round().astype(np.uint8).reshape(-1, 3)
    colors = np.unique(rgb, axis=0)
    assert len(colors) > 20, f"{name}: {len(colors)} colours, the figure looks blank"
    ink = np.mean(np.any(rgb < 200, axis=1))       # share of non-white pixels
    assert 0.01 < ink < 0.9, f"{name}: {ink:.3f} of the pixels are drawn"

    study = STUDIES[name]
    root = ET.fromstring(svg_text(study.plot(tables[name], study.params()), salt=name))
    assert root.tag.endswith("svg")
    texts = " ".join(t.text or "" for t in root.iter() if t.tag.endswith("text"))
    assert EXPECTED_TEXT[name] in texts, f"{name}: {texts[:300]}"


# --- scope, parameters, errors ---------------------------------------------------------------
def test_scope_by_kind_and_base(study_zoo: StudyZoo) -> None:
    con = connect_scoped(study_zoo.root, Scope(kinds=("full",)))
    try:
        models = {r["model_id"] for r in run_study(con, STUDIES["intruders-eps"]).to_pylist()}
        assert models == {"full_ft"}
        assert run_study(con, STUDIES["pairs"]).num_rows == 0   # pairs need both sides in scope
        assert con.sql("SELECT DISTINCT model_id FROM vectors").to_arrow_table().num_rows == 1
    finally:
        con.close()
    con = connect_scoped(study_zoo.root, Scope(base=BASE_ID, kinds=("lora",)))
    try:
        models = {r["model_id"] for r in run_study(con, STUDIES["ab-balance"]).to_pylist()}
        assert models == set(LORAS) | set(CKPTS)
    finally:
        con.close()
    con = connect_scoped(study_zoo.root, Scope(base="some/other-base"))
    try:
        assert run_study(con, STUDIES["effective-rank"]).num_rows == 0
    finally:
        con.close()


def test_parameters_reach_the_query(study_zoo: StudyZoo, engine: EngineNumbers) -> None:
    study = STUDIES["intruders-eps"]
    assert study.sql({"k": 3}) == "SELECT * FROM study_intruders_eps(k := 3)"
    con = connect_scoped(study_zoo.root)
    try:
        rows = run_study(con, study, {"k": 3}).to_pylist()
    finally:
        con.close()
    got = {r["model_id"]: r["n_intruders"] for r in rows if abs(r["eps"] - 0.5) < 1e-9}
    for model in engine.models():
        assert got[model] == sum(_count(it.u.max_cos, 3, 0.5) for it in engine.of(model).values())
    with pytest.raises(ConfigError, match="no parameter 'kk'"):
        study.sql({"kk": 3})
    con = connect_scoped(study_zoo.root)
    try:  # more vectors than the analysis stored (K_store = 32): refused, not undercounted
        with pytest.raises(ResultsError, match="intruders-eps.*--k-store"):
            run_study(con, study, {"k": 40})
    finally:
        con.close()


def test_param_parsing_and_literals() -> None:
    assert parse_param("k=5") == ("k", 5)
    assert parse_param("eps=0.25") == ("eps", 0.25)
    assert parse_param("fractions=0.1,0.5") == ("fractions", [0.1, 0.5])
    assert parse_param("model_name=o'brien/x") == ("model_name", "o'brien/x")
    assert sql_literal("o'brien/x") == "'o''brien/x'"
    assert sql_literal(None) == "NULL"
    with pytest.raises(ConfigError):
        parse_param("no equals sign")


def test_empty_study_and_bad_names_are_typed_errors(study_zoo: StudyZoo, tmp_path: Path) -> None:
    with pytest.raises(ResultsError, match="needs|pairs"):
        save_plot(study_zoo.root, "pairs", tmp_path / "p.png", scope=Scope(kinds=("full",)))
    with pytest.raises(ConfigError, match="unknown study"):
        save_plot(study_zoo.root, "fig99", tmp_path / "x.png")
    with pytest.raises(ConfigError, match=".png or .svg"):
        save_plot(study_zoo.root, "alpha", tmp_path / "x.jpg")


def test_checkpoint_refs_name_and_order(study_zoo: StudyZoo, tmp_path: Path) -> None:
    refs = checkpoint_refs(study_zoo.paths["lora_ckpt"])
    assert [r.model_id for r in refs] == CKPTS
    assert len({r.revision for r in refs}) == 3
    assert [r.model_id for r in checkpoint_refs(study_zoo.paths["lora_ckpt"], "run7")] == [
        f"run7@step{n}" for n in CKPT_STEPS]
    with pytest.raises(ConfigError, match="checkpoint-<N>"):
        checkpoint_refs(tmp_path)


# --- crawl results ---------------------------------------------------------------------------
def test_studies_run_on_crawl_results(study_zoo: StudyZoo, tables, fake_hub, hub_options,
                                      tmp_path: Path) -> None:
    """The same adapters published on the loopback Hub and crawled give the same study rows."""
    from fixtures_hub import publish_dir

    from zoospectra.demo.zoo import minilm_dir
    from zoospectra.jobs.spec import CrawlSpec
    from zoospectra.run.crawl import run_crawl

    base_dir = tmp_path / "base"
    base_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(minilm_dir() / name, base_dir / name)
    publish_dir(fake_hub, BASE_ID, base_dir)
    for model in ("lora_r2_a4", "lora_r8_a16"):
        adapter = tmp_path / model
        shutil.copytree(study_zoo.paths[model], adapter)
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = BASE_ID           # as on the Hub
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        publish_dir(fake_hub, f"u/{model}", adapter, base_model=BASE_ID, relation="adapter")
    out = tmp_path / "crawl"
    spec = CrawlSpec.from_dict({"name": "studies", "base_models": [BASE_ID], "out": str(out),
                                "analysis": {"pairs": True}})
    with one_thread():
        (crawled,) = run_crawl(spec, options=hub_options, executor="local").bases
    assert crawled.units_failed == 0 and crawled.units_done > 0

    con = connect_scoped(out)
    try:
        crawl_tables = {name: run_study(con, study) for name, study in STUDIES.items()}
    finally:
        con.close()
    for name in ("intruders-eps", "intruders-fraction", "effective-rank", "alpha", "ab-balance", "pairs"):
        assert crawl_tables[name].num_rows > 0, name
        save_plot(out, name, tmp_path / f"crawl-{name}.png")
    local = {(r["model_id"], round(r["eps"], 3)): r["n_intruders"]
             for r in tables["intruders-eps"].to_pylist()}
    for r in crawl_tables["intruders-eps"].to_pylist():
        assert r["model_id"].startswith("u/")
        assert r["n_intruders"] == local[(r["model_id"][2:], round(r["eps"], 3))]
