"""Session fixtures for adapter tests: a small real zoo and PEFT's own merge as the oracle."""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from zoospectra.demo.zoo import ZooSpec, base_dir, build_zoo, load_model

STEPS = 3  # a few Adam steps: every factor (A and B, E, lambdas, ...) leaves its init

_ALL_BERT = ["query", "key", "value", "output.dense", "intermediate.dense"]
_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def zoo_specs() -> list[ZooSpec]:
    L = "LORA"
    return [
        ZooSpec("full_ft", steps=1),
        ZooSpec("lora", {"peft_type": L, "r": 4, "lora_alpha": 8, "target_modules": _ALL_BERT}),
        ZooSpec("rslora", {"peft_type": L, "r": 4, "lora_alpha": 8, "use_rslora": True,
                           "target_modules": ["query", "key"]}),
        ZooSpec("dora", {"peft_type": L, "r": 4, "lora_alpha": 8, "use_dora": True,
                         "target_modules": ["query", "value", "intermediate.dense"]}),
        ZooSpec("embedding_lora_mts", {"peft_type": L, "r": 4, "lora_alpha": 4,
                                       "target_modules": ["word_embeddings", "query"],
                                       "modules_to_save": ["layer.5.output.dense"]}),
        ZooSpec("adalora", {"peft_type": "ADALORA", "init_r": 6, "target_r": 3, "lora_alpha": 8,
                            "total_step": STEPS, "tinit": 0, "tfinal": 0, "deltaT": 1,
                            "target_modules": ["query", "value"]}),
        ZooSpec("loha", {"peft_type": "LOHA", "r": 4, "alpha": 8, "target_modules": ["query", "value"]}),
        # r=4 on value keeps w2 decomposed (4 < 24/2); r=16 on query makes it a full matrix
        ZooSpec("lokr", {"peft_type": "LOKR", "r": 4, "alpha": 8, "target_modules": ["query", "value"],
                         "rank_pattern": {"query": 16}, "alpha_pattern": {"query": 4}}),
        ZooSpec("vera", {"peft_type": "VERA", "r": 8, "target_modules": ["query", "intermediate.dense"],
                         "save_projection": True}),
        ZooSpec("vera_noproj", {"peft_type": "VERA", "r": 8, "target_modules": ["value", "output.dense"],
                                "save_projection": False, "projection_prng_key": 7}),
        ZooSpec("ia3", {"peft_type": "IA3", "target_modules": ["query", "value", "output.dense"],
                        "feedforward_modules": ["output.dense"]}),
        ZooSpec("gpt2_lora", {"peft_type": L, "r": 4, "lora_alpha": 8, "fan_in_fan_out": True,
                              "target_modules": ["c_attn", "c_proj", "c_fc"]}, base="tiny_gpt2"),
        ZooSpec("gpt2_dora", {"peft_type": L, "r": 4, "lora_alpha": 8, "fan_in_fan_out": True, "use_dora": True,
                              "target_modules": ["c_attn", "c_fc"]}, base="tiny_gpt2"),
        ZooSpec("gpt2_ia3", {"peft_type": "IA3", "fan_in_fan_out": True, "target_modules": ["c_attn", "mlp.c_proj"],
                             "feedforward_modules": ["mlp.c_proj"]}, base="tiny_gpt2"),
        ZooSpec("llama_patterns", {"peft_type": L, "r": 4, "lora_alpha": 8, "target_modules": _LLAMA,
                                   "rank_pattern": {"q_proj": 2, r"layers\.1\.mlp\.gate_proj": 8},
                                   "alpha_pattern": {"v_proj": 3, "up_proj": 32}}, base="tiny_llama"),
        ZooSpec("llama_bf16_lora", {"peft_type": L, "r": 4, "lora_alpha": 16, "target_modules": _LLAMA},
                base="tiny_llama", base_dtype="bfloat16"),
        ZooSpec("llama_full", base="tiny_llama", steps=2, lr=1e-3),
    ]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("zoo")
    specs = zoo_specs()
    paths = build_zoo(out, specs, steps=STEPS, seed=0)
    return {s.name: p for s, p in zip(specs, paths, strict=True)} | {"_root": out}


def spec_of(name: str) -> ZooSpec:
    return next(s for s in zoo_specs() if s.name == name)


def base_path_of(zoo: dict[str, Path], name: str) -> Path:
    spec = spec_of(name)
    return base_dir(zoo["_root"], spec.base, spec.base_dtype)


def peft_reference(zoo: dict[str, Path], name: str) -> dict[str, torch.Tensor]:
    """PEFT's own merge in float64: {merged-model key: merged weight - base weight} per targeted matrix.

    Targeted = every module PEFT wrapped (tuner layers and modules_to_save wrappers), so a
    target zoospectra drops shows up as a missing key.
    """
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    spec = spec_of(name)
    model = load_model(spec.base, base_path_of(zoo, name)).double()
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pm = PeftModel.from_pretrained(model, str(zoo[name]))
    targeted = [n + ".weight" for n, m in pm.base_model.model.named_modules()
                if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))]
    merged = pm.merge_and_unload().state_dict()
    return {k: (merged[k].double() - base_sd[k].double()) for k in targeted}


def full_reference(zoo: dict[str, Path], name: str) -> dict[str, torch.Tensor]:
    """W_ft - W0 from transformers' own loading of both checkpoints."""
    spec = spec_of(name)
    ft = load_model(spec.base, zoo[name]).state_dict()
    base = load_model(spec.base, base_path_of(zoo, name)).state_dict()
    return {k: ft[k].double() - base[k].double() for k in ft if k in base and ft[k].dim() == 2}


def copy_adapter(src: Path, dst: Path, *, config: Callable[[dict], None] | None = None,
                 tensors: Callable[[dict], None] | None = None) -> Path:
    """A copy of an adapter with its config and/or tensors edited in place by callbacks."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        config(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        sd = load_file(str(dst / "adapter_model.safetensors"))
        tensors(sd)
        save_file(sd, str(dst / "adapter_model.safetensors"))
    return dst
