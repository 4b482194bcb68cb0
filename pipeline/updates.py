"""The exact per-matrix update a fine-tune applied: the one object the math consumes.

An update is kept factored when it is low rank (LoRA family: dW = B @ A, scale folded into B)
so the fast path can exploit structure, and dense otherwise. Everything is float32 or float64
in PyTorch's [out, in] layout (fan_in_fan_out already undone).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypedDict

if TYPE_CHECKING:
    import torch


UpdateKind = Literal[
    "lora", "dora", "adalora", "loha", "lokr", "vera", "ia3", "full", "modules_to_save"
]
Role = Literal["linear", "embedding", "head", "other"]


class UpdateInfo(TypedDict, total=False):
    """MatrixUpdate's optional numbers, gathered once and passed (**info) to either representation."""

    rank: int | None
    alpha: float | None
    scale: float | None
    norm_a: float | None
    norm_b: float | None


@dataclass
class MatrixUpdate:
    """dW for one base tensor from one artifact.

    Exactly one representation is set: `dense` ([m, n]) or the factors `B` ([m, r], scale
    already applied) and `A` ([r, n]) with dW = B @ A.
    """

    tensor: str                      # base checkpoint key, e.g. "encoder.layer.0.attention.self.query.weight"
    kind: UpdateKind
    shape: tuple[int, int]           # (m, n) of the base matrix
    dense: torch.Tensor | None = None
    B: torch.Tensor | None = None
    A: torch.Tensor | None = None
    role: Role = "linear"
    rank: int | None = None       # adapter rank r (LoRA family), None for dense kinds
    alpha: float | None = None
    scale: float | None = None    # the scale actually applied (alpha/r, alpha/sqrt(r), ...)
    norm_a: float | None = None   # ||A||_F and ||B||_F of the raw (unscaled) factors
    norm_b: float | None = None
    # The init (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) rewrote the base before training: dW is
    # relative to a modified base. Stored as matrices.base_rewritten.
    base_rewritten: bool = False
    # Caveats a reader of this matrix's numbers must know (stored as matrices.warnings).
    warnings: tuple[str, ...] = ()
    # Seeds the null draws of this update (spectral/null.py): the artifact's model_uid in a run,
    # so reruns draw the same directions whatever batch the update lands in.
    null_key: str = ""

    def __post_init__(self) -> None:
        factored = self.B is not None and self.A is not None
        if factored == (self.dense is not None):
            raise ValueError(f"{self.tensor}: set exactly one of dense or (B, A)")

    @property
    def is_low_rank(self) -> bool:
        return self.dense is None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) of a factored update; __post_init__ guarantees both exist when dense is None."""
        if self.B is None or self.A is None:
            raise ValueError(f"{self.tensor}: a dense update has no factors")
        return self.B, self.A

    def materialize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """dW as a dense [m, n] matrix (float32 unless `dtype` says otherwise)."""
        import torch
        dtype = dtype or torch.float32
        if self.dense is not None:
            return self.dense.to(dtype)
        b, a = self.factors()
        return b.to(dtype) @ a.to(dtype)  # [m, r] @ [r, n]
