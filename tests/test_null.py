"""The random-direction null (spectral/null.py, docs/science.md#null): the fast engine against the
exact one and against an independent numpy construction, calibration on updates drawn from the
null itself, a planted intruder, and the SQL macros against a plain-Python count."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from zoospectra.config import AnalysisConfig
from zoospectra.demo.zoo import minilm_dir
from zoospectra.errors import ConfigError
from zoospectra.io.checkpoint import Checkpoint
from zoospectra.run.records import UnitContext, unit_tables
from zoospectra.run.store import ResultsStore
from zoospectra.spectral import analyze_batch, base_svd
from zoospectra.spectral.null import coordinates
from zoospectra.study import sql
from zoospectra.updates import MatrixUpdate

QUERY = "encoder.layer.0.attention.self.query.weight"        # 384 x 384
UP = "encoder.layer.0.intermediate.dense.weight"             # 1536 x 384 (tall)
DOWN = "encoder.layer.0.output.dense.weight"                 # 384 x 1536 (wide)


def w0_of(tensor: str) -> torch.Tensor:
    return Checkpoint.open(minilm_dir()).get(tensor, dtype=torch.float64)


def lora(tensor: str, shape: tuple[int, int], r: int, scale: float, seed: int, key: str) -> MatrixUpdate:
    rng = np.random.default_rng(seed)
    b = torch.tensor(rng.standard_normal((shape[0], r)) * scale, dtype=torch.float64)
    a = torch.tensor(rng.standard_normal((r, shape[1])) / math.sqrt(shape[1]), dtype=torch.float64)
    return MatrixUpdate(tensor, "lora", shape, B=b, A=a, rank=r, null_key=key)


def dense(tensor: str, shape: tuple[int, int], scale: float, seed: int, key: str) -> MatrixUpdate:
    rng = np.random.default_rng(seed)
    dw = torch.tensor(rng.standard_normal(shape) * scale, dtype=torch.float64)
    return MatrixUpdate(tensor, "full", shape, dense=dw, null_key=key)


def cfg_of(mode: str, draws: int, **kw) -> AnalysisConfig:
    return AnalysisConfig(mode=mode, dtype="float64", null_draws=draws, **kw)  # type: ignore[arg-type]


# --- the engines -------------------------------------------------------------------------------
@pytest.mark.parametrize("tensor", [QUERY, UP, DOWN])
def test_fast_and_exact_compute_the_same_null(tensor: str) -> None:
    w0 = w0_of(tensor)
    shape = (int(w0.shape[0]), int(w0.shape[1]))
    ups = [lora(tensor, shape, 8, 0.05, 1, "a"), dense(tensor, shape, 2e-3, 2, "b")]
    got = {mode: analyze_batch(w0, ups, cfg_of(mode, 3, k_store=16)) for mode in ("exact", "fast")}
    for ex, fa in zip(got["exact"].items, got["fast"].items, strict=True):
        assert ex.null is not None and fa.null is not None
        assert ex.null.rank == fa.null.rank and ex.null.draws == fa.null.draws == 3
        assert ex.null.sigma.shape == (3, 16)
        np.testing.assert_allclose(fa.null.sigma, ex.null.sigma, rtol=1e-9)
        np.testing.assert_allclose(fa.null.max_cos_u, ex.null.max_cos_u, atol=1e-7)
        np.testing.assert_allclose(fa.null.max_cos_v, ex.null.max_cos_v, atol=1e-7)


def numpy_null(w0: np.ndarray, sd: np.ndarray, key: str, tensor: str, draw: int, k: int):
    """docs/science.md#null from scratch: W0 + U_r diag(sd) V_r^T with U_r = [U0 U0perp] C_u, the
    complements from scipy's null_space (another basis than the engine's QR: the numbers must not
    depend on it), then numpy's full SVD."""
    u0, _, v0h = np.linalg.svd(w0, full_matrices=False)
    uf = np.hstack([u0, scipy.linalg.null_space(u0.T)]) if w0.shape[0] > u0.shape[1] else u0
    vf = np.hstack([v0h.T, scipy.linalg.null_space(v0h)]) if w0.shape[1] > v0h.shape[0] else v0h.T
    cu, cv = (c.numpy() for c in coordinates(key, tensor, draw, w0.shape, sd.size))
    ut, st, vth = np.linalg.svd(w0 + (uf @ cu * sd) @ (vf @ cv).T, full_matrices=False)
    return st[:k], np.abs(ut[:, :k].T @ u0).max(1), np.abs(vth[:k] @ v0h.T).max(1)


