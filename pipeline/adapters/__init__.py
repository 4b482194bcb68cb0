"""PEFT adapter formats and full fine-tunes -> exact per-matrix MatrixUpdate (docs/adapters.md).

    art = open_artifact("path/or/FileSource")        # reads configs only
    for t in art.targets(base):                       # headers only: base key, [out, in] shape, role
        w0 = read_base(base, t)                       # [out, in] (Conv1D weights transposed)
        upd = art.load_update(t, base, w0=w0)         # reads just this module's tensors

open_artifact dispatch: adapter_config.json -> PeftAdapter; model.safetensors(.index.json) ->
FullFinetune; else pytorch_lora_weights.safetensors or the one root *.safetensors ->
ImageLora (kohya / LyCORIS / diffusers formats, image_lora.py); only pickles (adapter_model.bin,
pytorch_model.bin) -> UnsafeCheckpointError (never unpickled); nothing -> CheckpointNotFoundError.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..errors import CheckpointNotFoundError, UnsafeCheckpointError
from .common import Artifact, Files, Target, match_base_key, read_base, role_of
from .full import FullFinetune
from .image_lora import ImageLora, image_lora_file
from .peft_adapter import BASE_REWRITING_INITS, PEFT_TYPES, PeftAdapter, PeftType, get_pattern_key

if TYPE_CHECKING:
    from ..io.checkpoint import FileSource

__all__ = ["Artifact", "Target", "PeftAdapter", "FullFinetune", "ImageLora", "open_artifact", "read_base",
           "match_base_key", "role_of", "get_pattern_key", "BASE_REWRITING_INITS", "PEFT_TYPES", "PeftType"]

_PICKLES = ("adapter_model.bin", "pytorch_model.bin", "pytorch_model.bin.index.json", "training_args.bin")


def open_artifact(location: str | os.PathLike | FileSource, *, model_id: str | None = None) -> Artifact:
    """A PEFT adapter or a full fine-tune, from a local directory or any FileSource."""
    files = Files(location)
    if files.exists("adapter_config.json"):
        if files.exists("adapter_model.safetensors"):
            return PeftAdapter(files, model_id=model_id)
        _refuse_pickles(files)
        raise CheckpointNotFoundError("adapter_config.json found but no adapter_model.safetensors",
                                      file=files.path("adapter_model.safetensors"))
    if files.exists("model.safetensors") or files.exists("model.safetensors.index.json"):
        return FullFinetune(files, model_id=model_id)
    lora_file = image_lora_file(files)  # kohya / LyCORIS / diffusers-format image-model LoRA
    if lora_file is not None:
        return ImageLora(files, lora_file, model_id=model_id)
    _refuse_pickles(files)
    raise CheckpointNotFoundError(
        "no adapter_config.json + adapter_model.safetensors and no model.safetensors(.index.json) here",
        file=files.name)


def _refuse_pickles(files: Files) -> None:
    for name in _PICKLES[:3]:
        if files.exists(name):
            raise UnsafeCheckpointError(
                f"only a pickle ({name}) holds the weights; zoospectra never unpickles untrusted files. "
                "Convert it to safetensors in a sandbox you trust (e.g. the Hub's convert space) and retry",
                file=files.path(name), tensor=None)
