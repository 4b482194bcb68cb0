"""Top-k singular triplets of implicit operators, float64, with a residual guarantee.

Rayleigh-Ritz on a growing subspace (block Davidson): the Ritz triplets of M on the span of Z
are read from the small Gram matrix (MZ)^T (MZ); every unconverged triplet adds its residual
M^T u - s v, preconditioned where the operator knows how. A triplet is accepted only when
||M^T u_j - s_j v_j|| <= tol * s_1 (M v_j = s_j u_j holds by construction), so the answer is
trustworthy whatever the spectrum; a subspace that grows past its budget falls back to a dense
SVD and says so in `Triplets.method`.

Operators:
  LowRankUpdate  M = D + Bt At in the base's singular basis (D = diag(s0) padded with zero rows
                 / columns for the augmented directions): products cost O((p + r) r); the
                 preconditioner (s^2 - d_i^2)^-1 inverts the diagonal part exactly in the tail.
  DenseOperator  any [P1, P2] matrix (full fine-tunes, DoRA, IA3, ...): plain residuals.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .inputs import svd

F64 = torch.float64


@dataclass(frozen=True)
class Triplets:
    """Top singular triplets of M [P1, P2]: M V = U diag(sigma), sigma descending."""

    sigma: torch.Tensor   # [K]
    U: torch.Tensor       # [P1, K]
    V: torch.Tensor       # [P2, K]
    residual: float       # max_j ||M^T u_j - s_j v_j|| / s_1 over the K returned
    iterations: int
    method: str           # "krylov" | "dense" (small problem) | "dense-fallback" (no convergence)


class Operator(Protocol):
    shape: tuple[int, int]
    cheap_matmat: bool    # M @ x cheaper than re-using the stored M Z

    def matmat(self, x: torch.Tensor) -> torch.Tensor: ...          # M @ x

    def rmatmat(self, y: torch.Tensor) -> torch.Tensor: ...         # M^T @ y

    def precondition(self, r: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...

    def dense(self) -> torch.Tensor: ...


class LowRankUpdate:
    """M = Dpad + Bt @ At with Dpad [P1, P2] holding d [p] on its diagonal, zeros elsewhere.

    `head` leading coordinates are spanned explicitly by the start subspace, so the
    preconditioner only acts on the tail, where (s^2 - d_i^2) stays away from zero.
    """

    cheap_matmat = True   # M x costs O((P1 + P2) r c), less than a product with a stored M Z

    def __init__(self, d: torch.Tensor, bt: torch.Tensor, at: torch.Tensor, head: int) -> None:
        self.d, self.bt, self.at, self.head = d, bt, at, head   # [p], [P1, r], [r, P2]
        self.p = int(d.shape[0])
        self.shape = (int(bt.shape[0]), int(at.shape[1]))
        self.d2 = torch.zeros(self.shape[1], dtype=d.dtype, device=d.device)
        self.d2[: self.p] = d * d                                # diag of Dpad^T Dpad

    def matmat(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bt @ (self.at @ x)                              # [P1, c]
        y[: self.p] += self.d[:, None] * x[: self.p]
        return y

    def rmatmat(self, y: torch.Tensor) -> torch.Tensor:
        x = self.at.T @ (self.bt.T @ y)                          # [P2, c]
        x[: self.p] += self.d[:, None] * y[: self.p]
        return x

    def head_columns(self, h: int) -> torch.Tensor:
        """M E_h: the first h columns of M, without multiplying by unit vectors."""
        y = self.bt @ self.at[:, :h]                             # [P1, h]
        idx = torch.arange(h, device=y.device)
        y[idx, idx] += self.d[:h]
        return y

    def matmat_tail(self, h: int, x: torch.Tensor) -> torch.Tensor:
        """M (0; x) for x [P2 - h, c]: a block that vanishes on the first h coordinates."""
        y = self.bt @ (self.at[:, h:] @ x)                       # [P1, c]
        y[h : self.p] += self.d[h:, None] * x[: self.p - h]
        return y

    def precondition(self, r: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """(s_j^2 - d_i^2)^-1 r_ij on the tail: the exact correction for the diagonal part."""
        t = torch.zeros_like(r)
        s2 = (sigma * sigma)[None, :]
        denom = s2 - self.d2[self.head :, None]
        t[self.head :] = r[self.head :] / torch.maximum(denom, 0.05 * s2)  # Ritz s may sit low early
        return t

    def dense(self) -> torch.Tensor:
        m = self.bt @ self.at
        idx = torch.arange(self.p, device=m.device)
        m[idx, idx] += self.d
        return m

    def start(self) -> torch.Tensor:
        """[E_head, tail rows of F]: F = [Dpad^T Bt, At^T] spans (M^T M - D^2) (docs/architecture.md)."""
        p2, r = self.shape[1], int(self.bt.shape[1])
        z = torch.zeros(p2, self.head + 2 * r, dtype=self.d.dtype, device=self.d.device)
        z[torch.arange(self.head), torch.arange(self.head)] = 1.0
        f = torch.zeros(p2, 2 * r, dtype=self.d.dtype, device=self.d.device)
        f[: self.p, :r] = self.d[:, None] * self.bt[: self.p]
        f[:, r:] = self.at.T
        z[self.head :, self.head :] = f[self.head :]
        return z


class DenseOperator:
    """An explicit matrix; no preconditioner (the expansion is then a block Lanczos step)."""

    cheap_matmat = False

    def __init__(self, m: torch.Tensor) -> None:
        self.m = m
        self.shape = (int(m.shape[0]), int(m.shape[1]))

    def matmat(self, x: torch.Tensor) -> torch.Tensor:
        return self.m @ x

    def rmatmat(self, y: torch.Tensor) -> torch.Tensor:
        return self.m.T @ y

    def precondition(self, r: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return r

    def dense(self) -> torch.Tensor:
        return self.m


def orthonormal_extension(z: torch.Tensor | None, t: torch.Tensor, rtol: float = 1e-10,
                          loss: float = 1e-12) -> torch.Tensor:
    """Orthonormal columns spanning the part of span(t) orthogonal to span(z) (z orthonormal).

    The columns are scaled to unit norm (the span is unchanged), then block classical
    Gram-Schmidt with a Gram-eigh normalisation (rank-revealing and GEMM-bound, unlike an SVD)
    drops every direction that keeps less than max(rtol, 1e-7) of a unit column: dependent, or
    in span(z) (far above what one projection leaves). A second pass ("twice is enough", Giraud et al. 2005) runs only
    when the rounding the first one can leave exceeds `loss`: eps * ||t|| / sqrt(w_min) against
    z (the projection's error, magnified by the rescaling) or eps * w_max / w_min among the new
    columns. Any loss left would show in top_triplets' residuals, which are computed against the
    operator itself, so this cannot pass a wrong triplet; it only saves work.
    """
    norms = torch.linalg.vector_norm(t, dim=0)
    live = norms > 0
    if not bool(live.any()):
        return t[:, :0]
    t = t[:, live] / norms[live]          # unit columns: the Gram's spread is then dependence only
    scale = float(t.shape[1]) ** 0.5
    if z is not None and z.shape[1] == 0:
        z = None                          # an empty basis: nothing to project out
    if z is not None:
        t = t - z @ (z.T @ t)
    w, y = torch.linalg.eigh(t.T @ t)
    keep = w > max(rtol, 1e-7) ** 2      # a unit column keeping less than this is dependent
    if not bool(keep.any()):
        return t[:, :0]
    w, y = w[keep], y[:, keep]
    t = t @ (y / w.sqrt())
    eps = 4 * torch.finfo(t.dtype).eps     # measured: max|t^T t - I| ~ 1.5 eps w_max / w_min
    w_min, w_max = float(w[0]), float(w[-1])
    drift = eps * max(w_max / w_min, scale / w_min**0.5 if z is not None else 0.0)
    if drift <= loss:
        return t
    if z is not None:
        t = t - z @ (z.T @ t)
    w, y = torch.linalg.eigh(t.T @ t)
    keep = w > 0.25                      # t was orthonormal up to drift: a tiny w is a lost column
    return t @ (y[:, keep] / w[keep].sqrt())


class _Columns:
    """A [rows, c] block that grows by appending columns (amortised doubling, no re-copy per step)."""

    def __init__(self, *first: torch.Tensor) -> None:
        cols = sum(int(b.shape[1]) for b in first)
        self.buf = first[0].new_empty(first[0].shape[0], max(2 * cols, 64))
        self.n = 0
        for block in first:
            self.append(block)

    def append(self, cols: torch.Tensor) -> None:
        need = self.n + cols.shape[1]
        if need > self.buf.shape[1]:
            grown = self.buf.new_empty(self.buf.shape[0], max(need, 2 * self.buf.shape[1]))
            grown[:, : self.n] = self.buf[:, : self.n]
            self.buf = grown
        self.buf[:, self.n : need] = cols
        self.n = need

    @property
    def value(self) -> torch.Tensor:
        return self.buf[:, : self.n]


def dense_triplets(m: torch.Tensor, k: int, method: str = "dense", iterations: int = 0) -> Triplets:
    u, s, vh = svd(m, full_matrices=False)
    k = min(k, int(s.shape[0]))
    return Triplets(sigma=s[:k], U=u[:, :k], V=vh[:k].T, residual=0.0, iterations=iterations,
                    method=method)


def top_triplets(op: Operator, k: int, start: torch.Tensor, *, k_vectors: int | None = None,
                 tol: float = 1e-10, tol_values: float = 1e-8, max_cols: int | None = None,
                 max_iter: int = 60, exact_head: int = 0) -> Triplets:
    """The top k singular triplets of `op` (float64).

    The first k_vectors (default all k) are held to residual <= tol * s_1, the rest, whose
    vectors are not used, to tol_values * s_1: a residual bounds the error of a singular value
    whatever the gaps, while a vector's error is residual / gap.
    start [P2, c]: a subspace believed close to the top right singular vectors.
    max_cols: subspace budget; past it (or after max_iter expansions) a dense SVD is used.
    exact_head: h > 0 when start = [E_h, F] with F zero on the first h rows
    (LowRankUpdate.start; the operator then provides head_columns and matmat_tail). The basis is
    then kept as Z = [E_h, (0; T)] and only the tail block T
    [P2 - h, c] is stored and orthogonalised: E_h needs no work and a correction is made
    orthogonal to it by dropping its first h rows.
    """
    p1, p2 = op.shape
    k = min(k, p1, p2)
    k_vec = k if k_vectors is None else min(k_vectors, k)
    budget = min(p2, max_cols if max_cols is not None else p2 // 2)
    h = exact_head

    def m_tail(tail: torch.Tensor) -> torch.Tensor:        # M (0; tail)
        return op.matmat_tail(h, tail) if h else op.matmat(tail)   # type: ignore[attr-defined]

    tail = orthonormal_extension(None, start[h:, h:])
    z_tail = _Columns(tail)                                 # T
    mt = m_tail(tail)
    mz = _Columns(op.head_columns(h), mt) if h else _Columns(mt)   # type: ignore[attr-defined]
    g = mz.value.T @ mz.value                               # (MZ)^T MZ
    worst = float("inf")
    for it in range(max_iter):
        c = h + z_tail.n
        if c >= k:
            w, y = torch.linalg.eigh(g)                     # Ritz pairs of M^T M on span(Z)
            w, y = w.flip(0)[:k], y.flip(1)[:, :k]
            sigma = w.clamp_min(0.0).sqrt()
            if float(sigma[0]) == 0.0:          # M = 0 on the subspace: nothing to iterate on
                break
            v = torch.cat([y[:h], z_tail.value @ y[h:]], 0)
            safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
            # u = M v / s: through the operator when that is cheaper than MZ y (low-rank M)
            u = (op.matmat(v) if op.cheap_matmat else mz.value @ y) / safe
            r = op.rmatmat(u) - v * sigma[None, :]
            res = torch.linalg.vector_norm(r, dim=0)
            limit = torch.full_like(res, tol_values)
            limit[:k_vec] = tol
            bad = res > limit * sigma[0]
            worst = float(res.max() / sigma[0])
            if not bool(bad.any()):
                return Triplets(sigma=sigma, U=u, V=v, residual=worst, iterations=it, method="krylov")
            t = op.precondition(r[:, bad], sigma[bad])
        else:                                    # start too thin: grow it like a Krylov space
            t = op.rmatmat(mz.value)
        t = orthonormal_extension(z_tail.value, t[h:])
        if t.shape[1] == 0 or c + t.shape[1] > budget:
            break
        mt = m_tail(t)
        cross = mz.value.T @ mt
        g = torch.cat([torch.cat([g, cross], 1), torch.cat([cross.T, mt.T @ mt], 1)], 0)
        z_tail.append(t)
        mz.append(mt)
    return dense_triplets(op.dense(), k, method="dense-fallback", iterations=max_iter)


# --- batched: same-shape low-rank operators side by side (GPU launch-bound regime) ---------------
def _orth_batched(z: torch.Tensor | None, t: torch.Tensor, rtol: float = 1e-7) -> torch.Tensor:
    """orthonormal_extension for a batch [G, rows, c], with fixed shapes: two projections against
    z always (no data-dependent branch), and a column that keeps less than rtol of a unit column
    (dependent, or already in span(z)) becomes a zero column instead of being dropped."""
    norms = torch.linalg.vector_norm(t, dim=1, keepdim=True)
    t = t / torch.where(norms > 0, norms, torch.ones_like(norms))
    for _ in range(2 if z is not None else 1):   # "twice is enough" (Giraud et al. 2005)
        if z is not None:
            t = t - z @ (z.mT @ t)
        w, y = torch.linalg.eigh(t.mT @ t)
        keep = w > rtol**2
        scale = torch.where(keep, w.clamp_min(rtol**2).rsqrt(), torch.zeros_like(w))
        t = t @ (y * scale[:, None, :])
    return t


def top_triplets_lowrank_batched(d: torch.Tensor, bt: torch.Tensor, at: torch.Tensor, head: int,
                                 k: int, *, k_vectors: int, tol: float, tol_values: float,
                                 expansions: int = 2) -> list[Triplets | None]:
    """top_triplets for G operators M_g = Dpad + bt[g] @ at[g] of one shape and rank, together.

    The same block Davidson as top_triplets on the same start subspace [E_h, F], run as batched
    products and batched eigh with a fixed number of expansions (every Ritz residual, converged
    or not, adds its preconditioned correction), so nothing waits on the host between steps.
    The residual bounds are checked once, at the end, per operator: an item that misses them
    comes back None and the caller solves it alone with top_triplets (and its dense fallback).
    d [p] (shared), bt [G, P1, r], at [G, r, P2].
    """
    g_n, p1, r = bt.shape
    p2, p, h = int(at.shape[2]), int(d.shape[0]), head
    k = min(k, p1, p2)
    d2 = torch.zeros(p2, dtype=d.dtype, device=d.device)
    d2[:p] = d * d

    def matmat(x: torch.Tensor) -> torch.Tensor:         # M x, x [G, P2, c]
        y = bt @ (at @ x)
        y[:, :p] += d[None, :, None] * x[:, :p]
        return y

    def rmatmat(y: torch.Tensor) -> torch.Tensor:        # M^T y, y [G, P1, c]
        x = at.mT @ (bt.mT @ y)
        x[:, :p] += d[None, :, None] * y[:, :p]
        return x

    def matmat_tail(x: torch.Tensor) -> torch.Tensor:    # M (0; x), x [G, P2 - h, c]
        y = bt @ (at[:, :, h:] @ x)
        y[:, h:p] += d[None, h:, None] * x[:, : p - h]
        return y

    head_cols = bt @ at[:, :, :h]                         # M E_h
    idx = torch.arange(h, device=d.device)
    head_cols[:, idx, idx] += d[:h]
    f = torch.zeros(g_n, p2, 2 * r, dtype=d.dtype, device=d.device)   # F = [Dpad^T Bt, At^T]
    f[:, :p, :r] = d[None, :, None] * bt[:, :p]
    f[:, :, r:] = at.mT
    tail = _orth_batched(None, f[:, h:])
    mz = torch.cat([head_cols, matmat_tail(tail)], 2)
    for it in range(expansions + 1):
        w, y = torch.linalg.eigh(mz.mT @ mz)             # Ritz pairs of M^T M on span(Z)
        w, y = w.flip(-1)[:, :k], y.flip(-1)[:, :, :k]
        sigma = w.clamp_min(0.0).sqrt()                   # [G, k]
        v = torch.cat([y[:, :h], tail @ y[:, h:]], 1)     # [G, P2, k]
        safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
        u = matmat(v) / safe[:, None, :]
        res = rmatmat(u) - v * sigma[:, None, :]
        if it == expansions:
            break
        s2 = (sigma * sigma)[:, None, :]
        denom = s2 - d2[None, h:, None]
        t = _orth_batched(tail, res[:, h:] / torch.maximum(denom, 0.05 * s2))
        tail = torch.cat([tail, t], 2)
        mz = torch.cat([mz, matmat_tail(t)], 2)
    norms = torch.linalg.vector_norm(res, dim=1)          # [G, k]
    limit = torch.full((k,), tol_values, dtype=d.dtype, device=d.device)
    limit[:k_vectors] = tol
    s1 = sigma[:, :1]
    ok = ((norms <= limit[None, :] * s1).all(1) & (s1[:, 0] > 0)).tolist()   # the one host sync
    worst = (norms.max(1).values / torch.where(s1[:, 0] > 0, s1[:, 0], 1.0)).tolist()
    return [Triplets(sigma=sigma[i], U=u[i], V=v[i], residual=worst[i], iterations=expansions,
                     method="krylov-batched") if ok[i] else None for i in range(g_n)]
