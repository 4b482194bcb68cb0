"""Tiny image-model bases (diffusers layout, random init) and LoRA files in the Hub's formats.

Bases: an SD1.5-style pipeline (UNet2DConditionModel + one CLIP text encoder) and an SDXL-style
one (linear-projection UNet with text_time conditioning + two CLIP text encoders), each saved with
save_pretrained under <name>/{unet,text_encoder,text_encoder_2}/ with a model_index.json.

Adapters are written the way their trainers write them (random factors, seeded): kohya/sd-scripts
LoRA (`lora_down`/`lora_up`/`alpha`, diffusers module names for SD1.5, sgm `input_blocks_...` names
for SDXL), LyCORIS LoHa/LoKr in kohya key naming, and diffusers' own format (PEFT keys under
`unet.` / `text_encoder.` in pytorch_lora_weights.safetensors).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

# modules every LoRA format below targets, by leaf name (covers Linear, Conv2d 3x3 and Conv 1x1)
UNET_LEAVES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
               "conv1", "conv2", "conv_shortcut", "time_emb_proj")
TE_LEAVES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _clip_config(projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37,
                          layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, pad_token_id=1,
                          vocab_size=100, projection_dim=projection_dim)


def sd15_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=4, attention_head_dim=2)


def sdxl_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=2, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                projection_class_embeddings_input_dim=80, cross_attention_dim=64,
                                norm_num_groups=4)


def save_pipeline(root: Path, unet, encoders: dict[str, object], cls_name: str) -> Path:
    """A diffusers-layout folder: model_index.json + one save_pretrained folder per component."""
    root.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(root / "unet")
    index = {"_class_name": cls_name, "_diffusers_version": "0.42.1", "unet": ["diffusers", "UNet2DConditionModel"]}
    for name, model in encoders.items():
        model.save_pretrained(root / name)  # type: ignore[attr-defined]
        index[name] = ["transformers", type(model).__name__]
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def targeted(model, leaves: tuple[str, ...]) -> dict[str, torch.Size]:
    """module path -> weight shape of every Linear/Conv2d whose path ends with one of `leaves`."""
    return {name: mod.weight.shape for name, mod in model.named_modules()
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(leaves)}


# --- module naming -------------------------------------------------------------------------------
def kohya_name(prefix: str, module: str) -> str:
    return prefix + module.replace(".", "_")


def sgm_module(module: str, layers_per_block: int) -> str | None:
    """The sgm (SDXL original) UNet path kohya names a diffusers module by. The tool's own mapping
    writes the fixture; diffusers' `_maybe_map_sgm_blocks_to_diffusers` (the oracle) checks it."""
    from zoospectra.adapters.image_lora import sgm_module as tool_sgm

    return tool_sgm(module, layers_per_block, {0})  # sdxl_unet: only up block 0 has attentions


# --- factor generators ---------------------------------------------------------------------------
def _rand(gen: torch.Generator, *shape: int, scale: float = 0.3) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


def lora_tensors(shape: torch.Size, r: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """kohya LoRA factors for a weight of `shape` (Conv2d: down carries the kernel, up is 1x1)."""
    out, cin = shape[0], shape[1]
    if len(shape) == 4:
        return {"lora_down.weight": _rand(gen, r, cin, *shape[2:]), "lora_up.weight": _rand(gen, out, r, 1, 1)}
    return {"lora_down.weight": _rand(gen, r, cin), "lora_up.weight": _rand(gen, out, r)}


def write_file(directory: Path, filename: str, tensors: dict[str, torch.Tensor],
               metadata: dict[str, str] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / filename), metadata=metadata)
    return directory


