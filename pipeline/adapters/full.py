"""Full fine-tunes: dW = W_ft - W0 for every 2-D weight present in both with equal shape.

Embeddings and heads are kept (role "embedding" / "head") so the planner can leave them out of
the linear-layer study. Tensors the base lacks (a new task head) or whose shape changed in an
embedding/head (resized vocabulary) are listed in `skipped`; any other shape change means the
fine-tune is of another base and raises BaseMismatchError.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import BaseMismatchError
from ..updates import MatrixUpdate
from .common import (
    Artifact,
    Files,
    Target,
    check_dtype,
    checked_w0,
    ckpt_name,
    dense_update,
    match_base_key,
    read,
    role_of,
)

if TYPE_CHECKING:
    import torch

    from ..io.checkpoint import Checkpoint

# model_type values whose transformer blocks use transformers' Conv1D ([in, out] weights)
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}


class FullFinetune(Artifact):
    kind = "full"

    def __init__(self, files: Files, *, model_id: str | None = None) -> None:
        self.files = files
        self.model_id = model_id or files.name.rstrip("/").split("/")[-1]
        self.config_text = files.read_text("config.json") if files.exists("config.json") else None
        self.config = files.read_json("config.json") if self.config_text is not None else {}
        self.ckpt = files.open_checkpoint()
        index = "model.safetensors.index.json"
        weights = index if files.exists(index) else "model.safetensors"
        self._location = files.path(weights)
        self._skipped: list[tuple[str, str]] = []
        self._plan: dict[str, tuple[str, Target]] = {}

    def describe(self) -> dict:
        return dict(peft_type=None, r=None, alpha=None, use_rslora=None, use_dora=None, fan_in_fan_out=None,
                    target_modules=None, init=None, base_rewritten=False, config_json=self.config_text)

    def _conv1d(self, key: str) -> bool:
        return self.config.get("model_type") in CONV1D_MODEL_TYPES and role_of(key) == "linear"

    def targets(self, base: Checkpoint) -> list[Target]:
        base_keys, base_name = set(base.keys()), ckpt_name(base)
        self._skipped, self._plan = [], {}
        for key in sorted(self.ckpt.keys()):
            shape = tuple(self.ckpt.info(key).shape)
            if len(shape) != 2 or not key.endswith(".weight"):
                self._skipped.append((key, "not a 2-D weight"))
                continue
            base_key = match_base_key(key, base_keys, artifact=self._location, base_name=base_name)
            if base_key is None:
                self._skipped.append((key, "not in the base checkpoint (new head?)"))
                continue
            if base_key in self._plan:
                self._skipped.append((key, f"base tensor {base_key} already matched by {self._plan[base_key][0]}"))
                continue
            check_dtype(self.ckpt, key, self._location)
            base_shape, role = tuple(base.info(base_key).shape), role_of(base_key)
            if base_shape != shape:
                if role in ("embedding", "head"):
                    self._skipped.append((key, f"shape {shape} differs from base {base_shape} (resized)"))
                    continue
                raise BaseMismatchError(
                    f"fine-tuned tensor {key!r} has shape {shape} but base tensor {base_key!r} has {base_shape}; "
                    "is this a fine-tune of another base?", file=self._location, base=base_name, tensor=key,
                    base_tensor=base_key)
            transpose = self._conv1d(base_key)
            mn = (shape[1], shape[0]) if transpose else shape
            self._plan[base_key] = (key, Target(tensor=base_key, shape=(int(mn[0]), int(mn[1])), role=role,
                                                kind="full", transpose=transpose, source=key))
        if not self._plan:
            raise BaseMismatchError(
                f"the fine-tune shares no 2-D weight with the base (first keys: {sorted(self.ckpt.keys())[:3]}, "
                f"base: {sorted(base_keys)[:3]}); is it a fine-tune of this base?",
                file=self._location, base=base_name)
        return [t for _, t in self._plan.values()]

    def load_update(self, target_or_tensor: Target | str, base: Checkpoint,
                    w0: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> MatrixUpdate:
        import torch
        key, target = self._planned(target_or_tensor, base)
        w_ft = read(self.ckpt, key, self._location, torch.float64)
        w_ft = w_ft.T if target.transpose else w_ft
        return dense_update(target, w_ft - checked_w0(w0, base, target, torch.float64), "full", dtype)
