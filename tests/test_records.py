"""records.unit_tables: exact schemas, 1-based indices, orientation of grids, and every value
checked against a plain numpy float64 reference of the same matrices."""
from __future__ import annotations

import math

import duckdb
import numpy as np
import pyarrow as pa
import pytest
import torch

from zoospectra.config import AnalysisConfig
from zoospectra.run.records import TABLE_NAMES, UnitContext, split_tensor_key, unit_tables
from zoospectra.schemas.tables import schema_for
from zoospectra.spectral import analyze_batch
from zoospectra.updates import MatrixUpdate

TENSOR = "model.layers.3.self_attn.q_proj.weight"
M, N = 40, 56  # m < n: left vectors are the short side



@pytest.mark.parametrize("key,layer,module", [
    ("encoder.layer.3.attention.self.query.weight", 3, "attention.self.query"),
    ("model.layers.0.self_attn.q_proj.weight", 0, "self_attn.q_proj"),
    ("transformer.h.1.attn.c_attn.weight", 1, "attn.c_attn"),
    ("model.layers.12.mlp.experts.3.w1.weight", 12, "mlp.experts.3.w1"),
    ("lm_head.weight", None, "lm_head"),
    ("pooler.dense.weight", None, "pooler.dense"),
    ("embeddings.word_embeddings.weight", None, "embeddings.word_embeddings"),
])
def test_split_tensor_key(key: str, layer, module: str) -> None:
    assert split_tensor_key(key) == (layer, module)


# --- a unit with three members -----------------------------------------------------------
def _unit() -> tuple[np.ndarray, list[MatrixUpdate], UnitContext]:
    rng = np.random.default_rng(11)
    u0 = np.linalg.qr(rng.standard_normal((M, M)))[0]
    v0 = np.linalg.qr(rng.standard_normal((N, M)))[0]
    w0 = (u0 * (5.0 * 0.85 ** np.arange(M))) @ v0.T
    b1, a1 = rng.standard_normal((M, 4)) * 2.0, rng.standard_normal((4, N)) / math.sqrt(N)
    b2, a2 = rng.standard_normal((M, 6)), rng.standard_normal((6, N)) / math.sqrt(N)
    updates = [
        MatrixUpdate(tensor=TENSOR, kind="lora", shape=(M, N), B=torch.tensor(b1), A=torch.tensor(a1),
                     rank=4, alpha=8.0, scale=2.0, norm_a=1.5, norm_b=3.0),
        MatrixUpdate(tensor=TENSOR, kind="lora", shape=(M, N), B=torch.tensor(b2), A=torch.tensor(a2),
                     rank=6, alpha=6.0, scale=1.0, norm_a=0.0, norm_b=1.0,
                     base_rewritten=True, warnings=("dW is relative to a modified base",)),
        MatrixUpdate(tensor=TENSOR, kind="full", shape=(M, N), role="linear",
                     dense=torch.tensor(np.zeros((M, N)))),  # an untouched matrix: dW = 0
    ]
    ctx = UnitContext(run_id="run-1", unit_id="unit-1", base_uid="base-uid", base_id="org/base",
                      tensor=TENSOR, members=(("uid-a", "org/a"), ("uid-b", "org/b"), ("uid-c", "org/c")))
    return w0, updates, ctx


CFG = AnalysisConfig(k=10, eps=0.5, k_store=12, k_spec=8, sim_k=5, pairs=True, dtype="float64")


@pytest.fixture(scope="module")
def unit():
    w0, updates, ctx = _unit()
    analysis = analyze_batch(torch.tensor(w0), updates, CFG)
    return w0, updates, ctx, analysis, unit_tables(ctx, updates, analysis, CFG)


def _rows(table: pa.Table, **where) -> list[dict]:
    return [r for r in table.to_pylist() if all(r[k] == v for k, v in where.items())]


def test_tables_have_exactly_the_contract_schemas(unit) -> None:
    *_, tables = unit
    assert set(tables) == set(TABLE_NAMES) == {"matrices", "vectors", "spectra", "similarity", "pairs",
                                              "null_vectors"}
    assert tables["null_vectors"].num_rows == 0          # null_draws = 0: no null rows
    for name, table in tables.items():
        assert table.schema.equals(schema_for(name), check_metadata=True), name
        for field in table.schema:  # declared non-null columns really hold no nulls
            if not field.nullable:
                assert table.column(field.name).null_count == 0, (name, field.name)
    counts = {name: t.num_rows for name, t in tables.items()}
    assert counts == {"matrices": 3, "vectors": 3 * 2 * 12, "spectra": 8 + 3 * 2 * 8,
                      "similarity": 3 * 25, "pairs": 4 * 6 + 4 * 0 + 6 * 0, "null_vectors": 0}


