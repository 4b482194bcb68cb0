"""The exact spectral engine against a plain numpy float64 reference, and against PEFT itself.

The reference (`ref_*` below) is written independently of zoospectra.spectral: np.linalg.svd and
explicit loops, nothing imported from the package under test.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from zoospectra.config import ALL, AnalysisConfig
from zoospectra.errors import (
    AnalysisError,
    BaseMismatchError,
    ConfigError,
    NonFiniteWeightsError,
    UnsupportedDtypeError,
)
from zoospectra.spectral import BatchAnalysis, MatrixAnalysis, analyze_batch, base_svd
from zoospectra.updates import MatrixUpdate

EPS_SWEEP = [round(0.1 * i, 1) for i in range(1, 10)]
TENSOR = "encoder.layer.2.attention.self.query.weight"



# --- test matrices -----------------------------------------------------------------------
@dataclass
class Case:
    name: str
    w0: np.ndarray   # [m, n] float64
    b: np.ndarray    # [m, r] (scale folded in)
    a: np.ndarray    # [r, n]

    @property
    def dw(self) -> np.ndarray:
        return self.b @ self.a

    def update(self, rank: int | None = None, dense: bool = False, dtype=torch.float64) -> MatrixUpdate:
        m, n = self.w0.shape
        if dense:
            return MatrixUpdate(tensor=TENSOR, kind="full", shape=(m, n),
                                dense=torch.tensor(self.dw, dtype=dtype), rank=rank)
        return MatrixUpdate(tensor=TENSOR, kind="lora", shape=(m, n), B=torch.tensor(self.b, dtype=dtype),
                            A=torch.tensor(self.a, dtype=dtype), rank=self.b.shape[1] if rank is None else rank)


def make_case(name: str, m: int, n: int, scale: float, seed: int, r: int = 4) -> Case:
    """W0 with a decaying, well-separated spectrum; a rank-r update along random directions.

    `scale` is about ||dW||_2 against ||W0||_2 = 10: 20 puts the update's directions on top of
    Wt (intruders), 5 interleaves them, 1e-3 leaves Wt's top vectors where W0's are.
    """
    rng = np.random.default_rng(seed)
    p = min(m, n)
    u0 = np.linalg.qr(rng.standard_normal((m, p)))[0]
    v0 = np.linalg.qr(rng.standard_normal((n, p)))[0]
    w0 = (u0 * (10.0 * 0.9 ** np.arange(p))) @ v0.T
    b = rng.standard_normal((m, r)) / math.sqrt(m) * scale
    a = rng.standard_normal((r, n)) / math.sqrt(n)
    return Case(name, w0, b, a)


CASES = [
    make_case("intruders_tall", 96, 64, 20.0, 1),
    make_case("mixed_tall", 96, 64, 5.0, 2),
    make_case("none_tall", 96, 64, 1e-3, 3),
    make_case("intruders_wide", 48, 80, 20.0, 4),
    make_case("mixed_wide", 48, 80, 5.0, 5),
    make_case("none_square", 64, 64, 1e-3, 6),
    make_case("single_wide", 40, 72, 20.0, 10, r=1),
]


# --- the independent reference -----------------------------------------------------------
@dataclass
class Ref:
    s0: np.ndarray
    st: np.ndarray
    sd: np.ndarray
    u0: np.ndarray
    ut: np.ndarray
    ud: np.ndarray
    cos_u: np.ndarray  # [p, p]: |<ut_j, u0_i>| at [j, i]
    cos_v: np.ndarray
    w0: np.ndarray
    dw: np.ndarray


@functools.cache
def ref_case(name: str) -> Ref:
    case = next(c for c in CASES if c.name == name)
    return ref_analysis(case.w0, case.dw)


def ref_analysis(w0: np.ndarray, dw: np.ndarray) -> Ref:
    w0 = np.asarray(w0, np.float64)
    dw = np.asarray(dw, np.float64)
    u0, s0, v0h = np.linalg.svd(w0, full_matrices=False)
    ut, st, vth = np.linalg.svd(w0 + dw, full_matrices=False)
    ud, sd, _ = np.linalg.svd(dw, full_matrices=False)
    return Ref(s0, st, sd, u0, ut, ud, np.abs(ut.T @ u0), np.abs(vth @ v0h.T), w0, dw)


def ref_intruders(cos: np.ndarray, k: int, eps: float) -> int:
    count = 0
    for j in range(min(k, cos.shape[0])):
        if max(cos[j, i] for i in range(cos.shape[1])) < eps:
            count += 1
    return count


def ref_eff_rank(sd: np.ndarray, shape: tuple[int, int]) -> float:
    keep = sd[sd > 0.5 * math.sqrt(shape[0] + shape[1] + 1) * np.finfo(np.float64).eps * sd[0]]
    p = keep / keep.sum()
    return float(math.exp(-sum(pi * math.log(pi) for pi in p)))


def ref_amplification(w0: np.ndarray, dw: np.ndarray, r: int) -> float:
    u, _, vh = np.linalg.svd(dw, full_matrices=False)
    return np.linalg.norm(dw) / np.linalg.norm(u[:, :r].T @ w0 @ vh[:r].T)


def ref_phi(ua: np.ndarray, ub: np.ndarray) -> np.ndarray:
    out = np.zeros((ua.shape[1], ub.shape[1]))
    for i in range(1, ua.shape[1] + 1):
        for j in range(1, ub.shape[1] + 1):
            out[i - 1, j - 1] = np.linalg.norm(ua[:, :i].T @ ub[:, :j]) ** 2 / min(i, j)
    return out


def run(case: Case, cfg: AnalysisConfig, **kw) -> MatrixAnalysis:
    dtype = torch.float32 if cfg.dtype == "float32" else torch.float64
    w0 = torch.tensor(case.w0, dtype=dtype)
    return analyze_batch(w0, [case.update(dtype=dtype, **kw)], cfg).items[0]


def assert_margin(ref: Ref, k: int, eps: float, margin: float) -> None:
    """The reference's max |cos| of the top k must not sit on eps, or the count is ill-posed."""
    for cos in (ref.cos_u, ref.cos_v):
        best = cos[:k].max(axis=1)
        assert np.all(np.abs(best - eps) > margin), (eps, best)


