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

    def matmat(self, x: torch.Tensor) -> torch.Tensor: ...          # M @ x

    def rmatmat(self, y: torch.Tensor) -> torch.Tensor: ...         # M^T @ y

    def precondition(self, r: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...

    def dense(self) -> torch.Tensor: ...


class LowRankUpdate:
    """M = Dpad + Bt @ At with Dpad [P1, P2] holding d [p] on its diagonal, zeros elsewhere.

    `head` leading coordinates are spanned explicitly by the start subspace, so the
    preconditioner only acts on the tail, where (s^2 - d_i^2) stays away from zero.
    """

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
        """[E_head, tail rows of F]: F = [Dpad^T Bt, At^T] spans (M^T M - D^2) (DESIGN 6)."""
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


def orthonormal_extension(z: torch.Tensor | None, t: torch.Tensor, rtol: float = 1e-10) -> torch.Tensor:
    """Orthonormal columns spanning the part of span(t) orthogonal to span(z).

    Block CGS2 against z, then two Gram-eigh passes (rank-revealing, GEMM-bound unlike an SVD):
    the first drops directions below rtol * ||t||_F, the second restores orthonormality.
    """
    if t.shape[1] == 0:
        return t
    scale = float(torch.linalg.vector_norm(t))
    if scale == 0.0:
        return t[:, :0]
    for _ in range(2):  # twice is enough (Giraud et al. 2005)
        if z is not None and z.shape[1]:
            t = t - z @ (z.T @ t)
    for cut in (max(rtol, 1e-7) * scale, 0.5):
        w, y = torch.linalg.eigh(t.T @ t)
        keep = w > cut * cut if cut < 0.5 else w > 0.25
        t = t @ (y[:, keep] / w[keep].sqrt())
        if z is not None and z.shape[1]:
            t = t - z @ (z.T @ t)
    return t


def dense_triplets(m: torch.Tensor, k: int, method: str = "dense", iterations: int = 0) -> Triplets:
    u, s, vh = svd(m, full_matrices=False)
    k = min(k, int(s.shape[0]))
    return Triplets(sigma=s[:k], U=u[:, :k], V=vh[:k].T, residual=0.0, iterations=iterations,
                    method=method)


def _ritz(z: torch.Tensor, mz: torch.Tensor, g: torch.Tensor, k: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k Ritz triplets of M on span(z) from the Gram matrix g = (MZ)^T MZ."""
    w, y = torch.linalg.eigh(g)                       # ascending
    w, y = w.flip(0)[:k], y.flip(1)[:, :k]
    sigma = w.clamp_min(0.0).sqrt()
    safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    return sigma, mz @ y / safe, z @ y


def top_triplets(op: Operator, k: int, start: torch.Tensor, *, k_vectors: int | None = None,
                 tol: float = 1e-10, tol_values: float = 1e-8, max_cols: int | None = None,
                 max_iter: int = 60, exact_head: int = 0) -> Triplets:
    """The top k singular triplets of `op` (float64).

    The first k_vectors (default all k) are held to residual <= tol * s_1, the rest, whose
    vectors are not used, to tol_values * s_1: a residual bounds the error of a singular value
    whatever the gaps, while a vector's error is residual / gap.
    start [P2, c]: a subspace believed close to the top right singular vectors.
    max_cols: subspace budget; past it (or after max_iter expansions) a dense SVD is used.
    exact_head: the first exact_head columns of start are e_1..e_h and the others vanish on those
    rows (LowRankUpdate.start), so they are orthogonal already and skip the Gram passes.
    """
    p1, p2 = op.shape
    k = min(k, p1, p2)
    k_vec = k if k_vectors is None else min(k_vectors, k)
    budget = min(p2, max_cols if max_cols is not None else p2 // 2)
    if exact_head:  # start = [E_head, F] with F zero on the head rows: only F needs orthonormalising
        z = torch.cat([start[:, :exact_head], orthonormal_extension(None, start[:, exact_head:])], 1)
    else:
        z = orthonormal_extension(None, start)
    mz = op.matmat(z)
    g = mz.T @ mz
    worst = float("inf")
    for it in range(max_iter):
        if z.shape[1] >= k:
            sigma, u, v = _ritz(z, mz, g, k)
            if float(sigma[0]) == 0.0:          # M = 0 on the subspace: nothing to iterate on
                break
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
            t = op.rmatmat(mz)
        t = orthonormal_extension(z, t)
        if t.shape[1] == 0 or z.shape[1] + t.shape[1] > budget:
            break
        mt = op.matmat(t)
        cross = mz.T @ mt
        g = torch.cat([torch.cat([g, cross], 1), torch.cat([cross.T, mt.T @ mt], 1)], 0)
        z, mz = torch.cat([z, t], 1), torch.cat([mz, mt], 1)
    return dense_triplets(op.dense(), k, method="dense-fallback", iterations=max_iter)