@pytest.mark.parametrize("tensor", [QUERY, UP])
def test_fast_null_matches_an_independent_numpy_construction(tensor: str) -> None:
    w0 = w0_of(tensor)
    shape = (int(w0.shape[0]), int(w0.shape[1]))
    up = lora(tensor, shape, 4, 0.08, 3, "ref")
    item = analyze_batch(w0, [up], cfg_of("fast", 2, k_store=12)).items[0]
    sd = np.linalg.svd(up.materialize(torch.float64).numpy(), compute_uv=False)[:4]
    for b in range(2):
        s, cu, cv = numpy_null(w0.numpy(), sd, "ref", tensor, b, 12)
        np.testing.assert_allclose(item.null.sigma[b], s, rtol=1e-9)
        np.testing.assert_allclose(item.null.max_cos_u[b], cu, atol=1e-7)
        np.testing.assert_allclose(item.null.max_cos_v[b], cv, atol=1e-7)


def test_draws_are_seeded_by_artifact_and_tensor_not_by_batch() -> None:
    w0 = w0_of(QUERY)
    a, b = lora(QUERY, (384, 384), 4, 0.05, 1, "uid-a"), lora(QUERY, (384, 384), 4, 0.05, 2, "uid-b")
    cfg = cfg_of("fast", 2, k_store=10)
    alone = analyze_batch(w0, [a], cfg).items[0].null
    again = analyze_batch(w0, [b, a], cfg).items[1].null
    np.testing.assert_array_equal(alone.max_cos_u, again.max_cos_u)
    other = analyze_batch(w0, [dataclasses.replace(a, null_key="uid-c")], cfg).items[0].null
    assert not np.array_equal(alone.sigma, other.sigma)
    assert analyze_batch(w0, [a], cfg_of("fast", 0, k_store=10)).items[0].null is None


def test_zero_update_has_the_base_as_its_null() -> None:
    w0 = w0_of(QUERY)
    zero = MatrixUpdate(QUERY, "full", (384, 384), dense=torch.zeros(384, 384, dtype=torch.float64))
    for mode in ("exact", "fast"):
        null = analyze_batch(w0, [zero], cfg_of(mode, 2, k_store=10)).items[0].null
        assert null.rank == 0 and np.all(null.max_cos_u == 1.0) and np.all(null.max_cos_v == 1.0)


def test_null_draws_config_is_checked_and_leaves_old_fingerprints_alone() -> None:
    assert AnalysisConfig().fingerprint() == AnalysisConfig(null_draws=0).fingerprint()
    assert "null_draws" not in AnalysisConfig().to_json()
    assert AnalysisConfig(null_draws=4).fingerprint() != AnalysisConfig().fingerprint()
    for bad in (-1, 10_001, 2.5, True):
        with pytest.raises(ConfigError, match="null_draws"):
            AnalysisConfig(null_draws=bad)  # type: ignore[arg-type]


# --- calibration: updates drawn from the null itself -------------------------------------------
def from_null(base, key: str, tensor: str, shape: tuple[int, int], sd: np.ndarray) -> MatrixUpdate:
    """An update that IS a null draw (of another key): U_r diag(sd) V_r^T in R^{m x n}."""
    from zoospectra.spectral.null import _complete

    cu, cv = coordinates(key, tensor, 0, shape, sd.size)
    b = (_complete(base.U) @ cu) * torch.tensor(sd)[None, :]
    a = (_complete(base.Vh.T) @ cv).T
    return MatrixUpdate(tensor, "lora", shape, B=b, A=a, rank=sd.size, null_key=f"null-{key}")


def central(counts: np.ndarray) -> tuple[int, int]:
    """The null's central 95%: the 2.5% and 97.5% quantiles of the draw counts (inverted CDF)."""
    return (int(np.quantile(counts, 0.025, method="inverted_cdf")),
            int(np.quantile(counts, 0.975, method="inverted_cdf")))


