"""The paper's method (Shuttleworth et al. 2024; Hu et al. 2021): full thin SVDs of Wt and dW
per update, against one shared thin SVD of W0. Slow and exact; the reference for faster engines."""
from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from ..config import AnalysisConfig
from ..updates import MatrixUpdate
from .base import prepare_batch, thin_svd
from .inputs import delta
from .null import null_exact
from .pairs import pair_grids
from .results import BaseSVD, BatchAnalysis, MatrixAnalysis
from .stats import (
    amplification_rank,
    build_matrix_analysis,
    clip_k,
    nonzero_sigma,
    numerical_rank,
    pair_rank,
)


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().double().numpy()


def _best_match(vectors: torch.Tensor, base_vectors: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """max_i |<x_j, y_i>| and its argmax i for rows x_j of `vectors` [K, d] against ALL rows y_i
    of `base_vectors` [p, d]: PEFT's `(U_merged.T @ U_base).abs().max(dim=1)`."""
    best = (vectors @ base_vectors.T).abs().max(dim=1)  # [K, p] -> [K]
    return _np(best.values), best.indices.cpu().numpy()


def _amplification(w0: torch.Tensor, ud: torch.Tensor, vhd: torch.Tensor, r: int,
                   norm_dw: float) -> float | None:
    """Hu et al. 7.3: ||dW||_F / ||U_r^T W0 V_r||_F, W0 projected onto dW's top-r subspaces."""
    if r == 0:
        return None
    projected = ud[:, :r].T @ w0 @ vhd[:r].T  # [r, m] @ [m, n] @ [n, r]
    denom = float(torch.linalg.matrix_norm(projected))
    return norm_dw / denom if denom > 0 else None


def _analyze_update(w0: torch.Tensor, base: BaseSVD, base_sigma: np.ndarray, update: MatrixUpdate,
                    cfg: AnalysisConfig) -> tuple[MatrixAnalysis, torch.Tensor]:
    """One update: the MatrixAnalysis and the left singular vectors of dW kept for pairs."""
    start = time.perf_counter()
    shape = (int(w0.shape[0]), int(w0.shape[1]))
    p = min(shape)
    dw = delta(update, w0.device, w0.dtype)        # [m, n]
    ut, st, vht = thin_svd(w0 + dw, "Wt", update.tensor)
    ud, sd, vhd = thin_svd(dw, "dW", update.tensor)

    n_vec = clip_k(cfg.k_store, p)                 # >= cfg.k unless p < k (config checks)
    sim_k = clip_k(cfg.sim_k, p)
    dw_sigma = _np(sd)
    dw_rank = numerical_rank(dw_sigma, shape, cfg.dtype)
    amp_r = amplification_rank(update.rank, dw_rank, cfg.k)
    norm_dw = float(np.sqrt(np.sum(dw_sigma**2)))
    null = (null_exact(w0, base, nonzero_sigma(dw_sigma, shape, cfg.dtype), update.null_key,
                       update.tensor, n_vec, cfg.null_draws) if cfg.null_draws else None)
    item = build_matrix_analysis(
        tensor=update.tensor,
        shape=shape,
        cfg=cfg,
        base_sigma=base_sigma,
        wt_sigma=_np(st),
        dw_sigma=dw_sigma,
        u_cos=_best_match(ut[:, :n_vec].T, base.U.T),
        v_cos=_best_match(vht[:n_vec], base.Vh),
        amplification=_amplification(w0, ud, vhd, amp_r, norm_dw),
        amp_rank=amp_r if amp_r > 0 else None,
        similarity=_np((base.U[:, :sim_k].T @ ut[:, :sim_k]).abs()),
        mode="exact",
        seconds=time.perf_counter() - start,
        null=null,
    )
    return item, ud[:, : pair_rank(update.rank, dw_rank, cfg.pair_max)]


def analyze_exact(w0: torch.Tensor, updates: Sequence[MatrixUpdate], cfg: AnalysisConfig,
                  device: str | torch.device = "cpu", base: BaseSVD | None = None) -> BatchAnalysis:
    """The paper's method on one base matrix and a batch of its updates."""
    start = time.perf_counter()
    shape = (int(w0.shape[0]), int(w0.shape[1]))
    w0, tensor, base, base_seconds = prepare_batch(w0, updates, cfg, device, base)
    base_sigma = base.sigma()

    items: list[MatrixAnalysis] = []
    subspaces: list[torch.Tensor] = []  # left singular vectors of each dW, for pairs
    for update in updates:
        item, subspace = _analyze_update(w0, base, base_sigma, update, cfg)
        items.append(item)
        if cfg.pairs:
            subspaces.append(subspace)
    return BatchAnalysis(
        tensor=tensor,
        shape=shape,
        spectrum_w0=base_sigma[: clip_k(cfg.k_spec, base_sigma.size)],
        items=items,
        pairs=pair_grids(subspaces) if cfg.pairs else [],
        mode="exact",
        dtype=cfg.dtype,
        device=str(w0.device),
        seconds=time.perf_counter() - start,
        base_seconds=base_seconds,
    )
