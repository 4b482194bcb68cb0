"""Image-model LoRA files: kohya/sd-scripts, LyCORIS (LoHa, LoKr) and diffusers formats -> exact dW.

One safetensors file, no adapter_config.json. Keys are `<module>.<suffix>`:

- kohya / LyCORIS: `<prefix><module path with '.' -> '_'>.<suffix>`, prefix `lora_unet_` (UNet, and
  the Flux transformer in BFL naming), `lora_transformer_`, `lora_te_` / `lora_te1_` (first CLIP),
  `lora_te2_` (SDXL's second). Module names are matched by building the same name from every base
  key, as sd-scripts does (the underscores of `down_blocks` make the name irreversible).
- diffusers (`pytorch_lora_weights.safetensors`): `<component>.<module path>.<suffix>`, component
  `unet.` / `transformer.` / `text_encoder.` / `text_encoder_2.`.

Suffixes and their math (every dW in [out, in*kh*kw], docs/adapters.md#convolutions):
- LoRA `lora_down.weight` [r, in(, kh, kw)], `lora_up.weight` [out, r(, 1, 1)] (or PEFT's
  `lora_A.weight` / `lora_B.weight`, diffusers' `lora.down.weight` / `lora.up.weight`), optional
  `alpha`: dW = alpha/r * up @ down (alpha absent: scale 1, as diffusers' loader does).
- LoHa `hada_w1_a` [out, r], `hada_w1_b` [r, in*kh*kw], `hada_w2_a`, `hada_w2_b`, `alpha`:
  dW = (w1a @ w1b) * (w2a @ w2b) * alpha / r (r = rows of hada_w1_b; alpha absent: scale 1).
- LoKr `lokr_w1` or `lokr_w1_a @ lokr_w1_b` [a, c], `lokr_w2` ([b, d] or [b, d, kh, kw]) or
  `lokr_w2_a @ lokr_w2_b` [b, d*kh*kw]: dW = kron(w1, w2) * scale, scale = alpha / r where r is
  the rank of the decomposed factor (w2's first), 1 when both are full (LyCORIS; diffusers'
  `_bake_lokr_alpha_` agrees).

A module with parts zoospectra cannot turn into an exact dW (Tucker/CP factors `hada_t1`,
`lokr_t2`, `lora_mid`; DoRA's `dora_scale`; full-difference `diff`) and every key it does not know
are listed in `skipped` with the reason; they are never dropped silently.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AdapterWeightsError, BaseMismatchError, CheckpointNotFoundError
from ..io.components import COMPONENTS, ComponentCheckpoint, component_of, matrix_shape, strip_component
from ..numeric import frobenius
from ..updates import MatrixUpdate, UpdateKind
from .common import Artifact, Files, Target, check_dtype, ckpt_name, dense_update, read, role_of

if TYPE_CHECKING:
    import torch

    from ..io.checkpoint import Checkpoint

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
# kohya prefixes of each component's modules
KOHYA_PREFIXES: dict[str, tuple[str, ...]] = {
    "unet": ("lora_unet_",),
    "transformer": ("lora_unet_", "lora_transformer_"),
    "text_encoder": ("lora_te_", "lora_te1_"),
    "text_encoder_2": ("lora_te2_",),
}
_KOHYA_START = tuple(sorted({p for ps in KOHYA_PREFIXES.values() for p in ps}))
# suffix -> (module type, canonical part name)
SUFFIXES: dict[str, tuple[str, str]] = {
    "lora_down.weight": ("lora", "down"), "lora_up.weight": ("lora", "up"),
    "lora_A.weight": ("lora", "down"), "lora_B.weight": ("lora", "up"),
    "lora.down.weight": ("lora", "down"), "lora.up.weight": ("lora", "up"),
    "hada_w1_a": ("loha", "w1a"), "hada_w1_b": ("loha", "w1b"),
    "hada_w2_a": ("loha", "w2a"), "hada_w2_b": ("loha", "w2b"),
    "lokr_w1": ("lokr", "w1"), "lokr_w1_a": ("lokr", "w1a"), "lokr_w1_b": ("lokr", "w1b"),
    "lokr_w2": ("lokr", "w2"), "lokr_w2_a": ("lokr", "w2a"), "lokr_w2_b": ("lokr", "w2b"),
    "alpha": ("", "alpha"),
}
# parts of known formats whose update zoospectra does not compute exactly: the module is skipped
UNSUPPORTED: dict[str, str] = {
    "hada_t1": "LoHa with Tucker (CP) factors", "hada_t2": "LoHa with Tucker (CP) factors",
    "lokr_t2": "LoKr with a Tucker (CP) factor", "lora_mid.weight": "LoCon with a CP mid factor",
    "dora_scale": "DoRA (weight-decomposed) module", "diff": "full-difference module (LyCORIS 'full')",
    "diff_b": "full-difference bias", "lora_B.bias": "LoRA bias", "on_input": "IA3-style module",
    "weight": "IA3-style module", "b_norm": "norm-layer adapter", "w_norm": "norm-layer adapter",
}
_NEEDS = {"lora": ({"down", "up"},), "loha": ({"w1a", "w1b", "w2a", "w2b"},),
          "lokr": ({"w1"}, {"w1a", "w1b"})}
# training-metadata fields worth keeping in models.config_json (kohya's ss_* can be megabytes)
_META_KEEP = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
              "ss_base_model_version", "ss_sd_model_name", "ss_v2", "modelspec.architecture",
              "modelspec.implementation", "lora_adapter_metadata")


@dataclass
class _Module:
    name: str                                   # the file's module name (without suffix)
    kind: str = ""                              # lora | loha | lokr
    keys: dict[str, str] = field(default_factory=dict)   # part -> file key
    unsupported: list[str] = field(default_factory=list)


def image_lora_file(files: Files) -> str | None:
    """The LoRA file of an image-model adapter folder/repo, or None when it holds none.

    pytorch_lora_weights.safetensors if present, else the one root .safetensors file; several
    candidates are refused (which one is the adapter cannot be guessed)."""
    if files.exists(DIFFUSERS_FILE):
        return DIFFUSERS_FILE
    names = _root_files(files)
    cands = sorted(n for n in names if n.endswith(".safetensors"))
    if len(cands) > 1:
        raise CheckpointNotFoundError(
            f"several .safetensors files {cands[:5]} and no adapter_config.json: cannot tell which is the LoRA; "
            "pass the file itself, or put it in its own folder", file=files.name)
    return cands[0] if cands else None


def _root_files(files: Files) -> list[str]:
    listing = getattr(files.source, "files", None)
    if callable(listing):                        # HubFileSource: the repo's listing at this sha
        return [n for n in listing() if "/" not in n]
    root = files.dir if files.dir is not None else getattr(files.source, "root", None)  # LocalFileSource
    if isinstance(root, Path) and root.is_dir():
        return [p.name for p in root.iterdir() if p.is_file()]
    return []


class ImageLora(Artifact):
    """A kohya / LyCORIS / diffusers-format LoRA file for an image model."""

    def __init__(self, files: Files, filename: str, *, model_id: str | None = None) -> None:
        self.files = files
        self.filename = filename
        self._location = files.path(filename)
        self.model_id = model_id or files.name.rstrip("/").split("/")[-1]
        self.ckpt = files.open_checkpoint(filename)
        meta = self.ckpt.header(self.ckpt.files[0]).metadata
        self.config_text = json.dumps({k: meta[k] for k in _META_KEEP if k in meta}, sort_keys=True) or None
        self.config: dict = {}
        self._skipped: list[tuple[str, str]] = []
        self.modules, self._unknown = self._group()
        kinds = {m.kind for m in self.modules.values() if not m.unsupported}
        self.kind = kinds.pop() if len(kinds) == 1 else "mixed"
        self.format = "kohya" if any(n.startswith(_KOHYA_START) for n in self.modules) else "diffusers"

    # --- keys -----------------------------------------------------------------------------
    def _group(self) -> tuple[dict[str, _Module], list[tuple[str, str]]]:
        modules: dict[str, _Module] = {}
        unknown: list[tuple[str, str]] = []
        known = sorted([*SUFFIXES, *UNSUPPORTED], key=len, reverse=True)
        for key in self.ckpt.keys():
            suffix = next((s for s in known if key.endswith("." + s)), None)
            if suffix is None:
                unknown.append((key, "not a LoRA/LoHa/LoKr tensor zoospectra knows (unknown suffix)"))
                continue
            mod = modules.setdefault(key[: -len(suffix) - 1], _Module(key[: -len(suffix) - 1]))
            if suffix in UNSUPPORTED:
                mod.unsupported.append(UNSUPPORTED[suffix])
                mod.keys[suffix] = key
                continue
            kind, part = SUFFIXES[suffix]
            if kind and mod.kind and kind != mod.kind:
                mod.unsupported.append(f"mixes {mod.kind} and {kind} tensors")
            mod.kind = mod.kind or kind
            if part in mod.keys:
                mod.unsupported.append(f"two tensors for part {part!r}")
            mod.keys[part] = key
        for mod in modules.values():
            if not mod.kind:
                mod.unsupported.append("only an alpha, no factors")
            elif not any(need <= set(mod.keys) for need in _NEEDS[mod.kind]):
                mod.unsupported.append(f"incomplete {mod.kind} module (has {sorted(mod.keys)})")
        if not any(m.kind for m in modules.values()):  # e.g. a lone diffusion_pytorch_model.safetensors
            first = sorted(self.ckpt.keys())[:3]
            raise AdapterWeightsError(
                f"no LoRA, LoHa or LoKr tensors in {self.filename} (first keys {first}): not an adapter file; "
                "a full model needs its model.safetensors or diffusers pipeline layout", file=self._location)
        return modules, unknown

    def describe(self) -> dict:
        ranks = {self._rank(m) for m in self.modules.values() if not m.unsupported}
        alphas = {self._alpha(m) for m in self.modules.values() if not m.unsupported and "alpha" in m.keys}
        return dict(peft_type=f"{self.format.upper()}_{self.kind.upper()}",
                    r=ranks.pop() if len(ranks) == 1 else None,
                    alpha=alphas.pop() if len(alphas) == 1 else None,
                    use_rslora=False, use_dora=False, fan_in_fan_out=False, target_modules=None,
                    init=None, base_rewritten=False, config_json=self.config_text)

    def _shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.ckpt.info(key).shape)

    def _rank(self, mod: _Module) -> int | None:
        k = mod.keys
        part = {"lora": "down", "loha": "w1b", "lokr": "w2b" if "w2b" in k else "w1b"}[mod.kind]
        return self._shape(k[part])[0] if part in k else None

    def _alpha(self, mod: _Module) -> float:
        return self.ckpt.scalar(mod.keys["alpha"])

    # --- planning -------------------------------------------------------------------------
    def targets(self, base: Checkpoint) -> list[Target]:
        self._skipped = list(self._unknown)
        self._plan: dict[str, tuple[_Module, Target]] = {}
        kohya = _kohya_index(base) if self.format == "kohya" else {}
        flux_split = _flux_split_index(base) if self.format == "kohya" else {}
        self._rows: dict[str, tuple[int, int]] = {}    # base key -> rows of the fused update it takes
        base_keys = set(base.keys())
        for name in sorted(self.modules):
            mod = self.modules[name]
            if mod.unsupported:
                self._skipped += [(key, "; ".join(dict.fromkeys(mod.unsupported))) for key in mod.keys.values()]
                continue
            split = flux_split.get(name) if self.format == "kohya" and name not in kohya else None
            if split:  # a fused BFL weight (qkv, linear1) onto the diffusers transformer's parts
                for key in mod.keys.values():
                    check_dtype(self.ckpt, key, self._location)
                self._plan_split(mod, base, split)
                continue
            base_key = self._base_key(name, kohya, base_keys)
            if base_key is None:
                self._skipped += [(key, "no base weight of this name (another base, or a layer "
                                   "zoospectra cannot place)") for key in mod.keys.values()]
                continue
            for key in mod.keys.values():
                check_dtype(self.ckpt, key, self._location)
            self._plan[base_key] = (mod, self._checked_target(mod, base, base_key))
        if not self._plan:
            raise BaseMismatchError(
                f"no module of this LoRA matches a weight of the base (first modules: {sorted(self.modules)[:3]}, "
                f"base keys: {sorted(base_keys)[:3]}); is it for this base? A single-file SD base must be "
                "converted to the diffusers layout", file=self._location, base=ckpt_name(base))
        return [t for _, t in self._plan.values()]

    def _plan_split(self, mod: _Module, base: Checkpoint, parts: list[str]) -> None:
        """One kohya module over several base weights stacked by rows (Flux's fused qkv / linear1):
        each part takes its rows of the fused dW (diffusers' kohya Flux conversion does the same)."""
        shapes = [tuple(base.info(k).shape) for k in parts]
        out, n = self._implied(mod, (sum(s[0] for s in shapes), *shapes[0][1:]))
        if len({s[1:] for s in shapes}) != 1 or out != sum(s[0] for s in shapes) or n != matrix_shape(shapes[0])[1]:
            raise BaseMismatchError(
                f"module {mod.name!r} implies a fused weight of ({out}, {n}) but its base parts {parts} have shapes "
                f"{shapes}; is this LoRA for another base?", file=self._location, base=ckpt_name(base),
                tensor=next(k for p, k in mod.keys.items() if p != "alpha"), base_tensor=parts[0])
        lo = 0
        for key, shape in zip(parts, shapes, strict=True):
            self._rows[key] = (lo, lo + shape[0])
            lo += shape[0]
            self._plan[key] = (mod, Target(tensor=key, shape=matrix_shape(shape), role=role_of(key),
                                           kind=mod.kind, transpose=False, source=mod.name))  # type: ignore[arg-type]

    def _base_key(self, name: str, kohya: dict[str, list[str]], base_keys: set[str]) -> str | None:
        if self.format == "kohya":
            found = kohya.get(name, [])
            if len(found) > 1:
                raise BaseMismatchError(f"kohya module {name!r} matches several base weights {found[:4]}",
                                        file=self._location, tensor=name)
            return found[0] if found else None
        key = name + ".weight"
        return key if key in base_keys else None

    def _checked_target(self, mod: _Module, base: Checkpoint, base_key: str) -> Target:
        stored = tuple(base.info(base_key).shape)
        if len(stored) not in (2, 4):
            raise BaseMismatchError(f"base tensor {base_key!r} has shape {stored}: not a linear or conv weight",
                                    file=self._location, base=ckpt_name(base), base_tensor=base_key)
        implied = self._implied(mod, stored)
        m, n = matrix_shape(stored)
        if implied != (m, n):
            raise BaseMismatchError(
                f"module {mod.name!r} implies a weight of {implied} ([out, in*kh*kw]) but base tensor {base_key!r} "
                f"is {stored}; is this LoRA for another base?", file=self._location, base=ckpt_name(base),
                tensor=next(k for p, k in mod.keys.items() if p != "alpha"), base_tensor=base_key)
        inner = strip_component(base, base_key)
        return Target(tensor=base_key, shape=(m, n), role=role_of(inner), kind=mod.kind,  # type: ignore[arg-type]
                      transpose=False, source=mod.name)

    def _implied(self, mod: _Module, stored: tuple[int, ...]) -> tuple[int, int]:
        """The [out, in*kh*kw] shape the factors multiply to (malformed factors raise)."""
        k, s = mod.keys, self._shape
        if mod.kind == "lora":
            down, up = s(k["down"]), s(k["up"])
            if len(up) == 4 and up[2:] != (1, 1):
                raise AdapterWeightsError(f"{k['up']!r} has kernel {up[2:]}; a LoRA up factor must be 1x1",
                                          file=self._location, tensor=k["up"])
            if up[1] != down[0]:
                raise AdapterWeightsError(f"{k['up']!r} {up} and {k['down']!r} {down} disagree on the rank",
                                          file=self._location, tensor=k["up"])
            return up[0], matrix_shape(down)[1]
        if mod.kind == "loha":
            (a1, r1), (r1b, n1), (a2, r2), (r2b, n2) = (s(k[p]) for p in ("w1a", "w1b", "w2a", "w2b"))
            if r1 != r1b or r2 != r2b or (a1, n1) != (a2, n2):
                raise AdapterWeightsError(f"LoHa factors of {mod.name!r} do not multiply", file=self._location,
                                          tensor=k["w1a"])
            return a1, n1
        w1 = self._factor_shape(mod, "w1")
        w2 = self._factor_shape(mod, "w2")
        return w1[0] * w2[0], w1[1] * matrix_shape(w2)[1]

    def _factor_shape(self, mod: _Module, name: str) -> tuple[int, ...]:
        k = mod.keys
        if name in k:
            return self._shape(k[name])
        a, b = self._shape(k[name + "a"]), self._shape(k[name + "b"])
        if a[1] != b[0]:
            raise AdapterWeightsError(f"{k[name + 'a']!r} {a} and {k[name + 'b']!r} {b} disagree on the rank",
                                      file=self._location, tensor=k[name + "a"])
        return a[0], b[1]

    # --- loading ----------------------------------------------------------------------------
    def load_update(self, target_or_tensor: Target | str, base: Checkpoint,
                    w0: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> MatrixUpdate:
        import torch

        dtype = dtype or torch.float32
        mod, target = self._planned(target_or_tensor, base)
        stored = tuple(base.info(target.tensor).shape)
        rows = self._rows.get(target.tensor)           # a part of a fused BFL weight: its rows
        if rows is not None:
            fused = sum(hi - lo for lo, hi in {r for k, r in self._rows.items() if self._plan[k][0] is mod})
            stored = (fused, *stored[1:])
        t = {p: read(self.ckpt, key, self._location, dtype) for p, key in mod.keys.items() if p != "alpha"}
        rank = self._rank(mod)
        alpha = self._alpha(mod) if "alpha" in mod.keys else None
        if mod.kind == "lora":
            scale = 1.0 if alpha is None else alpha / int(rank or 1)
            B = (t["up"].reshape(t["up"].shape[0], -1) * scale)
            B = (B[rows[0]:rows[1]] if rows is not None else B).contiguous()
            A = t["down"].reshape(t["down"].shape[0], -1).contiguous()
            return MatrixUpdate(tensor=target.tensor, kind="lora", shape=target.shape, B=B, A=A, role=target.role,
                                rank=rank, alpha=alpha, scale=scale, norm_a=frobenius(t["down"]),
                                norm_b=frobenius(t["up"]))
        if mod.kind == "loha":
            scale = 1.0 if alpha is None else alpha / int(rank or 1)
            dw = (t["w1a"] @ t["w1b"]) * (t["w2a"] @ t["w2b"]) * scale
            return self._dense(target, dw, rows, "loha", dtype, rank, alpha, scale)
        w1 = t["w1"] if "w1" in t else t["w1a"] @ t["w1b"]
        w2 = t["w2"] if "w2" in t else t["w2a"] @ t["w2b"]
        decomposed = "w2b" in t or "w1b" in t
        scale = alpha / int(rank or 1) if (alpha is not None and decomposed) else 1.0
        return self._dense(target, lokr_conv_dense(w1, w2, stored) * scale, rows, "lokr", dtype,
                           rank if decomposed else None, alpha, scale)

    def _dense(self, target: Target, dw: torch.Tensor, rows: tuple[int, int] | None, kind: UpdateKind,
               dtype: torch.dtype, rank: int | None, alpha: float | None, scale: float) -> MatrixUpdate:
        dw = dw.reshape(dw.shape[0], -1)
        if rows is not None:
            dw = dw[rows[0]:rows[1]]
        return dense_update(target, dw.reshape(target.shape), kind, dtype, rank=rank, alpha=alpha, scale=scale)


def lokr_conv_dense(w1: torch.Tensor, w2: torch.Tensor, stored: tuple[int, ...]) -> torch.Tensor:
    """kron(w1, w2) as the [out, in*kh*kw] matrix of a base weight of shape `stored`.

    Linear: kron(w1 [a, c], w2 [b, d]). Conv: w2 is [b, d, kh, kw] (or its [b, d*kh*kw] product,
    reshaped), and w1 acts on channels only: kron(w1[:, :, None, None], w2) (LyCORIS make_kron)."""
    import torch
    if len(stored) == 2:
        return torch.kron(w1, w2)
    out, cin, kh, kw = stored
    w2 = w2.reshape(w2.shape[0], cin // w1.shape[1], kh, kw)
    return torch.kron(w1[:, :, None, None], w2).reshape(out, -1)


def _kohya_index(base: Checkpoint) -> dict[str, list[str]]:
    """kohya module name -> base weight keys, built from the base as sd-scripts builds it.

    A diffusers UNet also answers to its sgm names (kohya trains SDXL on the original UNet:
    `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`); a CLIP text encoder to names with
    and without transformers' `text_model.` wrapper (transformers 5 saves CLIP without it)."""
    keys = base.keys()
    lpb = _layers_per_block(keys)
    up_attn = {int(k.split(".")[2]) for k in keys if k.startswith("unet.up_blocks.") and ".attentions." in k}
    index: dict[str, list[str]] = defaultdict(list)
    for key in keys:
        if not key.endswith(".weight"):
            continue
        comp = component_of(base, key)
        if comp not in COMPONENTS:
            continue
        inner = strip_component(base, key)[: -len(".weight")]
        names = {inner}
        if comp == "unet" and isinstance(base, ComponentCheckpoint):
            sgm = sgm_module(inner, lpb, up_attn)
            if sgm is not None:
                names.add(sgm)
        if comp.startswith("text_encoder"):
            names.add(inner[len("text_model."):] if inner.startswith("text_model.") else "text_model." + inner)
        for name in names:
            for prefix in KOHYA_PREFIXES[comp]:
                index[prefix + name.replace(".", "_")].append(key)
    return index


# Flux: kohya names follow BFL's original model; a diffusers-layout transformer splits or renames
# its weights. BFL module (per block) -> the diffusers weights it stacks by rows, in order.
_FLUX_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",), "img_mlp_2": ("ff.net.2",), "img_mod_lin": ("norm1.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",), "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",), "txt_mod_lin": ("norm1_context.linear",),
}
_FLUX_SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
                "modulation_lin": ("norm.linear",)}


def _flux_split_index(base: Checkpoint) -> dict[str, list[str]]:
    """kohya Flux module name -> the diffusers-layout transformer weights it covers (rows stacked)."""
    if not isinstance(base, ComponentCheckpoint) or "transformer" not in base.parts:
        return {}
    keys = set(base.keys())
    index: dict[str, list[str]] = {}
    for blocks, bfl, table in (("transformer_blocks", "double_blocks", _FLUX_DOUBLE),
                               ("single_transformer_blocks", "single_blocks", _FLUX_SINGLE)):
        n = {int(k.split(".")[2]) for k in keys if k.startswith(f"transformer.{blocks}.")}
        for i in sorted(n):
            for name, parts in table.items():
                found = [f"transformer.{blocks}.{i}.{p}.weight" for p in parts]
                if all(k in keys for k in found):
                    for prefix in KOHYA_PREFIXES["transformer"]:
                        index[f"{prefix}{bfl}_{i}_{name}"] = found
    return index


def _layers_per_block(keys: list[str]) -> int:
    """layers_per_block of a diffusers UNet: resnets in its first down block."""
    return len({k.split(".")[4] for k in keys if k.startswith("unet.down_blocks.0.resnets.")}) or 1


_SGM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_SGM_TOP = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
            "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def sgm_module(module: str, lpb: int, up_with_attention: set[int]) -> str | None:
    """The sgm (original SD/SDXL) UNet path of a diffusers UNet module path; None if it has none.

    Down level d, layer i -> input_blocks[1 + d*(lpb+1) + i] ([0] resnet, [1] attention), its
    downsampler input_blocks[(d+1)*(lpb+1)].0.op; up level u (lpb+1 layers) -> output_blocks[u*(lpb+1) + i],
    its upsampler the last layer's [2] (after an attention) or [1]; mid -> middle_block 0 / 1 / 2."""
    if module in _SGM_TOP:
        return _SGM_TOP[module]
    p = module.split(".")
    try:
        if p[0] in ("down_blocks", "up_blocks") and p[2] in ("resnets", "attentions"):
            level, i = int(p[1]), int(p[3])
            head = (f"input_blocks.{1 + level * (lpb + 1) + i}" if p[0] == "down_blocks"
                    else f"output_blocks.{level * (lpb + 1) + i}")
            return _sgm_inner(f"{head}.{0 if p[2] == 'resnets' else 1}", p[2], p[4:])
        if p[0] == "down_blocks" and p[2:5] == ["downsamplers", "0", "conv"]:
            return f"input_blocks.{(int(p[1]) + 1) * (lpb + 1)}.0.op"
        if p[0] == "up_blocks" and p[2:5] == ["upsamplers", "0", "conv"]:
            u = int(p[1])
            return f"output_blocks.{u * (lpb + 1) + lpb}.{2 if u in up_with_attention else 1}.conv"
        if p[0] == "mid_block" and p[1] in ("resnets", "attentions"):
            i = int(p[2])
            head = "middle_block.1" if p[1] == "attentions" else f"middle_block.{0 if i == 0 else 2}"
            return _sgm_inner(head, p[1], p[3:])
    except (IndexError, ValueError):  # a path of another shape: no sgm name
        return None
    return None


def _sgm_inner(head: str, kind: str, rest: list[str]) -> str | None:
    tail = ".".join(rest)
    if kind == "resnets":
        if tail not in _SGM_RESNET:
            return None
        tail = _SGM_RESNET[tail]
    return f"{head}.{tail}"