def test_observed_counts_from_the_null_fall_in_its_central_95_percent() -> None:
    """A 64 x 48 base whose top singular values the 6 update values straddle, eps = 0.5: the null's
    count varies (0..6), so coverage is a real check. 100 observed updates, 39 draws each."""
    torch.set_num_threads(1)
    shape, tensor = (64, 48), "t.0.q.weight"
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(*shape, generator=g, dtype=torch.float64) / 8
    cfg = cfg_of("fast", 39, k_store=10, k_spec=10, sim_k=1)
    base = base_svd(w0, cfg)
    sd = np.array([1.6, 1.3, 1.1, 0.9, 0.8, 0.7])
    inside, small_p, observed = 0, 0, []
    for i in range(100):
        item = analyze_batch(w0, [from_null(base, f"obs{i}", tensor, shape, sd)], cfg, base=base).items[0]
        counts = (item.null.max_cos_u[:, :10] < cfg.eps).sum(1)
        lo, hi = central(counts)
        inside += lo <= item.intruders_u <= hi
        small_p += (1 + np.sum(counts >= item.intruders_u)) / (1 + counts.size) <= 0.05
        observed.append(item.intruders_u)
    assert len(set(observed)) >= 4, observed            # the counts do vary
    assert 0.88 <= inside / 100 <= 0.995, inside         # about 95% (discrete counts: >= 95% expected)
    assert small_p <= 10, small_p                        # a valid tail probability: P(p <= 0.05) <= 5%


# --- SQL: intruders_vs_null ----------------------------------------------------------------------
def commit(root: Path, w0: torch.Tensor, tensor: str, updates: list[MatrixUpdate], cfg: AnalysisConfig,
           unit: str = "u1"):
    """Analyse and publish one unit with the real records + store (no plan: synthetic updates)."""
    analysis = analyze_batch(w0, updates, cfg)
    ctx = UnitContext("run1", unit, "base-uid", "base", tensor,
                      tuple((u.null_key, f"model-{u.null_key}") for u in updates))
    assert ResultsStore(root).commit_unit(unit, unit_tables(ctx, updates, analysis, cfg),
                                          [(u.null_key, tensor) for u in updates])
    return analysis


def test_planted_intruder_gets_a_tiny_tail_probability(tmp_path: Path) -> None:
    """dW = s x y^T with x, y spread evenly over the bottom half of W0's singular vectors (so
    orthogonal to its top ones, max |cos| = 1/sqrt(192) = 0.072) and s above s_10(W0): an intruder
    at eps = 0.1. A random direction in R^384 has max |cos| about 0.15-0.2 against the base, so
    the null's count at eps = 0.1 is 0 in every draw and p_tail sits at its floor 1 / (1 + B).
    (At the paper's eps = 0.5 a random direction of this size is itself an intruder in about half
    of the draws, the rest mixing with base vectors of nearby singular values: there the null says
    that one intruder is no surprise.)"""
    torch.set_num_threads(1)
    w0 = w0_of(QUERY)
    u0, s0, v0h = torch.linalg.svd(w0)
    x = u0[:, 192:].sum(1) / math.sqrt(192)
    y = v0h[192:].sum(0) / math.sqrt(192)
    s = float(s0[3])
    planted = MatrixUpdate(QUERY, "lora", (384, 384), B=(s * x)[:, None], A=y[None, :], rank=1,
                           null_key="planted")
    cfg = cfg_of("fast", 199, k_store=10, k_spec=10, sim_k=1)
    commit(tmp_path, w0, QUERY, [planted], cfg)
    con = sql.connect(tmp_path)
    row = con.sql("SELECT * FROM intruders_vs_null(eps := 0.1, k := 10)").to_arrow_table().to_pylist()
    assert len(row) == 1 and row[0]["n_intruders"] == 1 and row[0]["n_draws"] == 199
    assert row[0]["null_mean"] == 0.0 and row[0]["p_tail"] == pytest.approx(1 / 200)
    loose = con.sql("SELECT * FROM intruders_vs_null(eps := 0.5, k := 10)").to_arrow_table().to_pylist()
    assert loose[0]["n_intruders"] == 1 and 0.2 < loose[0]["null_mean"] < 1.0    # measured 0.57
    assert loose[0]["p_tail"] > 0.2
    model = con.sql("SELECT * FROM model_vs_null(eps := 0.1, k := 10)").to_arrow_table().to_pylist()
    assert model[0]["n_intruders"] == 1 and model[0]["p_tail"] == pytest.approx(1 / 200)


