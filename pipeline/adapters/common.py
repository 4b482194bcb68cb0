"""What every artifact shares: Target records, the Artifact interface, key mapping, safe reads.

Layout convention (docs/adapters.md#layout): every matrix handed to the math is [out, in]. A GPT-2
`Conv1D` weight is stored [in, out]; its Target has `transpose=True`, and `read_base` is the one
place that turns the stored base weight into [out, in]. `MatrixUpdate`s are always [out, in]
already, so callers that pass `w0` to `load_update` must pass it as `read_base` returns it.
"""
from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import (
    BaseMismatchError,
    CheckpointNotFoundError,
    TensorNotFoundError,
    UnsupportedDtypeError,
)
from ..io.checkpoint import FLOAT_DTYPES  # the safetensors dtypes the analysis reads (upcast)
from ..updates import MatrixUpdate, Role, UpdateInfo, UpdateKind

if TYPE_CHECKING:
    import torch
    from typing_extensions import Unpack  # typing.Unpack is 3.11+

    from ..io.checkpoint import Checkpoint, FileSource

_HEAD_PARTS = {"lm_head", "classifier", "score", "qa_outputs", "pooler", "pre_classifier", "cls"}
_EMBED_LEAVES = ("wte", "wpe", "embed_tokens", "word_embeddings", "position_embeddings",
                 "token_type_embeddings", "embed_positions", "shared")


@dataclass(frozen=True)
class Target:
    """One base matrix an artifact updates, known from headers and config only.

    tensor:    base checkpoint key.
    shape:     (m, n) in [out, in] layout.
    transpose: the base stores this weight as [in, out] (Conv1D); read_base transposes it.
    source:    the artifact-side name (adapter module path or fine-tune key), for messages.
    """

    tensor: str
    shape: tuple[int, int]
    role: Role
    kind: UpdateKind
    transpose: bool = False
    source: str = ""


