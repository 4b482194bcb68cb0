"""Statistics from singular values and cosines, shared by every engine (exact.py and fast.py).

An engine computes the raw spectral quantities its own way; `build_matrix_analysis` turns them
into a `MatrixAnalysis` so that every engine applies the same definitions (docs/science.md).
"""
from __future__ import annotations

import math

import numpy as np

from ..config import ALL, AnalysisConfig
from .results import MatrixAnalysis, NullDraws, SideVectors

_EPS = {"float32": float(np.finfo(np.float32).eps), "float64": float(np.finfo(np.float64).eps)}


def clip_k(k: int, p: int) -> int:
    """A config count (or ALL) as a number of entries available out of p."""
    return p if k == ALL else min(k, p)


def zero_tolerance(s_max: float, shape: tuple[int, int], dtype: str) -> float:
    """Singular values at or below this are zero: 0.5 * sqrt(m + n + 1) * eps_machine(dtype) * s_max.

    Numerical Recipes' SVD threshold (3rd ed., section 2.6), set by the precision the spectrum
    was computed in. A backward-stable SVD in `dtype` resolves every singular value to within a
    few eps * s_max: measured, the rounding noise of a rank-r update formed and decomposed in
    float32 stays below 3.3 eps * s_max (384..4096 wide), while this threshold is 14 eps * s_max
    at 384 x 384 and 36 eps * s_max at 4096 x 1024. numpy.linalg.matrix_rank's worst-case bound,
    max(m, n) * eps * s_max (384 eps at 384 x 384, i.e. 4.6e-5 s_max in float32), sits far above
    that noise and dropped real singular values of full-rank updates: DoRA's dense dW has values
    down to 7 eps * s_max, and float32 runs gave it an effective rank 0.05% below float64's.
    Float64 runs form every update in float64 (adapters.load_update), so their noise is float64's.
    """
    m, n = shape
    return 0.5 * math.sqrt(m + n + 1) * _EPS[dtype] * s_max


def nonzero_sigma(s: np.ndarray, shape: tuple[int, int], dtype: str) -> np.ndarray:
    """The singular values of `s` (descending) above the zero tolerance."""
    if s.size == 0 or s[0] <= 0.0:
        return s[:0]
    return s[s > zero_tolerance(float(s[0]), shape, dtype)]


def numerical_rank(s: np.ndarray, shape: tuple[int, int], dtype: str) -> int:
    return int(nonzero_sigma(s, shape, dtype).size)


def effective_rank(s: np.ndarray, shape: tuple[int, int], dtype: str) -> float | None:
    """Roy & Vetterli (2007): exp(entropy of the L1-normalised nonzero singular values)."""
    s = nonzero_sigma(s, shape, dtype)
    if s.size == 0:
        return None
    p = s / s.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def amplification_rank(update_rank: int | None, dw_rank: int, k: int) -> int:
    """r for Hu et al. 7.3: the adapter's rank when known, else min(k, rank(dW)).

    Never above rank(dW): singular vectors past the numerical rank span an arbitrary part of
    the null space, so using them would make the number depend on the LAPACK build.
    """
    return min(update_rank, dw_rank) if update_rank else min(k, dw_rank)


def pair_rank(update_rank: int | None, dw_rank: int, pair_max: int) -> int:
    """How many leading left singular vectors of dW enter the phi grid (Hu et al. 7.2)."""
    r = min(update_rank, dw_rank) if update_rank else dw_rank
    return r if pair_max == ALL else min(r, pair_max)


def side_vectors(
    wt_sigma: np.ndarray, max_cos: np.ndarray, argmax: np.ndarray, base_sigma: np.ndarray
) -> SideVectors:
    """Per-vector record for the len(max_cos) top vectors of Wt."""
    n = max_cos.shape[0]
    argmax = argmax.astype(np.int64)
    return SideVectors(
        sigma=np.asarray(wt_sigma[:n], dtype=np.float64),
        max_cos=np.asarray(max_cos, dtype=np.float64),
        argmax=argmax,
        base_sigma=np.asarray(base_sigma[argmax], dtype=np.float64),
    )


def build_matrix_analysis(
    *,
    tensor: str,
    shape: tuple[int, int],
    cfg: AnalysisConfig,
    base_sigma: np.ndarray,
    wt_sigma: np.ndarray,
    dw_sigma: np.ndarray,
    u_cos: tuple[np.ndarray, np.ndarray],
    v_cos: tuple[np.ndarray, np.ndarray],
    amplification: float | None,
    amp_rank: int | None,
    similarity: np.ndarray,
    mode: str,
    seconds: float,
    null: NullDraws | None = None,
) -> MatrixAnalysis:
    """Assemble one MatrixAnalysis.

    base_sigma: all p singular values of W0.  wt_sigma: the top singular values of Wt (at least
    as many as u_cos has entries).  dw_sigma: the singular values of dW, all of them or all of
    the nonzero ones (norms and effective rank are sums over them).  u_cos / v_cos: (max |cos|,
    0-based argmax) over all base vectors for the top K_store vectors of Wt, K_store >= cfg.k
    or all p.
    """
    dw_sigma = np.asarray(dw_sigma, dtype=np.float64)
    norm_w0 = math.sqrt(float(np.sum(np.square(base_sigma, dtype=np.float64))))
    norm_dw = math.sqrt(float(np.sum(np.square(dw_sigma))))
    spec = float(dw_sigma[0]) if dw_sigma.size else 0.0
    u = side_vectors(wt_sigma, *u_cos, base_sigma)
    v = side_vectors(wt_sigma, *v_cos, base_sigma)
    return MatrixAnalysis(
        tensor=tensor,
        shape=shape,
        norm_w0=norm_w0,
        norm_dw=norm_dw,
        spec_norm_dw=spec,
        stable_rank=norm_dw**2 / spec**2 if spec > 0 else None,
        rel_update=norm_dw / norm_w0 if norm_w0 > 0 else None,
        eff_rank=effective_rank(dw_sigma, shape, cfg.dtype),
        dw_rank=numerical_rank(dw_sigma, shape, cfg.dtype),
        intr_k=cfg.k,
        intr_eps=cfg.eps,
        intruders_u=u.intruders(cfg.k, cfg.eps),
        intruders_v=v.intruders(cfg.k, cfg.eps),
        amplification=amplification,
        amp_rank=amp_rank,
        u=u,
        v=v,
        spectrum_wt=np.asarray(wt_sigma[: clip_k(cfg.k_spec, wt_sigma.size)], dtype=np.float64),
        spectrum_dw=dw_sigma[: clip_k(cfg.k_spec, dw_sigma.size)],
        similarity=np.asarray(similarity, dtype=np.float64),
        mode=mode,
        seconds=seconds,
        null=null,
    )
