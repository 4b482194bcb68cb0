"""Quantised tiny llama bases, written by the quantisers' own code, and a QLoRA-style adapter.

- bnb_base: transformers' own `from_pretrained(..., quantization_config=BitsAndBytesConfig(...))` on the
  CPU (bitsandbytes >= 0.49 quantises there) followed by `save_pretrained`: the exact files a QLoRA
  user uploads (NF4 double-quantised, FP4, LLM.int8).
- gguf_base: gguf's GGUFWriter with llama.cpp's layout (q/k rows permuted as convert_hf_to_gguf.py's
  LlamaModel.permute does), legacy blocks quantised by `gguf.quants.quantize`, and K-quant tensors
  (Q4_K, Q6_K; the Python package can only dequantise those) written as random but valid blocks.
- qlora_adapter: PEFT LoRA trained a few steps on the 4-bit model itself (bitsandbytes Linear4bit
  layers on the CPU), saved with save_pretrained.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

LLAMA = dict(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(out: Path, seed: int = 0) -> Path:
    """A random tiny llama (hidden 256: a GGUF K-quant row is a multiple of 256) in float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(out)
    return out


def bnb_config(kind: str):
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    quant_type, double = {"nf4": ("nf4", True), "fp4": ("fp4", False), "nf4_bf16": ("nf4", True)}[kind]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double, bnb_4bit_compute_dtype=torch.bfloat16)


def load_quantized(fp_dir: Path, kind: str):
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if kind == "nf4_bf16" else torch.float32
    return AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=bnb_config(kind), device_map="cpu",
                                                dtype=dtype)


def bnb_base(fp_dir: Path, out: Path, kind: str) -> Path:
    """`kind`: nf4 (double quant), fp4 (single), nf4_bf16 (from a bf16 model), int8."""
    load_quantized(fp_dir, kind).save_pretrained(out)
    return out


def bnb_reference(base_dir: Path) -> dict[str, torch.Tensor]:
    """bitsandbytes' own dequantisation of every quantised weight in a saved checkpoint:
    QuantState.from_dict + functional.dequantize_4bit, or functional.int8_vectorwise_dequant."""
    import bitsandbytes.functional as F
    from safetensors.torch import load_file

    sd = load_file(str(base_dir / "model.safetensors"))
    out = {}
    for k, v in sd.items():
        if k.endswith(".weight") and k + ".absmax" in sd:
            state = {s[len(k) + 1:]: t for s, t in sd.items() if s.startswith(k + ".")}
            qs = F.QuantState.from_dict(state, device=torch.device("cpu"))
            out[k] = F.dequantize_4bit(v, qs).float()
        elif k.endswith(".weight") and v.dtype == torch.int8:
            out[k] = F.int8_vectorwise_dequant(v, sd[k[: -len("weight")] + "SCB"]).float()
    return out


# --- GGUF ------------------------------------------------------------------------------------------
def _permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (the rotary layout of q/k rows)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# gguf name (in the block) -> (HF module, quant type). Q4_K / Q6_K are written as random valid blocks.
GGUF_BLOCK = {"attn_q": ("self_attn.q_proj", "Q4_K"), "attn_k": ("self_attn.k_proj", "Q8_0"),
              "attn_v": ("self_attn.v_proj", "Q4_0"), "attn_output": ("self_attn.o_proj", "Q5_1"),
              "ffn_gate": ("mlp.gate_proj", "Q6_K"), "ffn_up": ("mlp.up_proj", "Q4_1"),
              "ffn_down": ("mlp.down_proj", "Q5_0")}