@pytest.fixture(scope="session")
def image_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Bases and adapters on disk; see the module docstring."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    root = tmp_path_factory.mktemp("image_zoo")
    torch.manual_seed(0)
    out: dict[str, Path] = {}
    sd15 = save_pipeline(root / "tiny-sd15", sd15_unet(), {"text_encoder": CLIPTextModel(_clip_config())},
                         "StableDiffusionPipeline")
    sdxl = save_pipeline(root / "tiny-sdxl", sdxl_unet(),
                         {"text_encoder": CLIPTextModel(_clip_config()),
                          "text_encoder_2": CLIPTextModelWithProjection(_clip_config())},
                         "StableDiffusionXLPipeline")
    out.update(sd15=sd15, sdxl=sdxl)
    gen = torch.Generator().manual_seed(1)
    unet15, te15 = sd15_unet(), CLIPTextModel(_clip_config())
    # kohya SD1.5: diffusers module names, alpha != r
    sd: dict[str, torch.Tensor] = {}
    for mod, shape in targeted(unet15, UNET_LEAVES).items():
        for k, v in lora_tensors(shape, 4, gen).items():
            sd[f"{kohya_name('lora_unet_', mod)}.{k}"] = v
        sd[f"{kohya_name('lora_unet_', mod)}.alpha"] = torch.tensor(2.0)
    for mod, shape in targeted(te15, TE_LEAVES).items():
        for k, v in lora_tensors(shape, 2, gen).items():
            sd[f"{kohya_name('lora_te_', mod)}.{k}"] = v
        sd[f"{kohya_name('lora_te_', mod)}.alpha"] = torch.tensor(3.0)
    sd["lora_unet_some_new_head.weird_suffix"] = torch.zeros(2)   # unknown: must land in skipped
    out["kohya_sd15"] = write_file(root / "kohya-sd15", "my_style_v1.safetensors", sd,
                                   {"ss_network_module": "networks.lora", "ss_network_dim": "4"})
    out["lycoris_loha"] = write_file(root / "loha-sd15", "loha.safetensors", loha_file(unet15, gen))
    out["lycoris_lokr"] = write_file(root / "lokr-sd15", "lokr.safetensors", lokr_file(unet15, gen))
    out["diffusers_sd15"] = write_file(root / "diffusers-sd15", "pytorch_lora_weights.safetensors",
                                       diffusers_file(unet15, te15, gen))
    # kohya SDXL: sgm UNet names, both text encoders
    unetxl = sdxl_unet()
    sd = {}
    lpb = 2
    for mod, shape in targeted(unetxl, UNET_LEAVES).items():
        sgm = sgm_module(mod, lpb)
        if sgm is None:
            continue
        for k, v in lora_tensors(shape, 4, gen).items():
            sd[f"{kohya_name('lora_unet_', sgm)}.{k}"] = v
        sd[f"{kohya_name('lora_unet_', sgm)}.alpha"] = torch.tensor(8.0)
    for prefix, te in (("lora_te1_", CLIPTextModel(_clip_config())),
                       ("lora_te2_", CLIPTextModelWithProjection(_clip_config()))):
        for mod, shape in targeted(te, TE_LEAVES).items():
            for k, v in lora_tensors(shape, 2, gen).items():
                sd[f"{kohya_name(prefix, mod)}.{k}"] = v
            sd[f"{kohya_name(prefix, mod)}.alpha"] = torch.tensor(1.0)
    out["kohya_sdxl"] = write_file(root / "kohya-sdxl", "xl_style.safetensors", sd)
    add_flux(root, out, gen)
    return out


LYCORIS_LEAVES = ("to_q", "to_v", "proj_in", "ff.net.0.proj", "conv1", "conv2")


def loha_file(unet, gen: torch.Generator, r: int = 2, alpha: float = 3.0) -> dict[str, torch.Tensor]:
    """LyCORIS LoHa (no Tucker): hada_w?_a [out, r], hada_w?_b [r, in*kh*kw], alpha."""
    sd = {}
    for mod, shape in targeted(unet, LYCORIS_LEAVES).items():
        name, n = kohya_name("lora_unet_", mod), int(torch.tensor(shape[1:]).prod())
        sd |= {f"{name}.hada_w1_a": _rand(gen, shape[0], r), f"{name}.hada_w1_b": _rand(gen, r, n),
               f"{name}.hada_w2_a": _rand(gen, shape[0], r), f"{name}.hada_w2_b": _rand(gen, r, n),
               f"{name}.alpha": torch.tensor(alpha)}
    return sd


def lokr_file(unet, gen: torch.Generator, r: int = 2, alpha: float = 3.0) -> dict[str, torch.Tensor]:
    """LyCORIS LoKr: full lokr_w1 [a, c]; lokr_w2 decomposed (w2_a [b, r] @ w2_b [r, d*kh*kw]) on
    attention/linear and 1x1 convs, full 4-D lokr_w2 [b, d, kh, kw] on 3x3 convs; alpha."""
    sd = {}
    for mod, shape in targeted(unet, LYCORIS_LEAVES).items():
        name = kohya_name("lora_unet_", mod)
        a, c = 2, 2
        b, d = shape[0] // a, shape[1] // c
        sd[f"{name}.lokr_w1"] = _rand(gen, a, c, scale=1.0)
        if len(shape) == 4 and shape[2] > 1:
            sd[f"{name}.lokr_w2"] = _rand(gen, b, d, *shape[2:])
        else:
            k = int(torch.tensor(shape[2:]).prod()) if len(shape) == 4 else 1
            sd |= {f"{name}.lokr_w2_a": _rand(gen, b, r), f"{name}.lokr_w2_b": _rand(gen, r, d * k)}
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