def py_vs_null(items: dict[tuple[str, str], object], eps: float, k: int):
    """Plain-Python intruders_vs_null from the engine's own NullDraws."""
    out = {}
    for key, it in items.items():
        counts = (it.null.max_cos_u[:, :k] < eps).sum(1)
        obs = int(np.sum(it.u.max_cos[:k] < eps))
        lo, hi = central(counts)
        out[key] = (obs, counts.size, counts.mean(), counts.std(ddof=1), lo, hi,
                    (1 + np.sum(counts >= obs)) / (1 + counts.size), counts)
    return out


@pytest.mark.parametrize(("eps", "k"), [(0.5, 10), (0.3, 5), (0.9, 16)])
def test_intruders_vs_null_matches_python(tmp_path: Path, eps: float, k: int) -> None:
    w0 = w0_of(UP)
    ups = [lora(UP, (1536, 384), r, sc, seed, f"m{seed}")
           for seed, (r, sc) in enumerate([(2, 0.3), (8, 0.1), (16, 0.02)])]
    cfg = cfg_of("fast", 9, k_store=16)
    analysis = commit(tmp_path, w0, UP, ups, cfg)
    ref = py_vs_null({(u.null_key, UP): it for u, it in zip(ups, analysis.items, strict=True)}, eps, k)
    con = sql.connect(tmp_path)
    rows = con.sql(f"SELECT * FROM intruders_vs_null(eps := {eps}, k := {k})").to_arrow_table().to_pylist()
    assert len(rows) == 3
    for row in rows:
        obs, n, mean, sd, lo, hi, p, counts = ref[(row["model_uid"], row["tensor"])]
        assert (row["n_intruders"], row["n_draws"], row["null_lo"], row["null_hi"]) == (obs, n, lo, hi)
        assert row["null_mean"] == pytest.approx(mean) and row["null_sd"] == pytest.approx(sd)
        assert row["p_tail"] == pytest.approx(p)
    model = {r["model_uid"]: r for r in con.sql(
        f"SELECT * FROM model_vs_null(eps := {eps}, k := {k})").to_arrow_table().to_pylist()}
    for (uid, _), (obs, _n, mean, *_rest) in ref.items():
        assert model[uid]["n_intruders"] == obs and model[uid]["null_mean"] == pytest.approx(mean)


def test_intruders_vs_null_refuses_k_beyond_the_stored_draws(tmp_path: Path) -> None:
    w0 = w0_of(QUERY)
    commit(tmp_path, w0, QUERY, [lora(QUERY, (384, 384), 2, 0.1, 0, "m")], cfg_of("fast", 2, k_store=10))
    con = sql.connect(tmp_path)
    with pytest.raises(Exception, match="k = 11 exceeds"):
        con.sql("SELECT * FROM intruders_vs_null(eps := 0.5, k := 11)").fetchall()
    # a root without null draws (older units, or --null-draws 0) answers with no rows
    empty = tmp_path / "none"
    commit(empty, w0, QUERY, [lora(QUERY, (384, 384), 2, 0.1, 0, "m")], cfg_of("fast", 0, k_store=10))
    assert sql.connect(empty).sql("SELECT * FROM intruders_vs_null()").fetchall() == []


def test_null_rows_hold_the_engine_draws() -> None:
    w0 = w0_of(QUERY)
    ups = [lora(QUERY, (384, 384), 2, 0.1, 0, "m0"), lora(QUERY, (384, 384), 4, 0.1, 1, "m1")]
    cfg = cfg_of("fast", 3, k_store=10)
    analysis = analyze_batch(w0, ups, cfg)
    ctx = UnitContext("run1", "u1", "base-uid", "base", QUERY, (("m0", "a"), ("m1", "b")))
    rows = unit_tables(ctx, ups, analysis, cfg)["null_vectors"].to_pylist()
    assert len(rows) == 2 * 2 * 3 * 10
    for row in rows:
        null = analysis.items[int(row["model_uid"][1])].null
        cos = null.max_cos_u if row["side"] == "U" else null.max_cos_v
        assert row["max_cos"] == cos[row["draw"] - 1, row["j"] - 1]
        assert row["sigma"] == null.sigma[row["draw"] - 1, row["j"] - 1]
        assert row["null_rank"] == null.rank == (2 if row["model_uid"] == "m0" else 4)