# --- intruders ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_intruder_counts_match_reference_float64(case: Case) -> None:
    ref = ref_case(case.name)
    counts = []
    for eps in EPS_SWEEP:
        assert_margin(ref, 10, eps, 1e-6)
        item = run(case, AnalysisConfig(mode="exact", k=10, eps=eps, dtype="float64"))
        assert item.intr_k == 10 and item.intr_eps == eps
        assert item.intruders_u == ref_intruders(ref.cos_u, 10, eps), eps
        assert item.intruders_v == ref_intruders(ref.cos_v, 10, eps), eps
        counts.append(item.intruders_u)
    if case.name.startswith("none"):
        assert counts == [0] * 9
    if case.name.startswith("intruders"):
        assert counts[-1] >= 4 and counts[0] < counts[-1]  # the sweep is not flat


def test_cases_cover_interesting_counts() -> None:
    """Guard on the fixtures themselves: the sweep must exercise 0, small and large counts."""
    seen = {ref_intruders(ref_case(c.name).cos_u, 10, eps) for c in CASES for eps in EPS_SWEEP}
    assert {0, 1, 2, 3, 4} <= seen and max(seen) >= 5


@pytest.mark.parametrize("case", CASES[:2] + CASES[3:5], ids=lambda c: c.name)
def test_per_vector_records_match_reference(case: Case) -> None:
    ref = ref_case(case.name)
    item = run(case, AnalysisConfig(mode="exact", k=10, k_store=20, dtype="float64"))
    for side, cos in (("u", ref.cos_u), ("v", ref.cos_v)):
        vecs = getattr(item, side)
        assert len(vecs) == 20
        np.testing.assert_allclose(vecs.sigma, ref.st[:20], rtol=1e-10)
        np.testing.assert_allclose(vecs.max_cos, cos[:20].max(axis=1), rtol=1e-8, atol=1e-12)
        top2 = np.sort(cos[:20], axis=1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 1e-6          # argmax is defined
        assert clear.sum() >= 15
        np.testing.assert_array_equal(vecs.argmax[clear], cos[:20].argmax(axis=1)[clear])
        np.testing.assert_allclose(vecs.base_sigma, ref.s0[vecs.argmax], rtol=1e-12)
        for k in (1, 5, 10, 20):  # counts at any k <= K_store are a query over this record
            for eps in (0.3, 0.5, 0.8):
                assert vecs.intruders(k, eps) == ref_intruders(cos, k, eps)


def test_k_store_all_and_k_above_min_dim() -> None:
    """k_store = all records every vector; k > min(m, n) counts all of them (PEFT's cos[:k])."""
    case = make_case("small", 12, 7, 20.0, 7, r=3)
    ref = ref_analysis(case.w0, case.dw)
    item = run(case, AnalysisConfig(mode="exact", k=10, k_store=ALL, eps=0.9, dtype="float64"))
    assert len(item.u) == len(item.v) == 7
    assert item.intruders_u == ref_intruders(ref.cos_u, 7, 0.9)
    np.testing.assert_allclose(item.u.max_cos, ref.cos_u.max(axis=1), rtol=1e-8)


# --- per-matrix statistics ---------------------------------------------------------------
@pytest.mark.parametrize("case", CASES[:2] + CASES[3:5], ids=lambda c: c.name)
def test_matrix_statistics_match_reference(case: Case) -> None:
    ref = ref_case(case.name)
    item = run(case, AnalysisConfig(mode="exact", dtype="float64"))
    fro_dw, spec_dw = np.linalg.norm(case.dw), np.linalg.norm(case.dw, 2)
    assert item.shape == case.w0.shape
    np.testing.assert_allclose(item.norm_w0, np.linalg.norm(case.w0), rtol=1e-10)
    np.testing.assert_allclose(item.norm_dw, fro_dw, rtol=1e-10)
    np.testing.assert_allclose(item.spec_norm_dw, spec_dw, rtol=1e-10)
    np.testing.assert_allclose(item.stable_rank, fro_dw**2 / spec_dw**2, rtol=1e-10)
    np.testing.assert_allclose(item.rel_update, fro_dw / np.linalg.norm(case.w0), rtol=1e-10)
    np.testing.assert_allclose(item.eff_rank, ref_eff_rank(ref.sd, case.w0.shape), rtol=1e-10)
    assert item.dw_rank == 4
    np.testing.assert_allclose(item.amplification, ref_amplification(case.w0, case.dw, 4), rtol=1e-8)
    assert item.amp_rank == 4
    assert item.mode == "exact" and item.seconds > 0


def test_effective_and_stable_rank_known_values() -> None:
    """dW with r equal singular values: effective rank and stable rank are exactly r."""
    rng = np.random.default_rng(8)
    q1 = np.linalg.qr(rng.standard_normal((50, 5)))[0]
    q2 = np.linalg.qr(rng.standard_normal((30, 5)))[0]
    case = Case("flat", rng.standard_normal((50, 30)), 3.0 * q1, q2.T)
    item = run(case, AnalysisConfig(mode="exact", dtype="float64"))
    assert item.eff_rank == pytest.approx(5.0, rel=1e-10)
    assert item.stable_rank == pytest.approx(5.0, rel=1e-10)
    assert item.spec_norm_dw == pytest.approx(3.0, rel=1e-10)
    # float32: trailing singular values are rounding noise, dropped by the zero tolerance
    item32 = run(case, AnalysisConfig(mode="exact", dtype="float32"))
    assert item32.dw_rank == 5
    assert item32.eff_rank == pytest.approx(5.0, rel=1e-5)


def test_amplification_rank_rules() -> None:
    case = CASES[1]
    ref = ref_case(case.name)
    # dense update without a rank: r = min(k, rank(dW)) = 4
    dense = run(case, AnalysisConfig(mode="exact", dtype="float64"), dense=True)
    assert dense.amp_rank == 4
    np.testing.assert_allclose(dense.amplification, ref_amplification(case.w0, case.dw, 4), rtol=1e-8)
    # declared rank 2 < rank(dW): Hu et al. use the adapter's r
    r2 = run(case, AnalysisConfig(mode="exact", dtype="float64"), rank=2)
    assert r2.amp_rank == 2
    np.testing.assert_allclose(r2.amplification, ref_amplification(case.w0, case.dw, 2), rtol=1e-8)
    # declared rank 8 > rank(dW) = 4: vectors past rank(dW) are arbitrary, r is clipped to 4
    r8 = run(case, AnalysisConfig(mode="exact", dtype="float64"), rank=8)
    assert r8.amp_rank == 4 and r8.amplification == pytest.approx(dense.amplification, rel=1e-8)
    assert ref.sd[4] < 1e-12 * ref.sd[0]


def test_zero_update_has_no_undefined_numbers() -> None:
    case = CASES[0]
    zero = Case("zero", case.w0, np.zeros_like(case.b), case.a)
    item = run(zero, AnalysisConfig(mode="exact", dtype="float64"))
    assert item.norm_dw == 0.0 and item.spec_norm_dw == 0.0 and item.dw_rank == 0
    assert item.stable_rank is None and item.eff_rank is None and item.rel_update == 0.0
    assert item.amplification is None and item.amp_rank is None
    assert item.intruders_u == 0 and item.intruders_v == 0
    np.testing.assert_allclose(item.u.max_cos, 1.0, rtol=1e-10)


# --- similarity and spectra --------------------------------------------------------------
@pytest.mark.parametrize("sim_k,expect", [(10, 10), (ALL, 64), (100, 64), (3, 3)])
def test_similarity_matrix(sim_k: int, expect: int) -> None:
    case = CASES[1]
    ref = ref_case(case.name)
    item = run(case, AnalysisConfig(mode="exact", sim_k=sim_k, dtype="float64"))
    want = np.abs(ref.u0[:, :expect].T @ ref.ut[:, :expect])  # [i base, j fine-tuned]
    assert item.similarity.shape == (expect, expect)
    # the first block is well conditioned; deep in the tail W0's tiny gaps blur vectors a bit
    np.testing.assert_allclose(item.similarity[:10, :10], want[:10, :10], atol=1e-9)
    np.testing.assert_allclose(item.similarity, want, atol=1e-6)


@pytest.mark.parametrize("k_spec", [5, 64, ALL])
def test_spectra(k_spec: int) -> None:
    case = CASES[3]  # 48 x 80
    ref = ref_case(case.name)
    cfg = AnalysisConfig(mode="exact", k_spec=k_spec, dtype="float64")
    batch = analyze_batch(torch.tensor(case.w0), [case.update()], cfg)
    n = 48 if k_spec in (ALL, 64) else k_spec
    item = batch.items[0]
    np.testing.assert_allclose(batch.spectrum_w0, ref.s0[:n], rtol=1e-10)
    np.testing.assert_allclose(item.spectrum_wt, ref.st[:n], rtol=1e-10)
    np.testing.assert_allclose(item.spectrum_dw, ref.sd[:n], rtol=1e-10, atol=1e-12 * ref.sd[0])
    assert batch.spectrum_w0.shape == item.spectrum_wt.shape == item.spectrum_dw.shape == (n,)


# --- float32 mode ------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_float32_mode_agrees_with_float64_reference(case: Case) -> None:
    w0_32 = case.w0.astype(np.float32).astype(np.float64)
    b32, a32 = case.b.astype(np.float32).astype(np.float64), case.a.astype(np.float32).astype(np.float64)
    ref = ref_analysis(w0_32, b32 @ a32)
    compared = 0
    for eps in EPS_SWEEP:
        item = run(case, AnalysisConfig(mode="exact", eps=eps, dtype="float32"))
        for got, cos in ((item.intruders_u, ref.cos_u), (item.intruders_v, ref.cos_v)):
            if np.all(np.abs(cos[:10].max(axis=1) - eps) > 1e-2):  # float32 resolves cos to ~1e-3
                assert got == ref_intruders(cos, 10, eps), eps
                compared += 1
    assert compared >= 12  # of 18
    smax = ref.s0[0]
    np.testing.assert_allclose(item.u.sigma, ref.st[:32], atol=1e-5 * max(smax, ref.st[0]))
    np.testing.assert_allclose(item.u.max_cos[:10], ref.cos_u[:10].max(axis=1), atol=1e-3)
    np.testing.assert_allclose(item.norm_w0, np.linalg.norm(w0_32), rtol=1e-5)
    np.testing.assert_allclose(item.norm_dw, np.linalg.norm(b32 @ a32), rtol=1e-5)
    np.testing.assert_allclose(item.spec_norm_dw, ref.sd[0], rtol=1e-5)
    np.testing.assert_allclose(item.eff_rank, ref_eff_rank(ref.sd, case.w0.shape), rtol=1e-4)
    np.testing.assert_allclose(item.similarity, np.abs(ref.u0[:, :10].T @ ref.ut[:, :10]), atol=1e-4)
    if not case.name.startswith("none"):  # W0's projection on dW's subspace: well conditioned
        np.testing.assert_allclose(item.amplification, ref_amplification(w0_32, b32 @ a32, b32.shape[1]), rtol=1e-3)
    assert item.u.max_cos.dtype == np.float64


def test_half_precision_inputs_are_upcast() -> None:
    case = CASES[1]
    cfg = AnalysisConfig(mode="exact", dtype="float32")
    w0_bf16 = torch.tensor(case.w0).to(torch.bfloat16)
    upd = MatrixUpdate(tensor=TENSOR, kind="lora", shape=case.w0.shape,
                       B=torch.tensor(case.b).half(), A=torch.tensor(case.a).half(), rank=4)
    got = analyze_batch(w0_bf16, [upd], cfg).items[0]
    want_upd = MatrixUpdate(tensor=TENSOR, kind="lora", shape=case.w0.shape,
                            B=upd.B.float(), A=upd.A.float(), rank=4)
    want = analyze_batch(w0_bf16.float(), [want_upd], cfg).items[0]
    assert got.intruders_u == want.intruders_u
    np.testing.assert_array_equal(got.u.max_cos, want.u.max_cos)
    assert got.norm_dw == want.norm_dw


# --- pairs -------------------------------------------------------------------------------
def _pair_updates() -> tuple[np.ndarray, list[MatrixUpdate]]:
    """a: rank 4; b: rank 8 sharing two of a's directions; c: a again; d: dense, unknown rank."""
    rng = np.random.default_rng(9)
    m, n = 60, 40
    w0 = rng.standard_normal((m, n))
    ba, aa = rng.standard_normal((m, 4)), rng.standard_normal((4, n))
    bb = np.hstack([ba[:, :2] + 0.1 * rng.standard_normal((m, 2)), rng.standard_normal((m, 6))])
    ab = rng.standard_normal((8, n))
    dd = rng.standard_normal((m, 3)) @ rng.standard_normal((3, n))

    def lora(b: np.ndarray, a: np.ndarray) -> MatrixUpdate:
        return MatrixUpdate(tensor=TENSOR, kind="lora", shape=(m, n), B=torch.tensor(b),
                            A=torch.tensor(a), rank=b.shape[1])

    dense = MatrixUpdate(tensor=TENSOR, kind="full", shape=(m, n), dense=torch.tensor(dd))
    return w0, [lora(ba, aa), lora(bb, ab), lora(ba, aa), dense]


@pytest.mark.parametrize("pair_max", [64, 6])
def test_pairs_match_reference(pair_max: int) -> None:
    w0, updates = _pair_updates()
    cfg = AnalysisConfig(mode="exact", pairs=True, pair_max=pair_max, dtype="float64")
    batch = analyze_batch(torch.tensor(w0), updates, cfg)
    grids = {(g.a, g.b): g.phi for g in batch.pairs}
    assert sorted(grids) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    ranks = [4, min(8, pair_max), 4, 3]  # d: numerical rank of dW
    subspaces = [np.linalg.svd(u.materialize(torch.float64).numpy(), full_matrices=False)[0][:, :r]
                 for u, r in zip(updates, ranks, strict=True)]
    for (a, b), phi in grids.items():
        assert phi.shape == (ranks[a], ranks[b])
        np.testing.assert_allclose(phi, ref_phi(subspaces[a], subspaces[b]), rtol=1e-8, atol=1e-12)
        assert np.all(phi >= 0.0) and np.all(phi <= 1.0)
    np.testing.assert_allclose(np.diag(grids[(0, 2)]), 1.0, rtol=1e-10)  # identical adapters
    np.testing.assert_allclose(grids[(0, 2)][:, -1], 1.0, rtol=1e-10)   # span(a) in span(a)
    # a and b share a 2-d subspace (phi ~ 2/4); a and d are unrelated (E phi = 4*3/60/3 ~ 0.07)
    assert grids[(0, 1)][-1, -1] > 0.4 and grids[(0, 3)][-1, -1] < 0.15


def test_pairs_off_by_default() -> None:
    w0, updates = _pair_updates()
    assert analyze_batch(torch.tensor(w0), updates, AnalysisConfig(mode="exact", dtype="float64")).pairs == []


# --- batch, base sharing, device, errors -------------------------------------------------
def test_base_svd_is_computed_once_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    w0, updates = _pair_updates()
    cfg = AnalysisConfig(mode="exact", dtype="float64")
    calls: list[tuple[int, ...]] = []
    real_svd = torch.linalg.svd

    def counting_svd(x: torch.Tensor, *args, **kwargs):
        calls.append(tuple(x.shape))
        return real_svd(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", counting_svd)
    batch = analyze_batch(torch.tensor(w0), updates, cfg)
    assert len(calls) == 1 + 2 * len(updates)   # W0 once; Wt and dW per update
    calls.clear()
    base = base_svd(torch.tensor(w0), cfg)
    again = analyze_batch(torch.tensor(w0), updates, cfg, base=base)
    assert len(calls) == 1 + 2 * len(updates) and again.base_seconds == 0.0
    for x, y in zip(batch.items, again.items, strict=True):
        np.testing.assert_array_equal(x.u.max_cos, y.u.max_cos)
    assert isinstance(batch, BatchAnalysis) and len(batch.items) == len(updates)
    assert batch.device == "cpu" and batch.dtype == "float64" and batch.seconds >= batch.base_seconds > 0


def test_precomputed_base_must_match() -> None:
    w0, updates = _pair_updates()
    cfg = AnalysisConfig(mode="exact", dtype="float64")
    other = base_svd(torch.tensor(w0 * 2.0), cfg)
    with pytest.raises(AnalysisError, match="another matrix"):
        analyze_batch(torch.tensor(w0), updates, cfg, base=other)
    wrong_dtype = base_svd(torch.tensor(w0), AnalysisConfig(mode="exact", dtype="float32"))
    with pytest.raises(AnalysisError, match="does not match W0"):
        analyze_batch(torch.tensor(w0), updates, cfg, base=wrong_dtype)


def test_empty_batch_gives_the_base_spectrum() -> None:
    w0 = CASES[0].w0
    batch = analyze_batch(torch.tensor(w0), [], AnalysisConfig(mode="exact", dtype="float64", k_spec=5))
    assert batch.items == [] and batch.pairs == []
    np.testing.assert_allclose(batch.spectrum_w0, np.linalg.svd(w0, compute_uv=False)[:5], rtol=1e-10)


def test_input_errors_are_typed_and_name_the_tensor() -> None:
    case = CASES[1]
    w0 = torch.tensor(case.w0)
    cfg = AnalysisConfig(mode="exact", dtype="float64")
    bad = case.update()
    bad.B[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="NaN") as e:
        analyze_batch(w0, [bad], cfg)
    assert e.value.context["tensor"] == TENSOR
    with pytest.raises(BaseMismatchError, match="does not match the base"):
        analyze_batch(w0[:, :10], [case.update()], cfg)
    other = dataclasses.replace(case.update(), tensor="encoder.layer.3.attention.self.query.weight")
    with pytest.raises(BaseMismatchError, match="one base matrix"):
        analyze_batch(w0, [case.update(), other], cfg)
    with pytest.raises(UnsupportedDtypeError, match="floating-point"):
        analyze_batch(w0.to(torch.int8), [case.update()], cfg)
    with pytest.raises(ConfigError, match="device"):
        analyze_batch(w0, [case.update()], cfg, device="tpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    w0, updates = _pair_updates()
    cfg = AnalysisConfig(mode="exact", dtype="float64", pairs=True)
    cpu = analyze_batch(torch.tensor(w0), updates, cfg, device="cpu")
    gpu = analyze_batch(torch.tensor(w0), updates, cfg, device="cuda")
    assert gpu.device.startswith("cuda")
    for x, y in zip(cpu.items, gpu.items, strict=True):
        assert (x.intruders_u, x.intruders_v) == (y.intruders_u, y.intruders_v)
        np.testing.assert_allclose(y.u.max_cos, x.u.max_cos, atol=1e-8)
        np.testing.assert_allclose(y.spectrum_wt, x.spectrum_wt, rtol=1e-10)
        assert y.eff_rank == pytest.approx(x.eff_rank, rel=1e-8)
    for x, y in zip(cpu.pairs, gpu.pairs, strict=True):
        np.testing.assert_allclose(y.phi, x.phi, atol=1e-8)
    base = base_svd(torch.tensor(w0), cfg, device="cuda:0")  # shared base on the GPU is accepted
    again = analyze_batch(torch.tensor(w0), updates, cfg, device="cuda", base=base)
    np.testing.assert_array_equal(again.items[0].u.max_cos, gpu.items[0].u.max_cos)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_cuda_float32_counts_match_reference(case: Case) -> None:
    ref = ref_case(case.name)
    for eps in (0.3, 0.5, 0.7):
        cfg = AnalysisConfig(mode="exact", eps=eps, dtype="float32")
        item = analyze_batch(torch.tensor(case.w0, dtype=torch.float32),
                             [case.update(dtype=torch.float32)], cfg, device="cuda").items[0]
        for got, cos in ((item.intruders_u, ref.cos_u), (item.intruders_v, ref.cos_v)):
            if np.all(np.abs(cos[:10].max(axis=1) - eps) > 1e-2):
                assert got == ref_intruders(cos, 10, eps)


# --- PEFT as the oracle ------------------------------------------------------------------
PEFT_TARGETS = (r"encoder\.layer\.0\.(attention\.self\.(query|value)|intermediate\.dense|output\.dense)"
                r"|encoder\.layer\.5\.attention\.self\.(query|value)")


@pytest.fixture(scope="module")
def trained_lora(minilm_dir):
    """A real LoRA on the shipped MiniLM, trained 25 steps at lr 5e-3 so that B != 0.

    Targets cover 384x384, 1536x384 (m > n) and 384x1536 (m < n) matrices in two layers (few,
    since PEFT's reduce_intruder_dimension takes 2-3 full SVDs per matrix per eps).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_pretrained(str(minilm_dir))
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=PEFT_TARGETS,
                                                  lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-3)
    ids, target = torch.randint(1000, 5000, (4, 8)), torch.randn(4, 8, 384)
    for _ in range(25):
        loss = (peft_model(input_ids=ids).last_hidden_state - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    peft_model.eval()
    return peft_model


def _peft_counts(peft_model, eps: float, name: str) -> dict[str, int]:
    """Run PEFT's reduce_intruder_dimension for real and read its per-layer intruder counts."""
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    lines: list[str] = []
    with torch.no_grad():
        reduce_intruder_dimension(peft_model, new_adapter_name=name, top_k=10,
                                  threshold_epsilon=eps, logging_sink=lines.append)
    peft_model.set_adapter("default")
    peft_model.delete_adapter(name)
    counts = {}
    for line in lines:
        hit = re.fullmatch(r"base_model\.model\.(.+): (?:No intruders|Intruders: (\d+))", line)
        if hit:
            counts[hit.group(1) + ".weight"] = int(hit.group(2) or 0)
    return counts


def test_intruder_counts_agree_with_peft(trained_lora) -> None:
    from peft.tuners.lora import LoraLayer

    updates, bases = [], {}
    for name, layer in trained_lora.base_model.model.named_modules():
        if isinstance(layer, LoraLayer):
            w0 = layer.get_base_layer().weight.detach()
            scale = layer.scaling["default"]
            b = layer.lora_B["default"].weight.detach() * scale  # scale folded into B
            a = layer.lora_A["default"].weight.detach()
            assert b.abs().max() > 0
            updates.append(MatrixUpdate(tensor=f"{name}.weight", kind="lora", shape=tuple(w0.shape),
                                        B=b, A=a, rank=8, scale=scale))
            bases[f"{name}.weight"] = w0
    shapes = {u.shape for u in updates}
    assert len(updates) == 6 and {(384, 384), (1536, 384), (384, 1536)} <= shapes

    ours = {u.tensor: analyze_batch(bases[u.tensor], [u], AnalysisConfig(mode="exact", k=10, eps=0.5)).items[0]
            for u in updates}
    compared, total = 0, 0
    for idx, eps in enumerate(EPS_SWEEP):
        theirs = _peft_counts(trained_lora, eps, f"probe{idx}")
        assert set(theirs) == set(ours)
        for tensor, item in ours.items():
            if np.any(np.abs(item.u.max_cos[:10] - eps) < 1e-4):  # a tie: float order decides
                continue
            assert item.u.intruders(10, eps) == theirs[tensor], (tensor, eps)
            if eps == 0.5:
                assert item.intruders_u == theirs[tensor]
            compared += 1
            total += theirs[tensor]
    assert compared >= 0.9 * len(EPS_SWEEP) * len(ours) and total > 0


@pytest.mark.parametrize("shape", [(96, 300), (300, 96), (120, 120), (200, 130)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_base_svd_through_qr_matches_numpy(shape: tuple[int, int], dtype: str) -> None:
    """Wide and tall bases take a QR of the long side first (rectangular_svd): the factors must be
    those of a direct SVD (numpy's, an independent LAPACK call) up to signs, to the dtype's rounding."""
    rng = np.random.default_rng(7)
    m, n = shape
    p = min(m, n)
    u0, _ = np.linalg.qr(rng.standard_normal((m, p)))
    v0, _ = np.linalg.qr(rng.standard_normal((n, p)))
    s0 = np.logspace(0, -3, p) * (1 + 0.5 * rng.random(p))      # decaying, well separated enough
    s0 = np.sort(s0)[::-1]
    w0 = (u0 * s0) @ v0.T
    base = base_svd(torch.tensor(w0), AnalysisConfig(dtype=dtype))
    tol = 2e-5 if dtype == "float32" else 1e-11
    ref_u, ref_s, ref_vh = np.linalg.svd(w0, full_matrices=False)
    u, s, vh = (x.double().numpy() for x in (base.U, base.S, base.Vh))
    assert u.shape == (m, p) and s.shape == (p,) and vh.shape == (p, n)
    np.testing.assert_allclose(s, ref_s, atol=tol * ref_s[0])
    np.testing.assert_allclose((u * s) @ vh, w0, atol=tol * ref_s[0])
    np.testing.assert_allclose(u.T @ u, np.eye(p), atol=10 * tol)
    np.testing.assert_allclose(vh @ vh.T, np.eye(p), atol=10 * tol)
    # the top singular vectors (gaps >> rounding) agree with the direct SVD's up to sign
    top = 10
    np.testing.assert_allclose(np.abs(np.sum(u[:, :top] * ref_u[:, :top], 0)), 1.0, atol=1e3 * tol)
    np.testing.assert_allclose(np.abs(np.sum(vh[:top] * ref_vh[:top], 1)), 1.0, atol=1e3 * tol)
