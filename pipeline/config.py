"""Typed analysis configuration, validated once at the edge (CLI / job spec)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Literal

from .errors import ConfigError

Mode = Literal["exact", "fast"]
Dtype = Literal["float32", "float64"]
ALL = -1  # "all" for k_store / k_spec
MAX_NULL_DRAWS = 10_000


@dataclass(frozen=True)
class AnalysisConfig:
    """What is computed per (base matrix, update). Definitions: docs/science.md.

    k, eps:     intruder test defaults (paper: top 10 vectors, |cos| < 0.5); stored in `matrices`.
    k_store:    top singular vectors of Wt recorded per side in `vectors` (ALL = every one).
    k_spec:     singular values kept per spectrum in `spectra` (ALL = every one).
    sim_k:      size of the |U0[:, :K]^T Ut[:, :K]| block in `similarity`.
    pair_max:   largest i, j of the adapter-vs-adapter phi grid in `pairs`.
    pairs:      compute adapter-vs-adapter subspace similarity within each unit (O(batch^2)).
    mode:       "fast" (default) = structured solvers (docs/architecture.md#engines); "exact" =
                the paper's full SVDs, the check every fast result is tested against.
    dtype:      float32 or float64 for every decomposition (never half precision).
    null_draws: random-direction null draws per matrix (docs/science.md#null); 0 = off (the
                default: each draw costs about one more solve per matrix, bench/RESULTS.md).
    """

    k: int = 10
    eps: float = 0.5
    k_store: int = 32
    k_spec: int = 64
    sim_k: int = 10
    pair_max: int = 64
    pairs: bool = False
    mode: Mode = "fast"
    dtype: Dtype = "float32"
    include_embeddings: bool = False
    null_draws: int = 0

    def __post_init__(self) -> None:
        for name in ("k", "k_store", "k_spec", "sim_k", "pair_max", "null_draws"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ConfigError(f"{name} must be an integer, got {v!r}", option=name)
        if not isinstance(self.eps, (int, float)) or isinstance(self.eps, bool):
            raise ConfigError(f"eps must be a number, got {self.eps!r}", option="eps")
        if self.k < 1:
            raise ConfigError(f"k must be >= 1, got {self.k}", option="k")
        if not 0.0 < self.eps < 1.0:
            raise ConfigError(f"eps must lie in (0, 1), got {self.eps}", option="eps")
        if self.k_store != ALL and self.k_store < self.k:
            raise ConfigError(
                f"k_store ({self.k_store}) must be >= k ({self.k}) or 'all'", option="k_store"
            )
        for name in ("k_spec", "sim_k", "pair_max"):
            v = getattr(self, name)
            if v != ALL and v < 1:
                raise ConfigError(f"{name} must be >= 1 or 'all', got {v}", option=name)
        if not 0 <= self.null_draws <= MAX_NULL_DRAWS:
            raise ConfigError(f"null_draws must lie in 0..{MAX_NULL_DRAWS}, got {self.null_draws}",
                              option="null_draws")
        if self.mode not in ("exact", "fast"):
            raise ConfigError(f"mode must be 'exact' or 'fast', got {self.mode!r}", option="mode")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"dtype must be float32 or float64, got {self.dtype!r}", option="dtype")

    def to_json(self) -> str:
        fields = asdict(self)
        if not self.null_draws:      # off: the JSON (and unit ids) of configs from before the null
            del fields["null_draws"]
        return json.dumps(fields, sort_keys=True)

    def fingerprint(self) -> str:
        """Stable hash of everything that changes the numbers (part of every unit id)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]
