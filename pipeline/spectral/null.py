"""Null baseline (docs/science.md#null): what a random update of the same spectrum would show.

A null draw of an update dW of W0 [m, n] with nonzero singular values sd (r of them) is

    Wt_null = W0 + U_r diag(sd) V_r^T,    U_r [m, r], V_r [n, r] Haar-random orthonormal,

i.e. the same singular values, uniformly random directions. Each draw records, like the
observed Wt, s_j and max_i |<x_j(Wt_null), x_i(W0)>| of its top K_store singular vectors per side,
so the intruder count of any (eps, k <= K_store) can be read off in SQL (intruders_vs_null).

The directions are drawn in the base's coordinates: U_r = [U0 U0perp] C_u with C_u [m, r] the
Q factor (signs fixed, so Haar) of a Gaussian matrix. A Haar matrix in any orthonormal basis is
Haar, and every recorded number (singular values, cosines with U0/V0) is the same for any choice
of the complement basis U0perp, so the exact engine (dense W0 + U_r diag(sd) V_r^T, full SVD)
and the fast engine (the reduced operator diag(s0) + Bt At, krylov.py) see the same draws.
The Gaussians are seeded from a hash of (artifact key, tensor, draw): reruns are identical and
draws do not depend on the batch an update was analysed in.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from .base import thin_svd
from .results import BaseSVD, NullDraws

F64 = torch.float64


def draw_seed(key: str, tensor: str, draw: int) -> int:
    """A stable 63-bit seed for one draw: sha256 of (artifact key, tensor, draw index)."""
    digest = hashlib.sha256(f"zoospectra-null\0{key}\0{tensor}\0{draw}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def haar(gen: torch.Generator, rows: int, cols: int) -> torch.Tensor:
    """[rows, cols] orthonormal columns, Haar-distributed (Mezzadri 2007: QR of a Gaussian with
    R's diagonal made positive), float64 on the CPU."""
    z = torch.randn(rows, cols, generator=gen, dtype=F64)
    q, r = torch.linalg.qr(z)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs[None, :]


def coordinates(key: str, tensor: str, draw: int, shape: tuple[int, int],
                r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(C_u [m, r], C_v [n, r]) of one draw in the base's coordinates (module docstring):
    rows :p along U0 / V0, rows p: along their orthogonal complements. CPU float64."""
    gen = torch.Generator(device="cpu").manual_seed(draw_seed(key, tensor, draw))
    m, n = shape
    return haar(gen, m, r), haar(gen, n, r)


def no_update(base: BaseSVD, n_vec: int, draws: int) -> NullDraws:
    """dW = 0: every draw is W0 itself (its own vectors, cosine 1)."""
    s0 = base.sigma()[:n_vec]
    ones = np.ones((draws, s0.size))
    return NullDraws(np.tile(s0, (draws, 1)), ones, ones.copy(), 0)


def null_exact(w0: torch.Tensor, base: BaseSVD, sd: np.ndarray, key: str, tensor: str,
               n_vec: int, draws: int) -> NullDraws:
    """The reference: each draw formed densely in R^{m x n} and decomposed by a full thin SVD."""
    r = int(sd.size)
    if r == 0:
        return no_update(base, n_vec, draws)
    m, n = int(w0.shape[0]), int(w0.shape[1])
    u_full = _complete(base.U.to(F64))             # [m, m] = [U0 U0perp]
    v_full = _complete(base.Vh.T.to(F64))          # [n, n]
    s = torch.as_tensor(sd, dtype=F64, device=w0.device)
    sig, cu_max, cv_max = [], [], []
    for b in range(draws):
        cu, cv = coordinates(key, tensor, b, (m, n), r)
        ur = u_full @ cu.to(w0.device)
        vr = v_full @ cv.to(w0.device)
        wt = w0.to(F64) + (ur * s[None, :]) @ vr.T
        ut, st, vht = thin_svd(wt, "null Wt", tensor)
        sig.append(st[:n_vec].cpu().numpy())
        cu_max.append((ut[:, :n_vec].T @ base.U.to(F64)).abs().max(dim=1).values.cpu().numpy())
        cv_max.append((vht[:n_vec] @ base.Vh.T.to(F64)).abs().max(dim=1).values.cpu().numpy())
    return NullDraws(np.stack(sig), np.stack(cu_max), np.stack(cv_max), r)


def _complete(q: torch.Tensor) -> torch.Tensor:
    """[Q Qperp]: Q [m, p] orthonormal completed to an orthonormal basis of R^m."""
    m, p = int(q.shape[0]), int(q.shape[1])
    if p == m:
        return q
    full = torch.linalg.qr(q, mode="complete")[0]   # first p columns span span(Q)
    return torch.cat([q, full[:, p:]], 1)
