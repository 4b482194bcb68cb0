"""What the spectral math returns: plain dataclasses of numpy arrays and Python numbers.

Indices here are 0-based (numpy); records.py writes them 1-based as schemas/tables.py says.
Statistics that are undefined for a given matrix (e.g. the stable rank of dW = 0) are None,
which becomes a null in the tables.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class BaseSVD:
    """Thin SVD of one base matrix W0 [m, n], computed once and shared by every update of a batch.

    Tensors stay on the device they were computed on, in the analysis dtype.
    """

    U: torch.Tensor   # [m, p] left singular vectors (columns), p = min(m, n)
    S: torch.Tensor   # [p] singular values, descending
    Vh: torch.Tensor  # [p, n] right singular vectors (rows)
    seconds: float

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.U.shape[0]), int(self.Vh.shape[1]))

    @property
    def dtype(self) -> torch.dtype:
        return self.S.dtype

    @property
    def device(self) -> torch.device:
        return self.S.device

    def sigma(self) -> np.ndarray:
        """All p singular values of W0 as float64 numpy."""
        return self.S.detach().cpu().double().numpy()


@dataclass(frozen=True, eq=False)
class SideVectors:
    """Per-vector record (docs/science.md#vectors) for one side (U: left, V: right) of the top
    singular vectors of Wt: entry j describes the (j+1)-th largest."""

    sigma: np.ndarray       # [K] s_j(Wt)
    max_cos: np.ndarray     # [K] max_i |<x_j(Wt), x_i(W0)>| over ALL p base vectors of that side
    argmax: np.ndarray      # [K] 0-based index i of that maximum (int64)
    base_sigma: np.ndarray  # [K] s_i(W0) at argmax

    def __len__(self) -> int:
        return int(self.sigma.shape[0])

    def intruders(self, k: int, eps: float) -> int:
        """Intruder count among the top k (Shuttleworth et al. Def. 1, PEFT's `cos[:k] < eps`)."""
        return int(np.count_nonzero(self.max_cos[:k] < eps))


@dataclass(frozen=True, eq=False)
class NullDraws:
    """B random-direction null draws (null.py) of one (artifact, matrix): row b describes draw b + 1."""

    sigma: np.ndarray     # [B, K] s_j(Wt_null), descending
    max_cos_u: np.ndarray  # [B, K] max_i |<u_j(Wt_null), u0_i>| over all p base vectors
    max_cos_v: np.ndarray  # [B, K] same, right singular vectors
    rank: int              # r: the number of singular values of dW kept (its numerical rank)

    @property
    def draws(self) -> int:
        return int(self.sigma.shape[0])


@dataclass(frozen=True, eq=False)
class MatrixAnalysis:
    """Everything docs/science.md defines per (base matrix, update), phi aside (PairGrid)."""

    tensor: str
    shape: tuple[int, int]        # (m, n)
    norm_w0: float                # ||W0||_F
    norm_dw: float                # ||dW||_F
    spec_norm_dw: float           # ||dW||_2
    stable_rank: float | None     # ||dW||_F^2 / ||dW||_2^2; None when dW = 0
    rel_update: float | None      # ||dW||_F / ||W0||_F; None when W0 = 0
    eff_rank: float | None        # Roy-Vetterli effective rank of dW; None when dW = 0
    dw_rank: int                  # numerical rank of dW (stats.zero_tolerance)
    intr_k: int                   # the k and eps the two counts below use
    intr_eps: float
    intruders_u: int
    intruders_v: int
    amplification: float | None   # ||dW||_F / ||U_r^T W0 V_r||_F (Hu et al. 7.3); None when r = 0
    amp_rank: int | None          # r used for it
    u: SideVectors
    v: SideVectors
    spectrum_wt: np.ndarray       # top k_spec singular values of Wt
    spectrum_dw: np.ndarray       # top k_spec singular values of dW
    similarity: np.ndarray        # [K, K], [i, j] = |<u0_i, ut_j>|, K = sim_k clipped to p
    mode: str                     # "exact" | "fast"
    seconds: float                # this update's own work (the shared base SVD is not included)
    null: NullDraws | None = None  # cfg.null_draws random-direction draws (null.py); None when off


@dataclass(frozen=True, eq=False)
class PairGrid:
    """Adapter-vs-adapter subspace similarity (Hu et al. 7.2) of updates a < b of one batch:
    phi[i-1, j-1] = ||U_a[:, :i]^T U_b[:, :j]||_F^2 / min(i, j), U the left singular vectors of dW."""

    a: int
    b: int
    phi: np.ndarray  # [r_a, r_b]


@dataclass(frozen=True, eq=False)
class BatchAnalysis:
    """One base matrix with a batch of updates of it."""

    tensor: str
    shape: tuple[int, int]
    spectrum_w0: np.ndarray        # top k_spec singular values of W0
    items: list[MatrixAnalysis]    # aligned with the updates passed in
    pairs: list[PairGrid]          # empty unless cfg.pairs
    mode: str
    dtype: str
    device: str
    seconds: float                 # wall time of the whole batch, base SVD included
    base_seconds: float            # the base SVD's share (0 when a precomputed one was passed)