def test_matrices_rows(unit) -> None:
    w0, updates, ctx, _, tables = unit
    rows = tables["matrices"].to_pylist()
    for row, upd, (uid, mid) in zip(rows, updates, ctx.members, strict=True):
        dw = upd.materialize(torch.float64).numpy()
        assert (row["model_uid"], row["model_id"], row["base_uid"]) == (uid, mid, "base-uid")
        assert (row["run_id"], row["unit_id"], row["tensor"]) == ("run-1", "unit-1", TENSOR)
        assert (row["layer"], row["module"], row["m"], row["n"]) == (3, "self_attn.q_proj", M, N)
        assert (row["kind"], row["role"], row["rank"], row["alpha"], row["scale"]) == (
            upd.kind, upd.role, upd.rank, upd.alpha, upd.scale)
        assert (row["mode"], row["device"], row["intr_k"], row["intr_eps"]) == ("fast", "cpu", 10, 0.5)  # the default
        assert row["seconds"] > 0
        assert row["norm_w0"] == pytest.approx(np.linalg.norm(w0), rel=1e-10)
        assert row["norm_dw"] == pytest.approx(np.linalg.norm(dw), rel=1e-10, abs=1e-300)
        assert row["spec_norm_dw"] == pytest.approx(np.linalg.norm(dw, 2), rel=1e-10, abs=1e-300)
        ut, _, vth = np.linalg.svd(w0 + dw, full_matrices=False)
        u0, _, v0h = np.linalg.svd(w0, full_matrices=False)
        assert row["intruders_u"] == int(np.sum(np.abs(ut[:, :10].T @ u0).max(axis=1) < 0.5))
        assert row["intruders_v"] == int(np.sum(np.abs(vth[:10] @ v0h.T).max(axis=1) < 0.5))
    first, second, zero = rows
    assert first["ab_ratio"] == 2.0 and second["ab_ratio"] is None  # norm_a = 0: no ratio
    # the typed fields reach their columns (the loader side: test_pissa.py, a real PiSSA adapter)
    assert (first["base_rewritten"], first["warnings"]) == (False, [])
    assert (second["base_rewritten"], second["warnings"]) == (True, ["dW is relative to a modified base"])
    assert first["intruders_u"] > 0  # the fixture exercises a nonzero count
    sd = np.linalg.svd(updates[0].materialize(torch.float64).numpy(), compute_uv=False)[:4]
    p = sd / sd.sum()
    assert first["eff_rank"] == pytest.approx(math.exp(-np.sum(p * np.log(p))), rel=1e-10)
    assert first["stable_rank"] == pytest.approx(np.sum(sd**2) / sd[0] ** 2, rel=1e-10)
    assert first["amp_rank"] == 4 and first["amplification"] > 1
    # dW = 0: undefined statistics are nulls, not NaN or 0
    assert zero["norm_dw"] == 0.0 and zero["intruders_u"] == 0
    for col in ("stable_rank", "eff_rank", "amplification", "amp_rank", "rank", "ab_ratio"):
        assert zero[col] is None, col
    assert zero["rel_update"] == 0.0


def test_vectors_rows_are_one_based_and_match_reference(unit) -> None:
    w0, updates, _, _, tables = unit
    u0, s0, v0h = np.linalg.svd(w0, full_matrices=False)
    dw = updates[0].materialize(torch.float64).numpy()
    ut, st, vth = np.linalg.svd(w0 + dw, full_matrices=False)
    for side, cos in (("U", np.abs(ut.T @ u0)), ("V", np.abs(vth @ v0h.T))):
        rows = sorted(_rows(tables["vectors"], model_uid="uid-a", side=side), key=lambda r: r["j"])
        assert [r["j"] for r in rows] == list(range(1, 13))
        for r in rows:
            j = r["j"] - 1
            assert r["sigma"] == pytest.approx(st[j], rel=1e-10)
            assert r["max_cos"] == pytest.approx(cos[j].max(), rel=1e-8)
            assert r["argmax_i"] == int(cos[j].argmax()) + 1
            assert r["base_sigma"] == pytest.approx(s0[cos[j].argmax()], rel=1e-10)
            assert r["tensor"] == TENSOR and r["model_id"] == "org/a"


