"""Image-model bases: diffusers-layout folders/repos read lazily, one component at a time.

A diffusers pipeline folder (model_index.json at its root) keeps each model in its own folder:
`unet/diffusion_pytorch_model.safetensors`, `transformer/...`, `text_encoder/model.safetensors`,
`text_encoder_2/...` (sharded ones through their `.index.json`). `ComponentCheckpoint` shows them
as one checkpoint whose keys are `<component>.<key inside the component>`, e.g.
`unet.down_blocks.0.resnets.0.conv1.weight` (the key naming of diffusers-format LoRA files), and
reads headers and tensor bytes from the component's own file only. The VAE, scheduler and
tokenizers are never read: no adapter format targets them.

Single-file checkpoints (`v1-5-pruned.safetensors`, `sd_xl_base_1.0.safetensors`, Flux's
`flux1-dev.safetensors`) open as a plain Checkpoint; `component_of` names the component of each
key from the original trainers' prefixes.

Convolutions (docs/adapters.md#convolutions): a Conv2d weight [out, in, kh, kw] is analysed as
the matrix [out, in*kh*kw] (`as_matrix`), the layout every LoRA format factors it in.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointNotFoundError, TensorNotFoundError
from ..numeric import FLOAT32

if TYPE_CHECKING:
    import torch

# checkpoint.py opens pipelines through this module, so its types stay unnamed here (no import cycle):
Checkpoint = Any      # pipeline.io.checkpoint.Checkpoint
FileSource = Any      # pipeline.io.checkpoint.FileSource
TensorInfo = Any      # pipeline.io.checkpoint.TensorInfo

PIPELINE_INDEX = "model_index.json"
# components an adapter can target, in the order rows list them
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
# weight files of one component, preferred first (diffusers models, then transformers models)
COMPONENT_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                     "model.safetensors", "model.safetensors.index.json")
# single-file checkpoints: original (ldm / sgm / BFL) key prefixes -> component
SINGLE_FILE_PREFIXES = (
    ("model.diffusion_model.", "unet"),
    ("cond_stage_model.", "text_encoder"),
    ("conditioner.embedders.0.", "text_encoder"),
    ("conditioner.embedders.1.", "text_encoder_2"),
    ("first_stage_model.", "vae"),
)
# a Flux (BFL) single file has bare keys; these blocks mark it, and then every key is the transformer's
FLUX_MARKERS = ("double_blocks.", "single_blocks.")


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A weight as the matrix the math sees: Conv [out, in, kh, kw] -> [out, in*kh*kw]."""
    return weight.reshape(weight.shape[0], -1) if weight.dim() > 2 else weight


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The [out, in*kh*kw] shape of a stored weight shape (2-D shapes unchanged)."""
    n = 1
    for d in shape[1:]:
        n *= int(d)
    return int(shape[0]), n


def kernel_shape(shape: tuple[int, ...]) -> list[int] | None:
    """The stored shape of a convolution weight ([out, in, kh, kw]); None for a plain matrix."""
    return [int(d) for d in shape] if len(shape) > 2 else None


def component_of(ckpt: Checkpoint | ComponentCheckpoint, key: str) -> str | None:
    """The component a base key belongs to (unet, transformer, text_encoder, ...); None for a
    checkpoint that is one model (an LLM, a BERT): those have no components."""
    if isinstance(ckpt, ComponentCheckpoint):
        return ckpt.component(key)
    for prefix, comp in SINGLE_FILE_PREFIXES:
        if key.startswith(prefix):
            return comp
    return "transformer" if _is_flux_single_file(ckpt) else None


def strip_component(ckpt: Checkpoint | ComponentCheckpoint, key: str) -> str:
    """The key inside its component (what trainers name the module after)."""
    if isinstance(ckpt, ComponentCheckpoint):
        return key.split(".", 1)[1]
    for prefix, _ in SINGLE_FILE_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _is_flux_single_file(ckpt: Checkpoint) -> bool:
    cached = getattr(ckpt, "_zs_flux", None)
    if cached is None:
        cached = any(k.startswith(FLUX_MARKERS) for k in ckpt.keys())
        ckpt._zs_flux = cached  # headers are immutable: compute once
    return bool(cached)


class ComponentCheckpoint:
    """The adapter-targetable components of a diffusers pipeline as one lazy checkpoint.

    Same reading interface as Checkpoint (keys, info, get, __contains__, bytes_read); each
    component is its own Checkpoint, opened only from its weight file's header.
    """

    def __init__(self, source: FileSource, parts: dict[str, Checkpoint]) -> None:
        self.source = source
        self.parts = parts
        self.weight_map = None
        self.files = [f"{c}/{f}" for c, p in parts.items() for f in p.files]

    @property
    def bytes_read(self) -> int:
        return sum(p.bytes_read for p in self.parts.values())

    @property
    def header_bytes_read(self) -> int:
        return sum(p.header_bytes_read for p in self.parts.values())

    def component(self, key: str) -> str | None:
        comp = key.split(".", 1)[0]
        return comp if comp in self.parts else None

    def _split(self, key: str) -> tuple[Checkpoint, str]:
        comp, _, inner = key.partition(".")
        if comp not in self.parts or not inner:
            raise TensorNotFoundError(
                f"tensor {key!r} names no component of this pipeline (has {sorted(self.parts)}); keys "
                "are '<component>.<key>', e.g. 'unet.conv_in.weight'", file=self.source.name, tensor=key)
        return self.parts[comp], inner

    def keys(self) -> list[str]:
        return [f"{c}.{k}" for c, p in self.parts.items() for k in p.keys()]

    def __contains__(self, key: str) -> bool:
        comp, _, inner = key.partition(".")
        return comp in self.parts and inner in self.parts[comp]

    def info(self, key: str) -> TensorInfo:
        part, inner = self._split(key)
        return part.info(inner)

    def get(self, key: str, dtype: torch.dtype | None = FLOAT32) -> torch.Tensor:
        part, inner = self._split(key)
        return part.get(inner, dtype=dtype)

    def quantization_of(self, key: str) -> str:
        """How the tensor was dequantised: "" (components are read as stored, never quantised)."""
        return ""


def is_pipeline(source: FileSource) -> bool:
    return bool(source.exists(PIPELINE_INDEX))


def open_components(source: FileSource, open_file: Callable[[FileSource, str], Checkpoint]) -> ComponentCheckpoint:
    """Every adapter-targetable component of the diffusers pipeline at `source` (headers only);
    `open_file(source, name)` opens one component's weight file (Checkpoint.open)."""
    parts: dict[str, Checkpoint] = {}
    pickled: list[str] = []
    for comp in COMPONENTS:
        name = next((f"{comp}/{w}" for w in COMPONENT_WEIGHTS if source.exists(f"{comp}/{w}")), None)
        if name is not None:
            parts[comp] = open_file(source, name)
        elif any(source.exists(f"{comp}/{p}") for p in ("diffusion_pytorch_model.bin", "pytorch_model.bin")):
            pickled.append(comp)
    if not parts:
        why = (f"only pickle weights in {pickled}: zoospectra never unpickles untrusted files; use the "
               "repo's safetensors revision" if pickled else
               f"no component of {list(COMPONENTS)} holds safetensors weights "
               f"({' or '.join(COMPONENT_WEIGHTS[:3:2])})")
        raise CheckpointNotFoundError(f"{PIPELINE_INDEX} found but {why}", file=source.name)
    return ComponentCheckpoint(source, parts)
