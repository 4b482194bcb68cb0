"""Batched same-rank LoRA solves (krylov.top_triplets_lowrank_batched) against the unbatched
per-adapter path, on CPU: every count and index identical, every value within the residual
bounds both paths are held to; the residual bounds are enforced per item in the batch."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from zoospectra.config import AnalysisConfig
from zoospectra.spectral import base_svd
from zoospectra.spectral import fast as fast_mod
from zoospectra.spectral.krylov import top_triplets_lowrank_batched
from zoospectra.updates import MatrixUpdate

M, N = 420, 300
CFG = AnalysisConfig(k_store=12, k_spec=16, sim_k=10, dtype="float64")


def decaying(m: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = torch.arange(1, min(m, n) + 1, dtype=torch.float64) ** -0.6
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    return (u * s) @ v.T


def updates(dtype: torch.dtype) -> list[MatrixUpdate]:
    out = []
    for i, (r, scale) in enumerate([(2, 0.2), (2, 2.0), (4, 0.5), (4, 0.5), (4, 3.0), (8, 1.0), (8, 0.05)]):
        g = torch.Generator().manual_seed(100 + i)
        b = torch.randn(M, r, generator=g, dtype=torch.float64) * scale / M**0.5
        a = torch.randn(r, N, generator=g, dtype=torch.float64) / N**0.5
        out.append(MatrixUpdate(tensor="w", kind="lora", shape=(M, N), B=b.to(dtype), A=a.to(dtype), rank=r))
    dense = torch.randn(M, N, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 1e-3
    out.append(MatrixUpdate(tensor="w", kind="full", shape=(M, N), dense=dense.to(dtype)))
    return out


FLOATS = ("norm_w0", "norm_dw", "spec_norm_dw", "stable_rank", "rel_update", "eff_rank", "amplification")
INTS = ("dw_rank", "amp_rank", "intr_k", "intr_eps", "intruders_u", "intruders_v")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_batched_equals_unbatched(dtype: str) -> None:
    cfg = dataclasses.replace(CFG, dtype=dtype)
    tdt = torch.float64 if dtype == "float64" else torch.float32
    w0 = decaying(M, N, 1).to(tdt)
    ups = updates(tdt)
    base = base_svd(w0, cfg)
    one = fast_mod.analyze_fast(w0, ups, cfg, base=base, batched=False)
    many = fast_mod.analyze_fast(w0, ups, cfg, base=base, batched=True)
    for a, b in zip(one.items, many.items, strict=True):
        for f in INTS:
            assert getattr(b, f) == getattr(a, f), f
        for f in FLOATS:
            assert getattr(b, f) == pytest.approx(getattr(a, f), rel=1e-9), f
        for side in ("u", "v"):
            sa, sb = getattr(a, side), getattr(b, side)
            np.testing.assert_array_equal(sb.argmax, sa.argmax)
            np.testing.assert_allclose(sb.max_cos, sa.max_cos, atol=1e-8)
            np.testing.assert_allclose(sb.sigma, sa.sigma, rtol=0, atol=1e-9 * sa.sigma[0])
        np.testing.assert_allclose(b.spectrum_wt, a.spectrum_wt, rtol=0, atol=1e-7 * a.spectrum_wt[0])
        np.testing.assert_allclose(b.similarity, a.similarity, atol=1e-8)


def test_every_low_rank_item_took_the_batched_path_and_met_its_bounds() -> None:
    """The comparison above is not vacuous: the batched solver answered every LoRA item."""
    w0 = decaying(M, N, 1)
    ups = updates(torch.float64)
    base = base_svd(w0, CFG)
    want = fast_mod.Wanted.of(CFG, min(M, N))
    low = [i for i, u in enumerate(ups) if u.is_low_rank]
    factors = dict(zip(low, fast_mod.project_factors(base, [ups[i] for i in low]), strict=True))
    got = fast_mod.batched_wt(base, factors, want)
    assert sorted(got) == low and {t.method for t in got.values()} == {"krylov-batched"}
    s0 = base.S.to(torch.float64)
    for i, t in got.items():   # residual of every returned triplet, recomputed on the operator
        op = fast_mod.reduced_operator(s0, factors[i], fast_mod._head(want, min(M, N)))
        res = torch.linalg.vector_norm(op.rmatmat(t.U) - t.V * t.sigma, dim=0)
        assert float(res[: want.k_vectors].max()) <= want.tol * float(t.sigma[0])


def test_items_missing_the_residual_bound_come_back_for_the_single_solver(monkeypatch) -> None:
    w0 = decaying(M, N, 1)
    ups = [u for u in updates(torch.float64) if u.is_low_rank and u.rank == 4]
    base = base_svd(w0, CFG)
    f = fast_mod.project_factors(base, ups)
    want = fast_mod.Wanted.of(CFG, min(M, N))
    args = (base.S, torch.stack([x.bt for x in f]), torch.stack([x.at for x in f]),
            fast_mod._head(want, min(M, N)), want.k_val)
    assert top_triplets_lowrank_batched(*args, k_vectors=want.k_vectors, tol=0.0, tol_values=0.0) == [None] * 3
    # analyze_fast solves what the batch refused alone: same answers as the unbatched path
    one = fast_mod.analyze_fast(w0, ups, CFG, base=base, batched=False)
    monkeypatch.setattr(fast_mod, "top_triplets_lowrank_batched", lambda *a, **k: [None] * a[1].shape[0])
    refused = fast_mod.analyze_fast(w0, ups, CFG, base=base, batched=True)
    for a, b in zip(one.items, refused.items, strict=True):
        np.testing.assert_array_equal(b.u.max_cos, a.u.max_cos)
        assert (b.intruders_u, b.intruders_v) == (a.intruders_u, a.intruders_v)


def test_batched_default_is_off_on_cpu_and_forced_by_env(monkeypatch) -> None:
    monkeypatch.delenv("ZOOSPECTRA_BATCHED", raising=False)
    assert not fast_mod.use_batched(torch.device("cpu"))
    assert fast_mod.use_batched(torch.device("cuda"))
    monkeypatch.setenv("ZOOSPECTRA_BATCHED", "1")
    assert fast_mod.use_batched(torch.device("cpu"))
    monkeypatch.setenv("ZOOSPECTRA_BATCHED", "0")
    assert not fast_mod.use_batched(torch.device("cuda"))
