"""The fast engine (docs/architecture.md#engines): same results as exact.py, without an SVD of Wt or dW.

LoRA family (dW = B A, r << p = min(m, n)), with W0 = U0 diag(s0) V0^T shared by the batch:
  B = Q1 R1, A^T = Q2 R2 (QR)            dW = Q1 (R1 R2^T) Q2^T: an r x r SVD gives all of
                                          dW's singular values and its top singular vectors
  G1 = U0^T Q1, G2 = V0^T Q2             one [p, m] x [m, sum r] product per side for the
                                          whole batch (the only O(m p r) work)
  Wt = [U0 Qb] M [V0 Qa]^T               M = diag(s0, 0) + Bt At, Bt = [G1 R1; Rb R1],
                                          At = [(G2 R2)^T, (Ra R2)^T]; Qb, Qa span the parts of
                                          B, A^T outside span(U0), span(V0) (only when m > p,
                                          resp. n > p; Rb, Ra are their QR triangles)
  top-K of M                              krylov.top_triplets on the implicit operator
  cosines                                 coordinates: max_i |<u_j, u0_i>| = max |x_j[:p]|
  amplification                           (G1 Ur)^T diag(s0) (G2 Vr)
Dense updates (full, DoRA, IA3, LoHa, LoKr, modules_to_save): top-K of Wt and of dW with the
same solver on the explicit matrices (warm start: the base's top right vectors), all of dW's
singular values with svdvals.

Every accepted singular triplet has residual <= tol * s_1 in float64; a solve that does not
converge falls back to a dense SVD of the small operator and is logged.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from ..config import ALL, AnalysisConfig
from ..errors import BaseMismatchError
from ..updates import MatrixUpdate
from .base import prepare_batch
from .inputs import delta, place, svd, svdvals
from .krylov import (
    F64,
    DenseOperator,
    LowRankUpdate,
    Triplets,
    dense_triplets,
    top_triplets,
    top_triplets_lowrank_batched,
)
from .null import coordinates, no_update
from .pairs import pair_grids
from .results import BaseSVD, BatchAnalysis, MatrixAnalysis, NullDraws
from .stats import (
    amplification_rank,
    build_matrix_analysis,
    clip_k,
    nonzero_sigma,
    numerical_rank,
    pair_rank,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

TOL = 1e-10          # residual of every used singular vector, relative to s_1 (float64)
# A singular value's error is at most its residual. In a float32 run W0's SVD and the products
# U0^T B, A V0 that build the operator carry errors ~1e-7 s_1 already, as do the exact engine's
# float32 singular values; float64 runs hold the values 10x tighter.
TOL_VALUES, TOL_VALUES_FLOAT32 = 1e-8, 1e-7
DENSE_FRACTION = 0.35  # a small operator whose Krylov subspace would reach this share of p: dense SVD
# A dense Wt (full fine-tune, DoRA, IA3, ...): the solver needs up to ~8 k columns for k triplets
# when Wt's spectrum is flat around s_k (bench/RESULTS.md, session 7); with a smaller budget (half
# the width) it falls back after spending more than the dense SVD it then runs.
DENSE_KRYLOV_COLUMNS = 8
BATCH_GROUP = 64       # same-rank items per batched solve (bounds the [G, p, c] blocks' memory)


@dataclass(frozen=True)
class Wanted:
    """How many top triplets of Wt each output needs (docs/science.md#vectors, #similarity, #spectra)."""

    n_vec: int    # per-vector records (K_store)
    sim_k: int    # similarity block
    k_val: int    # singular values (spectrum_wt): >= n_vec
    all_: bool    # k_store or k_spec is ALL: every triplet
    tol: float = TOL                # residual / s_1 of every used singular vector
    tol_values: float = TOL_VALUES  # residual / s_1 of the values whose vectors are not used

    @property
    def k_vectors(self) -> int:
        return max(self.n_vec, self.sim_k)

    @staticmethod
    def of(cfg: AnalysisConfig, p: int) -> Wanted:
        n_vec, sim_k = clip_k(cfg.k_store, p), clip_k(cfg.sim_k, p)
        k_val = max(n_vec, sim_k, clip_k(cfg.k_spec, p))
        tol_values = TOL_VALUES if cfg.dtype == "float64" else TOL_VALUES_FLOAT32
        return Wanted(n_vec, sim_k, k_val, cfg.k_store == ALL or cfg.k_spec == ALL,
                      TOL, tol_values)


@dataclass(frozen=True)
class Factors:
    """One LoRA-family update dW = B A in the base's singular basis (float64).

    Wt = [U0 Qb] M [V0 Qa]^T with M = diag(s0, 0) + bt @ at (module docstring).
    """

    b: torch.Tensor    # [m, r]  B, scale folded in
    r1: torch.Tensor   # [r, r]  B = Q1 R1 (Q1 never formed)
    r2: torch.Tensor   # [r, r]  A^T = Q2 R2
    bt: torch.Tensor   # [p (+ r), r]  U0^T B, then Rb (B's part outside span(U0) = Qb Rb; m > p)
    at: torch.Tensor   # [r, p (+ r)]  A V0, then Ra^T (A^T's part outside span(V0); n > p)

    def dw_svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dW = Q1 (R1 R2^T) Q2^T = (Q1 uc) diag(sd) (Q2 vch^T)^T: all of dW's singular values."""
        return svd(self.r1 @ self.r2.T)

    def dw_left(self, uc_sd: tuple[torch.Tensor, torch.Tensor, torch.Tensor], k: int,
                coords: torch.Tensor) -> torch.Tensor:
        """Top-k left singular vectors of dW, Q1 uc[:, :k] = B R2^T vch^T[:, :k] / sd[:k] (as A Q2 =
        R2^T), with `coords` = B (in R^m) or U0^T B (in the base's coordinates)."""
        _, sd, vch = uc_sd
        return coords @ (self.r2.T @ vch[:k].T / sd[:k])

    def dw_right_base(self, uc_sd: tuple[torch.Tensor, torch.Tensor, torch.Tensor], k: int,
                      p: int) -> torch.Tensor:
        """V0^T of dW's top-k right singular vectors, V0^T A^T R1^T uc[:, :k] / sd[:k] (as B^T Q1 =
        R1^T)."""
        uc, sd, _ = uc_sd
        return self.at[:, :p].T @ (self.r1.T @ uc[:, :k] / sd[:k])


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().to(F64).numpy()


def _outside(x: torch.Tensor, basis: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """R of the QR of x - basis @ coords: the part of span(x) a thin base basis misses."""
    resid = x - (basis @ coords.to(basis.dtype)).to(F64)      # [m, r]
    return torch.linalg.qr(resid, mode="r")[1]


def project_factors(base: BaseSVD, updates: Sequence[MatrixUpdate]) -> list[Factors]:
    """R of B and A^T (float64, Q never formed), then U0^T B and A V0 for the whole batch in two
    products: the only O(m p r) work, run in the base's dtype (float32 by default, like the base
    SVD itself); the small algebra is float64.
    """
    dev, dt = base.device, base.dtype
    bs, as_ = [], []
    for u in updates:
        fb, fa = u.factors()
        b = place(fb, "factor B", u.tensor, dev, F64)         # [m, r], scale folded in
        a = place(fa, "factor A", u.tensor, dev, F64)         # [r, n]
        if (b.shape[0], a.shape[1]) != base.shape or b.shape[1] != a.shape[0]:
            raise BaseMismatchError(
                f"factors B {tuple(b.shape)} and A {tuple(a.shape)} do not make a dW of the base "
                f"shape {base.shape} (fan_in_fan_out not undone?)", tensor=u.tensor)
        bs.append(b)
        as_.append(a)
    ub_all = (base.U.T @ torch.cat(bs, 1).to(dt)).to(F64)     # [p, sum r] = U0^T B
    av_all = (base.Vh @ torch.cat([a.T for a in as_], 1).to(dt)).to(F64)   # [p, sum r] = V0^T A^T
    (m, n), p = base.shape, int(base.S.shape[0])
    out, col = [], 0
    for b, a in zip(bs, as_, strict=True):
        r = int(b.shape[1])
        ub, av = ub_all[:, col : col + r], av_all[:, col : col + r]
        col += r
        bt = torch.cat([ub, _outside(b, base.U, ub)], 0) if m > p else ub
        at = torch.cat([av, _outside(a.T, base.Vh.T, av)], 0).T if n > p else av.T
        r1 = torch.linalg.qr(b, mode="r")[1]
        r2 = torch.linalg.qr(a.T, mode="r")[1]
        out.append(Factors(b, r1, r2, bt.contiguous(), at.contiguous()))
    return out


def reduced_operator(s0: torch.Tensor, f: Factors, head: int) -> LowRankUpdate:
    """M = diag(s0, 0) + Bt At with Wt = [U0 Qb] M [V0 Qa]^T (module docstring)."""
    return LowRankUpdate(s0.to(F64), f.bt, f.at, head)


def wt_triplets(op: LowRankUpdate, want: Wanted, dense_fraction: float = DENSE_FRACTION) -> Triplets:
    """Top triplets of M: Krylov when it pays, a dense SVD of the small M when it does not."""
    p, r = op.p, int(op.bt.shape[1])
    if want.all_:
        return dense_triplets(op.dense(), p)
    if op.head + 2 * r + 2 * want.k_val > dense_fraction * p:
        return dense_triplets(op.dense(), want.k_val)
    return top_triplets(op, want.k_val, op.start(), k_vectors=want.k_vectors, tol=want.tol,
                        tol_values=want.tol_values, exact_head=op.head)


def _head(want: Wanted, p: int) -> int:
    # The top K + margin base directions are spanned exactly; the preconditioner handles the rest.
    return min(p, want.k_val + 8)


def use_batched(device: torch.device) -> bool:
    """Batched same-rank solves: on by default on CUDA, where one adapter's many small kernels are
    launch-bound; off on CPU, where items already run side by side on one BLAS thread each and
    the batched method's fixed extra expansions cost more than they save (bench/RESULTS.md).
    ZOOSPECTRA_BATCHED=1 / 0 forces it either way."""
    env = os.environ.get("ZOOSPECTRA_BATCHED", "auto").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    return device.type == "cuda"


def batched_wt(base: BaseSVD, factors: dict[int, Factors], want: Wanted) -> dict[int, Triplets]:
    """Top triplets of Wt for the low-rank items, same-rank items solved together
    (krylov.top_triplets_lowrank_batched); items that take the dense path, or miss the residual
    bounds in the batch, are left out and solved alone by wt_triplets."""
    p = int(base.S.shape[0])
    head = _head(want, p)
    s0 = base.S.to(F64)
    by_rank: dict[tuple, list[int]] = {}
    for i, f in factors.items():
        r = int(f.bt.shape[1])
        if want.all_ or head + 2 * r + 2 * want.k_val > DENSE_FRACTION * p:
            continue                                   # dense SVD of the small operator instead
        by_rank.setdefault((r, tuple(f.bt.shape), tuple(f.at.shape)), []).append(i)
    out: dict[int, Triplets] = {}
    for _, items in sorted(by_rank.items()):
        for at in range(0, len(items), BATCH_GROUP):
            chunk = items[at : at + BATCH_GROUP]
            got = top_triplets_lowrank_batched(
                s0, torch.stack([factors[i].bt for i in chunk]), torch.stack([factors[i].at for i in chunk]),
                head, want.k_val, k_vectors=want.k_vectors, tol=want.tol, tol_values=want.tol_values)
            out.update({i: t for i, t in zip(chunk, got, strict=True) if t is not None})
    return out


def null_fast(base: BaseSVD, sd: np.ndarray, key: str, tensor: str, want: Wanted,
              draws: int) -> NullDraws:
    """null.py's draws on the reduced operator: draw b is the LoRA-shaped update B = U_r diag(sd),
    A = V_r^T, whose base-coordinate factors are C_u diag(sd) and C_v directly (no O(m p r)
    product); the parts outside span(U0) / span(V0) enter through the R of their QR, as in
    project_factors. One top-K_store solve per draw (wt_triplets)."""
    r, p = int(sd.size), int(base.S.shape[0])
    want = Wanted(want.n_vec, 0, want.n_vec, want.all_, want.tol, want.tol_values)
    if r == 0:
        return no_update(base, want.n_vec, draws)
    (m, n), dev = base.shape, base.device
    s0, s = base.S.to(F64), torch.as_tensor(sd, dtype=F64, device=dev)
    sig, cu_max, cv_max = [], [], []
    for b in range(draws):
        cu, cv = (c.to(dev) for c in coordinates(key, tensor, b, (m, n), r))
        bt, at = cu[:p] * s[None, :], cv[:p]
        if m > p:
            bt = torch.cat([bt, torch.linalg.qr(cu[p:] * s[None, :], mode="r")[1]], 0)
        if n > p:
            at = torch.cat([at, torch.linalg.qr(cv[p:], mode="r")[1]], 0)
        op = LowRankUpdate(s0, bt.contiguous(), at.T.contiguous(), _head(want, p))
        t = wt_triplets(op, want)
        _log_fallback(t, f"{tensor} (null draw {b + 1})")
        sig.append(_np(t.sigma[: want.n_vec]))
        cu_max.append(_np(t.U[:p, : want.n_vec].abs().max(dim=0).values))
        cv_max.append(_np(t.V[:p, : want.n_vec].abs().max(dim=0).values))
    return NullDraws(np.stack(sig), np.stack(cu_max), np.stack(cv_max), r)


def _null(base: BaseSVD, dw_sigma: np.ndarray, update: MatrixUpdate, cfg: AnalysisConfig,
          want: Wanted) -> NullDraws | None:
    if not cfg.null_draws:
        return None
    sd = nonzero_sigma(dw_sigma, base.shape, cfg.dtype)
    return null_fast(base, sd, update.null_key, update.tensor, want, cfg.null_draws)


def _lowrank_item(base: BaseSVD, base_sigma: np.ndarray, update: MatrixUpdate, f: Factors,
                  cfg: AnalysisConfig, want: Wanted, shared_seconds: float,
                  wt: Triplets | None = None) -> tuple[MatrixAnalysis, torch.Tensor]:
    """`wt`: Wt's top triplets when a batched solve already found them (else solved here)."""
    start = time.perf_counter()
    shape, p = base.shape, int(base.S.shape[0])
    s0 = base.S.to(F64)
    if wt is None:
        wt = wt_triplets(reduced_operator(s0, f, _head(want, p)), want)
    _log_fallback(wt, update.tensor)
    dw = f.dw_svd()
    sd = dw[1]
    dw_sigma = np.zeros(p)
    dw_sigma[: min(p, sd.shape[0])] = _np(sd)[:p]              # the other p - r are exactly 0
    dw_rank = numerical_rank(dw_sigma, shape, cfg.dtype)
    amp_r = amplification_rank(update.rank, dw_rank, cfg.k)
    norm_dw = float(np.sqrt(np.sum(dw_sigma**2)))
    amp = None
    if amp_r > 0:  # Hu et al. 7.3: ||(Q1 Ur)^T U0 diag(s0) V0^T (Q2 Vr)||_F
        proj = f.dw_left(dw, amp_r, f.bt[:p]).T @ (s0[:, None] * f.dw_right_base(dw, amp_r, p))
        denom = float(torch.linalg.matrix_norm(proj))
        amp = norm_dw / denom if denom > 0 else None
    null = _null(base, dw_sigma, update, cfg, want)
    item = _assemble(update, shape, cfg, base_sigma, wt, dw_sigma, want, amp, amp_r,
                     time.perf_counter() - start + shared_seconds, null)
    n_pair = pair_rank(update.rank, dw_rank, cfg.pair_max) if cfg.pairs else 0
    return item, f.dw_left(dw, n_pair, f.b)


def _dense_item(w0: torch.Tensor, base: BaseSVD, base_sigma: np.ndarray, update: MatrixUpdate,
                cfg: AnalysisConfig, want: Wanted) -> tuple[MatrixAnalysis, torch.Tensor]:
    start = time.perf_counter()
    shape, p = base.shape, int(base.S.shape[0])
    dw = delta(update, w0.device, w0.dtype)                    # [m, n]
    wt_op = DenseOperator((w0 + dw).to(F64))
    if want.all_ or _dense_is_cheaper(wt_op, want.k_val, p):
        wt = dense_triplets(wt_op.m, p if want.all_ else want.k_val)
    else:
        warm = base.Vh[: min(p, want.k_val + 8)].T.to(F64)    # the base's top right vectors
        wt = top_triplets(wt_op, want.k_val, warm, k_vectors=want.k_vectors, tol=want.tol,
                          tol_values=want.tol_values)
    _log_fallback(wt, update.tensor)
    u0, v0 = base.U.to(F64), base.Vh.T.to(F64)
    # express Wt's vectors in base coordinates so one assembly serves both paths
    wt = Triplets(wt.sigma, u0.T @ wt.U, v0.T @ wt.V, wt.residual, wt.iterations, wt.method)

    dw_sigma = _np(svdvals(dw))                   # all p of them (effective rank)
    dw_rank = numerical_rank(dw_sigma, shape, cfg.dtype)
    amp_r = amplification_rank(update.rank, dw_rank, cfg.k)
    n_pair = pair_rank(update.rank, dw_rank, cfg.pair_max) if cfg.pairs else 0
    ud, vd = _dw_vectors(dw.to(F64), max(amp_r, n_pair), p)
    norm_dw = float(np.sqrt(np.sum(dw_sigma**2)))
    amp = None
    if amp_r > 0:
        denom = float(torch.linalg.matrix_norm(ud[:, :amp_r].T @ w0.to(F64) @ vd[:, :amp_r]))
        amp = norm_dw / denom if denom > 0 else None
    null = _null(base, dw_sigma, update, cfg, want)
    item = _assemble(update, shape, cfg, base_sigma, wt, dw_sigma, want, amp, amp_r,
                     time.perf_counter() - start, null)
    return item, ud[:, :n_pair]


def _dense_is_cheaper(op: DenseOperator, k: int, p: int) -> bool:
    """A dense SVD for the top k triplets of an explicit matrix: the Krylov subspace would reach
    DENSE_FRACTION of p, or its budget (top_triplets' max_cols default, half the width) is too
    small for the ~DENSE_KRYLOV_COLUMNS k columns a flat spectrum needs."""
    return 2 * k > DENSE_FRACTION * p or int(op.shape[1]) // 2 <= DENSE_KRYLOV_COLUMNS * k


def _dw_vectors(dw: torch.Tensor, k: int, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k left/right singular vectors of a dense dW (random but seeded start)."""
    if k == 0:
        return dw.new_zeros(dw.shape[0], 0), dw.new_zeros(dw.shape[1], 0)
    op = DenseOperator(dw)
    if _dense_is_cheaper(op, k, p):
        t = dense_triplets(dw, k)
    else:
        gen = torch.Generator(device=dw.device).manual_seed(0)
        start = torch.randn(dw.shape[1], k + 8, generator=gen, dtype=F64, device=dw.device)
        t = top_triplets(op, k, start, tol=TOL)
        _log_fallback(t, "dW")
    return t.U, t.V


def _assemble(update: MatrixUpdate, shape: tuple[int, int], cfg: AnalysisConfig,
              base_sigma: np.ndarray, wt: Triplets, dw_sigma: np.ndarray, want: Wanted,
              amp: float | None, amp_r: int, seconds: float,
              null: NullDraws | None = None) -> MatrixAnalysis:
    """wt.U / wt.V hold Wt's singular vectors in base coordinates: row i <-> u0_i / v0_i."""
    p = int(base_sigma.shape[0])
    cos_u = wt.U[:p, : want.n_vec].abs().max(dim=0)
    cos_v = wt.V[:p, : want.n_vec].abs().max(dim=0)
    return build_matrix_analysis(
        tensor=update.tensor, shape=shape, cfg=cfg, base_sigma=base_sigma,
        wt_sigma=_np(wt.sigma), dw_sigma=dw_sigma,
        u_cos=(_np(cos_u.values), cos_u.indices.cpu().numpy()),
        v_cos=(_np(cos_v.values), cos_v.indices.cpu().numpy()),
        amplification=amp, amp_rank=amp_r if amp_r > 0 else None,
        similarity=_np(wt.U[: want.sim_k, : want.sim_k].abs()),   # [i, j] = |<u0_i, ut_j>|
        mode="fast", seconds=seconds, null=null,
    )


_fallback_lock = threading.Lock()
_fallback_box = threading.local()   # per unit: its thread and the _each_core threads it starts


def _fallbacks() -> list[int]:
    box = getattr(_fallback_box, "count", None)
    if box is None:
        box = _fallback_box.count = [0]
    return box


def fallback_count() -> int:
    """Dense-SVD fallbacks counted on this thread (and the item threads it started) so far; a
    unit reports its own as a difference, also when several units run on threads of one
    process (the in-process executor)."""
    return _fallbacks()[0]


def _log_fallback(t: Triplets, tensor: str) -> None:
    """Count a fallback (reported once per run: unit outcome -> run summary -> runs table); log
    at debug only: the results are exact, and a warning per unit flooded the console."""
    if t.method == "dense-fallback":
        box = _fallbacks()
        with _fallback_lock:
            box[0] += 1
        log.debug("fast engine: Krylov solve did not converge for %s; used a dense SVD of the "
                  "reduced operator instead (results exact, only slower)", tensor)


def _each_core(fn: Callable[[int], T], jobs: list[int], device: torch.device) -> list[T]:
    """fn over jobs, one job per CPU core at a time, each on one BLAS thread.

    A low-rank item is a chain of small float64 products (p x ~300 blocks) and eigh calls that
    two BLAS threads barely speed up; two items side by side on one thread each use the cores
    fully. On CUDA, or with one thread, the jobs run in order. Each job's arithmetic is the same
    either way (one job never spans threads), so the results do not depend on the scheduling.
    """
    n = torch.get_num_threads()
    if device.type != "cpu" or n <= 1 or len(jobs) <= 1:
        return [fn(j) for j in jobs]

    box = _fallbacks()

    def one_thread(j: int) -> T:
        torch.set_num_threads(1)     # this worker thread's OpenMP/MKL setting
        _fallback_box.count = box    # its fallbacks are the calling unit's
        return fn(j)

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=min(n, len(jobs)), thread_name_prefix="zs-fast") as pool:
            return list(pool.map(one_thread, jobs))
    finally:
        torch.set_num_threads(n)


def analyze_fast(w0: torch.Tensor, updates: Sequence[MatrixUpdate], cfg: AnalysisConfig,
                 device: str | torch.device = "cpu", base: BaseSVD | None = None,
                 batched: bool | None = None) -> BatchAnalysis:
    """docs/architecture.md#engines on one base matrix and a batch of its updates (API of exact).

    batched: solve same-rank LoRA items together (None: use_batched's default for the device)."""
    start = time.perf_counter()
    shape = (int(w0.shape[0]), int(w0.shape[1]))
    w0, tensor, base, base_seconds = prepare_batch(w0, updates, cfg, device, base)
    base_sigma = base.sigma()
    want = Wanted.of(cfg, min(shape))

    low = [i for i, u in enumerate(updates) if u.is_low_rank]
    t0 = time.perf_counter()
    factors = dict(zip(low, project_factors(base, [updates[i] for i in low]), strict=True)) if low else {}
    pre: dict[int, Triplets] = {}
    if factors and (use_batched(w0.device) if batched is None else batched):
        pre = batched_wt(base, factors, want)
    shared = (time.perf_counter() - t0) / max(len(low), 1)    # batched work, split evenly

    done = dict(zip(low, _each_core(
        lambda i: _lowrank_item(base, base_sigma, updates[i], factors[i], cfg, want, shared, pre.get(i)),
        low, w0.device), strict=True))
    items, subspaces = [], []
    for i, update in enumerate(updates):
        item, sub = done[i] if i in done else _dense_item(w0, base, base_sigma, update, cfg, want)
        items.append(item)
        subspaces.append(sub)
    return BatchAnalysis(
        tensor=tensor, shape=shape,
        spectrum_w0=base_sigma[: clip_k(cfg.k_spec, base_sigma.size)],
        items=items, pairs=pair_grids(subspaces) if cfg.pairs else [],
        mode="fast", dtype=cfg.dtype, device=str(w0.device),
        seconds=time.perf_counter() - start, base_seconds=base_seconds,
    )
