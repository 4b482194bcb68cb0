"""Adapter vs adapter (Hu et al. 2021 sec. 7.2): normalised subspace similarity of two updates."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .results import PairGrid


def phi_grid(ua: torch.Tensor, ub: torch.Tensor) -> np.ndarray:
    """phi[i-1, j-1] = ||Ua[:, :i]^T Ub[:, :j]||_F^2 / min(i, j) for every i <= ra, j <= rb.

    One product: ||Ua[:, :i]^T Ub[:, :j]||_F^2 is the sum of the squared entries of the
    leading i x j block of Ua^T Ub, i.e. a 2-D cumulative sum of its squares.
    """
    ra, rb = int(ua.shape[1]), int(ub.shape[1])
    if ra == 0 or rb == 0:
        return np.zeros((ra, rb))
    sq = (ua.T @ ub).double().square()                      # [ra, rb]
    block = sq.cumsum(dim=0).cumsum(dim=1).cpu().numpy()    # ||.||_F^2 of each leading block
    i = np.arange(1, ra + 1)[:, None]
    j = np.arange(1, rb + 1)[None, :]
    # phi lies in [0, 1]; float32 singular vectors are orthonormal only to rounding
    return np.clip(block / np.minimum(i, j), 0.0, 1.0)


def pair_grids(subspaces: Sequence[torch.Tensor]) -> list[PairGrid]:
    """phi grids for every pair a < b of a batch; subspaces[a] = leading left singular vectors of dW_a."""
    return [
        PairGrid(a=a, b=b, phi=phi_grid(subspaces[a], subspaces[b]))
        for a in range(len(subspaces))
        for b in range(a + 1, len(subspaces))
    ]