def _kquant_blocks(qtype, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks with finite, small f16 scales: a valid tensor of `qtype` for [rows, cols]."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    half = lambda x: np.full(raw.shape[:2], x, np.float16).view(np.uint8).reshape(*raw.shape[:2], 2)  # noqa: E731
    if qtype == GGMLQuantizationType.Q4_K:      # d, dmin (f16) | scales[12] | qs[128]
        raw[..., 0:2], raw[..., 2:4] = half(0.002), half(0.001)
    else:                                       # Q6_K: ql[128] | qh[64] | scales[16] int8 | d (f16)
        raw[..., -2:] = half(0.0005)
    return raw.reshape(rows, -1)


def gguf_base(fp_dir: Path, out: Path, seed: int = 0) -> Path:
    """The tiny llama as a llama.cpp-layout GGUF with mixed quant types (see GGUF_BLOCK)."""
    import gguf
    from safetensors.torch import load_file

    sd = {k: v.numpy() for k, v in load_file(str(fp_dir / "model.safetensors")).items()}
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tiny-llama.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    c = LLAMA
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_rope_dimension_count(c["hidden_size"] // c["num_attention_heads"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_vocab_size(c["vocab_size"])
    Q = gguf.GGMLQuantizationType
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].astype(np.float16))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", gguf.quants.quantize(sd["lm_head.weight"], Q.Q8_0), raw_dtype=Q.Q8_0)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        for name, (module, qname) in GGUF_BLOCK.items():
            t = sd[p + module + ".weight"]
            if name == "attn_q":
                t = _permute(t, c["num_attention_heads"], c["num_attention_heads"])
            elif name == "attn_k":
                t = _permute(t, c["num_attention_heads"], c["num_key_value_heads"])
            qtype = Q[qname]
            data = _kquant_blocks(qtype, t.shape, rng) if qname.endswith("_K") else gguf.quants.quantize(t, qtype)
            w.add_tensor(f"blk.{i}.{name}.weight", data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


_HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_qwen2_base(out: Path, seed: int = 0) -> Path:
    """A random tiny Qwen2 (q/k/v biases, no q/k permutation in llama.cpp) as GGUF: matrices Q8_0,
    biases and norms F32, embeddings F16."""
    import gguf
    from safetensors.torch import load_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    Qwen2ForCausalLM(Qwen2Config(**LLAMA)).save_pretrained(out / "hf")
    sd = {k: v.numpy() for k, v in load_file(str(out / "hf" / "model.safetensors")).items()}
    w = gguf.GGUFWriter(str(out / "tiny-llama.gguf"), "qwen2")
    c = LLAMA
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_vocab_size(c["vocab_size"])
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    Q8 = gguf.GGMLQuantizationType.Q8_0
    for k, v in sd.items():
        if k in top:
            name = top[k]
        else:
            block, rest = k[len("model.layers."):].split(".", 1)
            module, kind = rest.rsplit(".", 1)
            name = f"blk.{block}.{_HF_TO_GGUF[module]}.{kind}"
        if k == "model.embed_tokens.weight":
            w.add_tensor(name, v.astype(np.float16))
        elif v.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(v, Q8), raw_dtype=Q8)
        else:
            w.add_tensor(name, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def gguf_reference(gguf_dir: Path) -> dict[str, torch.Tensor]:
    """transformers' own GGUF loader (gguf.quants.dequantize + its llama q/k un-permutation):
    the model's float32 state dict as `from_pretrained(gguf_file=...)` builds it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="tiny-llama.gguf", dtype=torch.float32)
    return {k: v.detach().float() for k, v in model.state_dict().items()}


# --- a QLoRA-style adapter --------------------------------------------------------------------------
def qlora_adapter(fp_dir: Path, out: Path, kind: str = "nf4", steps: int = 3, seed: int = 0) -> Path:
    """LoRA on every linear layer, trained `steps` Adam steps on the quantised model (QLoRA)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = load_quantized(fp_dir, kind)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    pm = get_peft_model(model, cfg)
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.arange(32).reshape(2, 16) % LLAMA["vocab_size"]
    for _ in range(steps):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    pm.save_pretrained(out)
    return out


def peft_delta(adapter_dir: Path, fp_dir: Path, base_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's own merge in float64 on a float model holding `base_weights` (the dequantised base):
    {key: merged - W0} for every LoRA-wrapped module."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float64)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k in base_weights:
                v.copy_(base_weights[k].double())
    w0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pm = PeftModel.from_pretrained(model, str(adapter_dir))
    targeted = [n + ".weight" for n, m in pm.base_model.model.named_modules() if isinstance(m, BaseTunerLayer)]
    merged = pm.merge_and_unload().state_dict()
    return {k: merged[k].double() - w0[k] for k in targeted}
