"""Bootstrap intervals over artifacts and effect sizes between groups (docs/science.md#uncertainty).

Percentile bootstrap (Efron & Tibshirani 1993, ch. 13): resample the artifacts of a group with
replacement n_boot times, take the statistic of each resample, and report its (1 - level) / 2
and (1 + level) / 2 quantiles (numpy's default linear interpolation). Seeds are stable: each
interval's generator is seeded from sha256(seed, label), so adding a group never moves the
intervals of the others, and a report is reproducible.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

N_BOOT, LEVEL, SEED = 2000, 0.95, 0


def rng_for(seed: int, label: str) -> np.random.Generator:
    """The generator of one interval: independent of every other label's."""
    digest = hashlib.sha256(f"zoospectra-bootstrap\0{seed}\0{label}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def resample_means(x: np.ndarray, rng: np.random.Generator, n_boot: int) -> np.ndarray:
    """[n_boot] means of resamples of x (all drawn as one [n_boot, n] index block)."""
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    return x[idx].mean(axis=1)


def _interval(stats: np.ndarray, level: float) -> tuple[float, float] | tuple[None, None]:
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return None, None
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


@dataclass(frozen=True)
class MeanCI:
    n: int
    mean: float
    lo: float | None      # None: fewer than 2 artifacts (no spread to resample)
    hi: float | None


def mean_ci(values: Sequence[float], label: str, *, n_boot: int = N_BOOT, level: float = LEVEL,
            seed: int = SEED) -> MeanCI:
    """Mean of `values` (one per artifact) with its percentile bootstrap interval."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError(f"{label}: no values")
    if x.size < 2:
        return MeanCI(1, float(x[0]), None, None)
    lo, hi = _interval(resample_means(x, rng_for(seed, label), n_boot), level)
    return MeanCI(int(x.size), float(x.mean()), lo, hi)


def cohen_d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(mean a - mean b) / pooled standard deviation; nan when it is undefined (no spread)."""
    na, nb = a.shape[-1], b.shape[-1]
    # a group of one adds no spread (and numpy would warn on its ddof=1 variance)
    va = a.var(axis=-1, ddof=1) if na > 1 else np.zeros(a.shape[:-1])
    vb = b.var(axis=-1, ddof=1) if nb > 1 else np.zeros(b.shape[:-1])
    pooled = np.sqrt(((na - 1) * va + (nb - 1) * vb) / (na + nb - 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(np.where(pooled > 0, (a.mean(axis=-1) - b.mean(axis=-1)) / pooled, np.nan))


@dataclass(frozen=True)
class Effect:
    diff: float                 # mean a - mean b
    diff_lo: float | None
    diff_hi: float | None
    d: float | None             # Cohen's d (pooled SD); None when both groups have no spread
    d_lo: float | None
    d_hi: float | None


def effect(a_values: Sequence[float], b_values: Sequence[float], label: str, *, n_boot: int = N_BOOT,
           level: float = LEVEL, seed: int = SEED) -> Effect:
    """Group a against group b: difference of means and Cohen's d, each with a percentile
    bootstrap interval from resampling both groups independently (intervals need >= 2 per group)."""
    a, b = np.asarray(a_values, dtype=np.float64), np.asarray(b_values, dtype=np.float64)
    diff = float(a.mean() - b.mean())
    d = float(cohen_d(a, b)) if a.size + b.size > 2 else float("nan")
    if a.size < 2 or b.size < 2:
        return Effect(diff, None, None, d if np.isfinite(d) else None, None, None)
    rng = rng_for(seed, label)
    ra = a[rng.integers(0, a.size, size=(n_boot, a.size))]
    rb = b[rng.integers(0, b.size, size=(n_boot, b.size))]
    diff_lo, diff_hi = _interval(ra.mean(axis=1) - rb.mean(axis=1), level)
    d_lo, d_hi = _interval(cohen_d(ra, rb), level)
    return Effect(diff, diff_lo, diff_hi, d if np.isfinite(d) else None, d_lo, d_hi)
