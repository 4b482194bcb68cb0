"""dW for each PEFT type: pure tensor math, no I/O. Every matrix is [out, in] = [m, n].

Transcribed from PEFT 0.21 (`get_delta_weight` in tuners/<type>/layer.py, lora/variants.py for
DoRA, vera/model.py for the shared projections) and tested against `merge_and_unload()`.
Factored results are (B [m, r] with the scale folded in, A [r, n]).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


Factors = tuple["torch.Tensor", "torch.Tensor"]


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    """LoraLayer.update_layer: alpha / sqrt(r) with rsLoRA, else alpha / r."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> Factors:
    """Linear: dW = scale * B @ A; lora_A [r, n], lora_B [m, r] (fan_in_fan_out only moves W0)."""
    return (lora_b * scale).contiguous(), lora_a.contiguous()


def embedding_lora_factors(emb_a: torch.Tensor, emb_b: torch.Tensor, scale: float) -> Factors:
    """Embedding: dW = (B @ A)^T * scale = A^T @ B^T * scale in the [num_embeddings, dim] layout.

    lora_embedding_A [r, num_embeddings], lora_embedding_B [dim, r].
    """
    return (emb_a.T * scale).contiguous(), emb_b.T.contiguous()


def dora_dense(w0: torch.Tensor, B: torch.Tensor, A: torch.Tensor, magnitude: torch.Tensor,
               per_column: bool) -> torch.Tensor:
    """Wt = m / ||W0 + B A|| * (W0 + B A); dW = Wt - W0, in float64 (the difference is small vs W0).

    Linear: one norm per output row. Embedding (PEFT's DoraEmbeddingLayer, fan_in_fan_out=True):
    one norm per embedding dimension, i.e. per column of the [num_embeddings, dim] weight.
    """
    import torch
    w0 = w0.double()
    merged = w0 + B.double() @ A.double()                                  # [m, n]
    norm = torch.linalg.norm(merged, dim=0 if per_column else 1, keepdim=True)
    return (magnitude.double().view(norm.shape) / norm) * merged - w0


def adalora_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, lora_e: torch.Tensor, scale: float,
                    ranknum: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """dW = B @ (A * E) * scale / (ranknum + 1e-5); returns (B scaled, A * E, effective scale)."""
    eff = scale / (ranknum + 1e-5)
    return (lora_b * eff).contiguous(), (lora_a * lora_e).contiguous(), eff


def loha_dense(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
               scale: float) -> torch.Tensor:
    """HadaWeight: ((w1a @ w1b) * (w2a @ w2b)) * alpha / r; w?a [m, r], w?b [r, n]."""
    return ((w1a @ w1b) * (w2a @ w2b)) * scale


def lokr_dense(w1: torch.Tensor, w2: torch.Tensor, scale: float, shape: tuple[int, int]) -> torch.Tensor:
    """make_kron: kron(w1 [a, c], w2 [b, d]) * alpha / r, reshaped to the base [a*b, c*d]."""
    import torch
    return torch.kron(w1, w2).reshape(shape) * scale


def vera_factors(lambda_b: torch.Tensor, lambda_d: torch.Tensor, vera_a: torch.Tensor,
                 vera_b: torch.Tensor, m: int, n: int) -> Factors:
    """dW = (lambda_b * B[:m]) @ (lambda_d * A[:, :n]) on the shared projections A [r, N], B [M, r]."""
    return ((lambda_b.unsqueeze(-1) * vera_b[:m, :]).contiguous(),
            (lambda_d.unsqueeze(-1) * vera_a[:, :n]).contiguous())


def ia3_dense(w0: torch.Tensor, ia3_l: torch.Tensor) -> torch.Tensor:
    """Wt = W0 * l, so dW = W0 * (l - 1); l [1, n] scales inputs (feed-forward), [m, 1] outputs."""
    return w0.double() * (ia3_l.double() - 1.0)


def kaiming_uniform(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """peft.tuners.vera.model._kaiming_init, same float operations so the same bits."""
    import torch
    std = math.sqrt(2) / math.sqrt(shape[1])  # gain / sqrt(fan_in), fan_in = size(1)
    bound = math.sqrt(3.0) * std
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def vera_projections(r: int, max_out: int, max_in: int, prng_key: int) -> Factors:
    """VeraModel._init_vera_A_vera_B: A (r, max in) then B (max out, r) from one CPU generator.

    max_in / max_out run over every targeted module. Exact for the torch build that trained the
    adapter's generator stream (PEFT itself warns the same); tests compare against PEFT.
    """
    import torch
    gen = torch.Generator(device="cpu").manual_seed(prng_key)
    vera_a = kaiming_uniform((r, max_in), gen)
    return vera_a, kaiming_uniform((max_out, r), gen)