def test_spectra_rows(unit) -> None:
    w0, updates, _, _, tables = unit
    spectra = tables["spectra"]
    base_rows = _rows(spectra, which="w0")
    assert {(r["model_uid"], r["model_id"]) for r in base_rows} == {("base-uid", "org/base")}
    np.testing.assert_allclose([r["sigma"] for r in sorted(base_rows, key=lambda r: r["idx"])],
                               np.linalg.svd(w0, compute_uv=False)[:8], rtol=1e-10)
    dw = updates[1].materialize(torch.float64).numpy()
    for which, mat in (("wt", w0 + dw), ("dw", dw)):
        rows = sorted(_rows(spectra, which=which, model_uid="uid-b"), key=lambda r: r["idx"])
        assert [r["idx"] for r in rows] == list(range(1, 9))
        s = np.linalg.svd(mat, compute_uv=False)[:8]
        np.testing.assert_allclose([r["sigma"] for r in rows], s, rtol=1e-10, atol=1e-12 * s[0])


def test_similarity_rows_are_base_by_finetuned(unit) -> None:
    """i indexes the base vector, j the fine-tuned one: a transposed grid would fail here."""
    w0, updates, _, _, tables = unit
    u0 = np.linalg.svd(w0, full_matrices=False)[0]
    dw = updates[0].materialize(torch.float64).numpy()
    ut = np.linalg.svd(w0 + dw, full_matrices=False)[0]
    want = np.abs(u0[:, :5].T @ ut[:, :5])
    assert not np.allclose(want, want.T, atol=1e-3)
    rows = _rows(tables["similarity"], model_uid="uid-a")
    assert len(rows) == 25
    for r in rows:
        assert r["value"] == pytest.approx(want[r["i"] - 1, r["j"] - 1], abs=1e-10)


def test_pairs_rows(unit) -> None:
    _, updates, _, _, tables = unit
    rows = tables["pairs"].to_pylist()
    # the dW = 0 member has rank 0: no grid with it, only (a, b)
    assert {(r["model_uid_a"], r["model_id_a"], r["model_uid_b"], r["model_id_b"]) for r in rows} == {
        ("uid-a", "org/a", "uid-b", "org/b")}
    ua = np.linalg.svd(updates[0].materialize(torch.float64).numpy(), full_matrices=False)[0][:, :4]
    ub = np.linalg.svd(updates[1].materialize(torch.float64).numpy(), full_matrices=False)[0][:, :6]
    assert {(r["i"], r["j"]) for r in rows} == {(i, j) for i in range(1, 5) for j in range(1, 7)}
    for r in rows:
        i, j = r["i"], r["j"]
        want = np.linalg.norm(ua[:, :i].T @ ub[:, :j]) ** 2 / min(i, j)
        assert r["phi"] == pytest.approx(want, rel=1e-8, abs=1e-12)


def test_intruder_counts_are_a_query_over_vectors(unit) -> None:
    """docs/science.md#vectors: counts at any eps and k <= K_store from `vectors` equal the engine's own."""
    _, _, _, analysis, tables = unit
    vectors = tables["vectors"]
    con = duckdb.connect()
    con.register("vectors", vectors)
    for eps in (0.2, 0.5, 0.8):
        for k in (3, 10, 12):
            got = dict(con.execute(
                "SELECT model_uid, count(*) FILTER (WHERE max_cos < ?) FROM vectors "
                "WHERE side = 'U' AND j <= ? GROUP BY model_uid", [eps, k]).fetchall())
            for uid, item in zip(("uid-a", "uid-b", "uid-c"), analysis.items, strict=True):
                assert got[uid] == item.u.intruders(k, eps)
    matrices = tables["matrices"].to_pylist()
    assert [m["intruders_u"] for m in matrices] == [it.u.intruders(10, 0.5) for it in analysis.items]


def test_pairs_table_is_empty_but_typed_when_pairs_are_off() -> None:
    w0, updates, ctx = _unit()
    cfg = AnalysisConfig(dtype="float64", pairs=False)
    analysis = analyze_batch(torch.tensor(w0), updates, cfg)
    tables = unit_tables(ctx, updates, analysis, cfg)
    assert tables["pairs"].num_rows == 0 and tables["pairs"].schema.equals(schema_for("pairs"))
    assert tables["vectors"].num_rows == 3 * 2 * 32 and tables["similarity"].num_rows == 3 * 100


def test_misaligned_members_are_refused() -> None:
    w0, updates, ctx = _unit()
    analysis = analyze_batch(torch.tensor(w0), updates[:2], CFG)
    with pytest.raises(ValueError, match="align"):
        unit_tables(ctx, updates[:2], analysis, CFG)
    other = UnitContext(ctx.run_id, ctx.unit_id, ctx.base_uid, ctx.base_id, "lm_head.weight", ctx.members[:2])
    with pytest.raises(ValueError, match="lm_head"):
        unit_tables(other, updates[:2], analysis, CFG)
