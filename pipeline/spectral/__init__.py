"""The math: spectral analysis of weight updates, no I/O (docs/science.md).

    base = base_svd(w0, cfg, device)                    # once per base matrix
    batch = analyze_batch(w0, updates, cfg, device, base)

Engines, chosen by cfg.mode:
  exact    the paper's method: full thin SVDs of Wt and dW per update (exact.py)
  fast     structured Krylov solvers (fast.py), same results within the tolerances of
           docs/architecture.md#engines

Modules: results (dataclasses returned), stats (definitions shared by every engine), base (the
shared base SVD), pairs (adapter vs adapter), inputs (device, dtype, validation).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..config import AnalysisConfig
from ..updates import MatrixUpdate
from .base import base_svd
from .results import BaseSVD, BatchAnalysis, MatrixAnalysis, PairGrid, SideVectors

Engine = Callable[..., BatchAnalysis]

__all__ = [
    "analyze_batch", "base_svd", "BaseSVD", "BatchAnalysis", "MatrixAnalysis", "PairGrid",
    "SideVectors",
]


def _engine(mode: str) -> Engine:
    if mode == "exact":
        from .exact import analyze_exact

        return analyze_exact
    try:  # imported on first use, like exact.py (same signature)
        from .fast import analyze_fast
    except ImportError as e:
        raise NotImplementedError(
            f"analysis mode {mode!r} is not implemented yet; use mode='exact'") from e
    return analyze_fast


def analyze_batch(w0: torch.Tensor, updates: Sequence[MatrixUpdate], cfg: AnalysisConfig,
                  device: str | torch.device = "cpu", base: BaseSVD | None = None) -> BatchAnalysis:
    """Analyse every update of one base matrix W0 [m, n] (PyTorch [out, in] layout).

    `base` (from base_svd on the same W0, cfg and device) is computed here when not given;
    either way it is computed once and shared by the whole batch. Results come back on the CPU.
    """
    return _engine(cfg.mode)(w0, updates, cfg, device, base)