class Artifact(ABC):
    """A fine-tuned artifact (PEFT adapter or full fine-tune) relative to a base checkpoint."""

    model_id: str
    kind: str  # lora|dora|adalora|loha|lokr|vera|ia3|full|mixed

    @abstractmethod
    def describe(self) -> dict:
        """Fields of the `models` table (schemas/tables.py MODELS) this artifact knows."""

    @abstractmethod
    def targets(self, base: Checkpoint) -> list[Target]:
        """Every base matrix this artifact updates, from headers and config only."""

    @abstractmethod
    def load_update(self, target_or_tensor: Target | str, base: Checkpoint,
                    w0: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> MatrixUpdate:
        """The exact dW for one base matrix; `w0` ([out, in], as read_base returns) avoids a re-read.

        `dtype` (float32 or float64) is the precision every product of the update is formed and
        kept in: a float64 run must not see float32 rounding noise in its dW."""

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(artifact key, reason) for tensors deliberately not analysed (biases, new heads, ...)."""
        return list(getattr(self, "_skipped", []))

    def _planned(self, target_or_tensor: Target | str, base: Checkpoint) -> tuple[Any, Target]:
        """The plan entry (what the artifact keeps for it, its Target) of a target of `base`:
        load_update's first step in every artifact kind (targets() fills self._plan)."""
        target = self._target(target_or_tensor, base)
        plan = getattr(self, "_plan", None)
        if plan is None or target.tensor not in plan:
            self.targets(base)
        return self._plan[target.tensor]  # type: ignore[attr-defined]

    # shared by both kinds: resolve a tensor name to the planned Target for this base
    def _target(self, target_or_tensor: Target | str, base: Checkpoint) -> Target:
        if isinstance(target_or_tensor, Target):
            return target_or_tensor
        cache = self.__dict__.setdefault("_targets_by_base", {})
        key = id(base)
        if key not in cache:
            cache[key] = (base, {t.tensor: t for t in self.targets(base)})
        found = cache[key][1].get(target_or_tensor)
        if found is None:
            raise TensorNotFoundError(
                f"{self.model_id} does not update base tensor {target_or_tensor!r}; "
                "plan with targets(base) and pass one of its tensors",
                file=self._location, tensor=target_or_tensor,
            )
        return found

    _location: str = ""


# --- files -------------------------------------------------------------------------------
class Files:
    """The artifact's FileSource (a local directory becomes a LocalFileSource) plus helpers."""

    def __init__(self, location: str | os.PathLike | FileSource) -> None:
        from ..io.checkpoint import LocalFileSource

        if isinstance(location, (str, os.PathLike)):
            self.dir: Path | None = Path(location)
            if not self.dir.is_dir():
                raise CheckpointNotFoundError(
                    "not a directory; pass the folder that holds the adapter or model", file=str(location))
            self.source: FileSource = LocalFileSource(self.dir)
        else:
            self.dir, self.source = None, location
        self.name = str(getattr(self.source, "name", location))

    def exists(self, filename: str) -> bool:
        return bool(self.source.exists(filename))

    def read_text(self, filename: str) -> str:
        from ..errors import AdapterConfigError

        try:
            return self.source.read_text(filename)
        except UnicodeDecodeError as err:
            raise AdapterConfigError(f"{filename} is not UTF-8 text ({err}); re-save it",
                                     file=self.path(filename)) from None

    def read_json(self, filename: str) -> dict:
        from ..errors import AdapterConfigError

        text = self.read_text(filename)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise AdapterConfigError(f"{filename} is not valid JSON ({err}); re-save it",
                                     file=self.path(filename)) from None
        except RecursionError:  # "[[[[...": a config is a flat object, not a stack-buster
            raise AdapterConfigError(f"{filename} is nested too deeply to be a config; re-save it",
                                     file=self.path(filename)) from None
        if not isinstance(data, dict):
            raise AdapterConfigError(f"{filename} must hold a JSON object", file=self.path(filename))
        return data

    def path(self, filename: str) -> str:
        return f"{self.name.rstrip('/')}/{filename}"

    def open_checkpoint(self, filename: str | None = None) -> Checkpoint:
        from ..io.checkpoint import Checkpoint

        return Checkpoint.open(self.source, filename)


def ckpt_name(ckpt: Checkpoint) -> str:
    return str(getattr(getattr(ckpt, "source", None), "name", "base"))


# --- reading tensors safely --------------------------------------------------------------
def where(ckpt: Checkpoint, key: str, fallback: str) -> str:
    """The file a tensor lives in, for error messages."""
    try:
        return f"{fallback}::{ckpt.info(key).file}"
    except Exception:  # noqa: BLE001 - only used to decorate an error message
        return fallback


def check_dtype(ckpt: Checkpoint, key: str, location: str) -> None:
    """Refuse a tensor whose stored dtype the analysis cannot read (from its header alone)."""
    info = ckpt.info(key)
    if info.dtype not in FLOAT_DTYPES:
        raise UnsupportedDtypeError(
            f"tensor {key!r} has dtype {info.dtype}; zoospectra reads F32/F16/BF16/F64 only "
            "(quantised or integer weights cannot be analysed: dequantise and re-save in bf16/f32)",
            file=f"{location}::{info.file}", tensor=key,
        )


def read(ckpt: Checkpoint, key: str, location: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One tensor upcast to `dtype`; unknown dtypes refused here, NaN/Inf by Checkpoint.get (file + tensor named)."""
    import torch
    check_dtype(ckpt, key, location)
    return ckpt.get(key, dtype=dtype or torch.float32)


def read_base(base: Checkpoint, target: Target, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The base matrix W0 of a target in [out, in] layout (Conv1D weights transposed, Conv2d
    kernels flattened to [out, in*kh*kw])."""
    from ..io.components import as_matrix

    w0 = as_matrix(read(base, target.tensor, ckpt_name(base), dtype))  # Conv [out, in, kh, kw] -> [out, in*kh*kw]
    return w0.T.contiguous() if target.transpose else w0


def checked_w0(w0: torch.Tensor | None, base: Checkpoint, target: Target,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """The caller's W0 if given (validated against the target shape), else read it once."""
    import torch
    if w0 is None:
        return read_base(base, target, dtype)
    if tuple(w0.shape) != tuple(target.shape):
        raise BaseMismatchError(
            f"w0 passed for {target.tensor!r} has shape {tuple(w0.shape)}, expected {target.shape} "
            "([out, in]; transpose Conv1D weights as read_base does)",
            tensor=target.tensor,
        )
    return w0.to(dtype or torch.float32)


# --- key mapping -------------------------------------------------------------------------
def match_base_key(name: str, base_keys: Iterable[str], *, artifact: str, base_name: str) -> str | None:
    """The base key for an artifact key, matched on whole dotted components.

    Exact match first; else the longest suffix of `name` that is a base key (adapter trained on a
    wrapper, e.g. "bert.encoder..." or "transformer.h.0..." vs a bare base); else base keys that
    end with "." + name (base saved with an extra prefix, e.g. "model."). Several equally good
    candidates -> BaseMismatchError naming them all. None when nothing matches.
    """
    keys = base_keys if isinstance(base_keys, (set, frozenset, dict)) else set(base_keys)
    if name in keys:
        return name
    parts = name.split(".")
    for i in range(1, len(parts)):
        cand = ".".join(parts[i:])
        if cand in keys:
            return cand
    longer = sorted(k for k in keys if k.endswith("." + name))
    if len(longer) == 1:
        return longer[0]
    if len(longer) > 1:
        raise BaseMismatchError(
            f"artifact key {name!r} matches several base keys {longer[:5]}; "
            "the base checkpoint is ambiguous for this adapter",
            file=artifact, base=base_name, tensor=name,
        )
    return None


def nearest_keys(name: str, base_keys: Iterable[str], n: int = 3) -> list[str]:
    """A few base keys sharing the longest dotted suffix with `name` (for error messages)."""
    leaf = name.split(".")

    def shared(k: str) -> int:
        kp, i = k.split("."), 0
        while i < min(len(kp), len(leaf)) and kp[-1 - i] == leaf[-1 - i]:
            i += 1
        return i

    return sorted(base_keys, key=lambda k: (-shared(k), k))[:n]


def role_of(key: str) -> Role:
    """linear / embedding / head, from the key's name (the paper studies the linear layers)."""
    parts = key.split(".")
    leaf = parts[-2] if parts[-1] in ("weight", "bias") and len(parts) > 1 else parts[-1]
    if leaf in _EMBED_LEAVES or "embed" in leaf:
        return "embedding"
    if any(p in _HEAD_PARTS for p in parts):
        return "head"
    return "linear"


def mismatch(msg: str, *, artifact: str, base_name: str, tensor: str, base_tensor: str | None = None
             ) -> BaseMismatchError:
    return BaseMismatchError(msg, file=artifact, base=base_name, tensor=tensor, base_tensor=base_tensor)


def dense_update(target: Target, dw: torch.Tensor, kind: UpdateKind, dtype: torch.dtype | None = None,
                 **extra: Unpack[UpdateInfo]) -> MatrixUpdate:
    """A dense MatrixUpdate kept in the run's precision (`dtype`): float64 runs keep float64 dW."""
    import torch
    dense = dw.to(dtype or torch.float32).contiguous()
    return MatrixUpdate(tensor=target.tensor, kind=kind, shape=target.shape, dense=dense, role=target.role, **extra)