def diffusers_file(unet, te, gen: torch.Generator, r: int = 4) -> dict[str, torch.Tensor]:
    """diffusers' own format (what save_lora_weights writes): PEFT keys under `unet.` / `text_encoder.`."""
    sd = {}
    for prefix, model, leaves in (("unet", unet, UNET_LEAVES), ("text_encoder", te, TE_LEAVES)):
        for mod, shape in targeted(model, leaves).items():
            f = lora_tensors(shape, r, gen)
            sd[f"{prefix}.{mod}.lora_A.weight"] = f["lora_down.weight"]
            sd[f"{prefix}.{mod}.lora_B.weight"] = f["lora_up.weight"]
    return sd


def fused_delta(load: Callable[[object], None], model) -> dict[str, torch.Tensor]:
    """{module weight key: fused - original} after `load(model)` attached LoRA layers and merging them."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    before = {k: v.detach().clone().double() for k, v in model.state_dict().items()}
    load(model)
    for mod in model.modules():
        if isinstance(mod, BaseTunerLayer):
            mod.merge()
    after = {k.replace(".base_layer", ""): v.detach().double() for k, v in model.state_dict().items()
             if "lora_" not in k and "hada_" not in k and "lokr_" not in k}
    return {k: after[k] - before[k] for k in before if k in after and not torch.equal(after[k], before[k])}


# --- Flux ----------------------------------------------------------------------------------------
FLUX_DIFFUSERS_LEAVES = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "add_q_proj", "add_k_proj",
                         "add_v_proj", "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                         "ff_context.net.2", "proj_mlp", "single_transformer_blocks.0.proj_out")
# BFL (original Flux) weight -> the diffusers weights it fuses, in order (rows concatenated)
FLUX_BFL = {
    "double_blocks.0.img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "double_blocks.0.img_attn.proj": ("attn.to_out.0",),
    "double_blocks.0.img_mlp.0": ("ff.net.0.proj",),
    "double_blocks.0.img_mlp.2": ("ff.net.2",),
    "double_blocks.0.txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "double_blocks.0.txt_attn.proj": ("attn.to_add_out",),
    "double_blocks.0.txt_mlp.0": ("ff_context.net.0.proj",),
    "double_blocks.0.txt_mlp.2": ("ff_context.net.2",),
}


def flux_transformer():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])


def bfl_single_file(transformer) -> dict[str, torch.Tensor]:
    """The double block's weights under BFL names (qkv fused by row concatenation), as a
    single-file Flux checkpoint holds them."""
    sd = transformer.state_dict()
    return {f"{bfl}.weight": torch.cat([sd[f"transformer_blocks.0.{p}.weight"] for p in parts])
            for bfl, parts in FLUX_BFL.items()}


def add_flux(root: Path, out: dict[str, Path], gen: torch.Generator) -> None:
    """tiny-flux (diffusers layout: transformer/ only), its BFL single file, a diffusers-format
    LoRA on the transformer and a kohya Flux LoRA (BFL names, alpha) on the double block."""
    model = flux_transformer()
    flux = root / "tiny-flux"
    model.save_pretrained(flux / "transformer")
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                        "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    out["flux"] = flux
    out["flux_bfl"] = write_file(root / "tiny-flux-bfl", "flux1-tiny.safetensors", bfl_single_file(model))
    sd = {}
    for mod, shape in targeted(model, FLUX_DIFFUSERS_LEAVES).items():
        f = lora_tensors(shape, 4, gen)
        sd[f"transformer.{mod}.lora_A.weight"] = f["lora_down.weight"]
        sd[f"transformer.{mod}.lora_B.weight"] = f["lora_up.weight"]
    out["diffusers_flux"] = write_file(root / "diffusers-flux", "pytorch_lora_weights.safetensors", sd)
    bfl = bfl_single_file(model)
    sd = {}
    for name in FLUX_BFL:
        for k, v in lora_tensors(bfl[f"{name}.weight"].shape, 3, gen).items():
            sd[f"{kohya_name('lora_unet_', name)}.{k}"] = v
        sd[f"{kohya_name('lora_unet_', name)}.alpha"] = torch.tensor(6.0)
    out["kohya_flux"] = write_file(root / "kohya-flux", "flux_style.safetensors", sd)
