"""Intruder-dimension mitigation (docs/science.md#mitigation): scale the intruder components of
Wt = W0 + dW by lambda and write the result back out as a new PEFT LoRA adapter.

The semantics are PEFT's `reduce_intruder_dimension` (peft/tuners/lora/intruders.py), step by
step, per LoRA matrix, without instantiating the model:

    U0           = svd(W0).U                                    # all min(m, n) base vectors
    U, S, Vh     = svd(W0 + dW)                                 # dW = (B @ A) * scale
    intruders    = { j < k : max_i |<u_j, u0_i>| < eps }
    W_mit        = W0 + dW + (lam - 1) * sum_{j in intruders} s_j u_j v_j^T
    dW_mit       = (W_mit - W0) / scale                         # the scale is re-applied on load
    B', A'       = U_r sqrt(S_r), sqrt(S_r) Vh_r of svd(dW_mit), r the layer's rank
    matrices without intruders keep B and A unchanged (PEFT clones them).

So `lam` is the factor the intruder singular values end up multiplied by (0.75 keeps 75%);
the rank-r truncation of dW_mit is PEFT's and can shave a little off the rest of the update.
The output has the same adapter_config.json (same r, alpha and patterns) and the same tensor
names; other tensors of the adapter (e.g. modules_to_save) are copied unchanged, where PEFT's
in-memory add_adapter would re-initialise them from the base. A `mitigation.json` records the
parameters and the intruders found per matrix.

Refused (UnsupportedAdapterError), as PEFT cannot mitigate them correctly: non-LoRA adapters,
DoRA (the magnitude vector is not part of get_delta_weight), LoRA on embeddings or with
fan_in_fan_out (PEFT factorises those in the stored layout and writes factors of swapped
shape), lora_bias, and inits that rewrite the base (PiSSA, OLoRA, CorDA, ...).
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .adapters import PeftAdapter, match_base_key, open_artifact
from .config import AnalysisConfig
from .errors import (
    AdapterConfigError,
    BaseMismatchError,
    CheckpointNotFoundError,
    ConfigError,
    UnsupportedAdapterError,
)
from .io.checkpoint import Checkpoint
from .outputs import claim_output, replace_output

if TYPE_CHECKING:
    from .io.refs import ModelRef

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
REPORT_FILE = "mitigation.json"
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class MitigationParams:
    """PEFT's reduce_intruder_dimension parameters: top_k, threshold_epsilon, mitigation_lambda."""

    lam: float = 0.75
    k: int = AnalysisConfig.k      # the paper's (and PEFT's) top 10, |cos| < 0.5
    eps: float = AnalysisConfig.eps
    dtype: str = "float32"  # PEFT decomposes in float32 (fp16/bf16 are upcast)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lam) and 0.0 <= self.lam <= 1.0):
            # lam scales intruder singular values: 0 removes them, 1 keeps them; beyond [0, 1]
            # would amplify or flip them, which is not mitigation
            raise ConfigError(f"--lam must lie in [0, 1], got {self.lam}", option="lam")
        if self.k < 1:
            raise ConfigError(f"k must be >= 1, got {self.k}", option="k")
        if not 0.0 < self.eps < 1.0:
            raise ConfigError(f"eps must lie in (0, 1), got {self.eps}", option="eps")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be float32 or float64, got {self.dtype!r}", option="dtype")


@dataclass(frozen=True)
class LoraMatrix:
    """One LoRA-adapted linear layer as stored: tensor names and the layer's rank and scale."""

    module: str      # module path in the base model, e.g. encoder.layer.0.attention.self.query
    key_a: str       # adapter tensor names
    key_b: str
    base_key: str    # base checkpoint key of W0
    rank: int
    alpha: float
    scale: float


@dataclass
class MatrixMitigation:
    """What mitigation did to one matrix (0-based intruder indices among the top k of Wt)."""

    module: str
    base_key: str
    intruders: list[int]
    sigma: list[float]          # s_j(Wt) of the intruders, before mitigation
    max_cos: list[float]        # their max |cos| against the base's left singular vectors


@dataclass
class MitigationResult:
    adapter: str
    base: str
    out: str
    params: MitigationParams
    matrices: list[MatrixMitigation] = field(default_factory=list)

    @property
    def n_intruders(self) -> int:
        return sum(len(m.intruders) for m in self.matrices)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


# --- the math (no I/O) ---------------------------------------------------------------------
def find_intruders(u_merged: torch.Tensor, u_base: torch.Tensor, k: int,
                   eps: float) -> tuple[list[int], torch.Tensor]:
    """PEFT's test: indices j < k with max_i |<u_j, u0_i>| < eps, and the max |cos| of all j."""
    cos = (u_merged.T @ u_base).abs().max(dim=1).values  # [p]
    return torch.where(cos[:k] < eps)[0].tolist(), cos


def mitigate_matrix(w0: torch.Tensor, dw: torch.Tensor, scale: float, rank: int,
                    params: MitigationParams
                    ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, MatrixMitigation]:
    """New factors (B' [m, r], A' [r, n], unscaled) for W0 + dW, or None when there is no
    intruder (the adapter's factors stay as they are). Inputs are [out, in] in params.dtype."""
    u_base = torch.linalg.svd(w0, full_matrices=False)[0]
    w_merged = w0 + dw
    u, s, vh = torch.linalg.svd(w_merged, full_matrices=False)
    idx, cos = find_intruders(u, u_base, params.k, params.eps)
    info = MatrixMitigation("", "", idx, [float(s[j]) for j in idx], [float(cos[j]) for j in idx])
    if not idx:
        return None, info
    intruder_part = (u[:, idx] * s[idx]) @ vh[idx]            # sum_j s_j u_j v_j^T, [m, n]
    w_mitigated = w_merged + (params.lam - 1) * intruder_part
    dw_mitigated = (w_mitigated - w0) / scale
    ud, sd, vhd = torch.linalg.svd(dw_mitigated, full_matrices=False)
    root = sd[:rank].sqrt()                                    # share S equally between B and A
    return (ud[:, :rank] * root, root[:, None] * vhd[:rank]), info


# --- reading the adapter -------------------------------------------------------------------
def check_supported(art: PeftAdapter, where: str) -> None:
    """Refuse what PEFT's reduce_intruder_dimension does not handle correctly (module docstring).
    open_artifact has already refused options whose update is not W0 + scale * B @ A."""
    if art.peft_type != "LORA":
        raise UnsupportedAdapterError(
            f"intruder mitigation is defined for LoRA adapters only, got peft_type {art.peft_type!r}",
            file=where)
    for flag, why in (("use_dora", "DoRA's magnitude vector is not part of the LoRA delta"),
                      ("fan_in_fan_out", "PEFT factorises Conv1D weights in the stored [in, out] layout"),
                      ("lora_bias", "the lora_B bias is not part of the delta PEFT factorises")):
        if art.config.get(flag):
            raise UnsupportedAdapterError(f"cannot mitigate an adapter with {flag}=true: {why}",
                                          file=where)
    if art.base_rewritten:
        raise UnsupportedAdapterError(
            f"init_lora_weights={art.init!r} rewrites the base weights, so B @ A is a delta against "
            "a modified base; save it as a plain LoRA first (path_initial_model_for_weight_conversion)",
            file=where)


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """PEFT LoraLayer.update_layer: alpha / sqrt(r) with use_rslora, else alpha / r."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def resolve_base_key(module: str, base_keys: set[str], where: str, base_name: str) -> str:
    """The base checkpoint key of `module`'s weight (adapters.match_base_key's rules)."""
    key = match_base_key(f"{module}.weight", base_keys, artifact=where, base_name=base_name)
    if key is None:
        raise BaseMismatchError(
            f"no base weight for adapted module {module!r}; pass the base checkpoint the adapter "
            "was trained on with --base", file=where, base=base_name, tensor=module)
    return key


def lora_matrices(art: PeftAdapter, base_keys: set[str], where: str,
                  base_name: str) -> list[LoraMatrix]:
    """Every lora_A/lora_B pair of the adapter with its layer's rank and scale."""
    found: dict[str, dict[str, str]] = {}
    for key in art.ckpt.keys():
        match = _LORA_KEY.match(key)
        if match:
            found.setdefault(match["module"], {})[match["which"]] = key
        elif ".lora_embedding_" in key:
            raise UnsupportedAdapterError(
                f"cannot mitigate LoRA on embeddings ({key}): PEFT factorises them in the "
                "transposed layout", file=where, tensor=key)
    out = []
    for stored, pair in sorted(found.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterConfigError(f"{stored} has lora_{''.join(pair)} but not its partner",
                                     file=where, tensor=stored)
        module = stored[len(_PREFIX):] if stored.startswith(_PREFIX) else stored
        rank, alpha = art.rank_alpha(module)  # rank_pattern / alpha_pattern, PEFT's lookup
        out.append(LoraMatrix(module, pair["A"], pair["B"],
                              resolve_base_key(module, base_keys, where, base_name), rank, alpha,
                              lora_scale(alpha, rank, bool(art.config.get("use_rslora")))))
    if not out:
        raise AdapterConfigError("the adapter holds no lora_A / lora_B weights", file=where)
    return out


def adapter_ref(adapter: str | os.PathLike) -> ModelRef:
    """The adapter as a pinned ModelRef: a directory (which must hold adapter_config.json), or a
    Hub reference pinned to the sha its revision points to now (read through the HF cache)."""
    from .io.refs import local_ref
    from .io.resolve import hub_spec, resolve_ref

    text = os.fspath(adapter)
    if hub_spec(text) is not None:
        return resolve_ref(text)
    if not (Path(text) / ADAPTER_CONFIG).is_file():
        raise CheckpointNotFoundError(
            f"no {ADAPTER_CONFIG} in {text}: pass a PEFT adapter directory", file=text)
    return local_ref(text)


def _shown(ref: ModelRef) -> str:
    """A directory as its path, a Hub artifact as repo@sha."""
    return ref.location if ref.source == "local" else f"{ref.location}@{ref.revision}"


def base_ref_for(base: str | os.PathLike | None, adapter: ModelRef) -> ModelRef:
    """--base (a directory or a Hub reference) when given, else the base the adapter's config
    (base_model_name_or_path + revision) or model card names: a directory or a Hub repo."""
    from .io.resolve import BaseResolver, resolve_ref

    if base is not None:
        return resolve_ref(os.fspath(base))
    return BaseResolver()(adapter)


# --- the command ---------------------------------------------------------------------------
def mitigate_adapter(adapter: str | os.PathLike, out: str | os.PathLike,
                     params: MitigationParams = MitigationParams(),
                     base: str | os.PathLike | None = None, *, force: bool = False,
                     on_progress: Callable[[int, int, str], None] | None = None) -> MitigationResult:
    """Write the mitigated adapter to `out`: a new or empty directory, or a previous mitigate
    output (its files replaced one by one; with `force` the whole output is emptied first).
    `out` is claimed (outputs.claim_output) before any work, so a refused one costs nothing."""
    ref = adapter_ref(adapter)
    where = f"{_shown(ref)}/{ADAPTER_WEIGHTS}"
    art = open_artifact(ref.open_source(), model_id=ref.model_id)  # validates the config; refuses pickles
    if not isinstance(art, PeftAdapter):
        raise CheckpointNotFoundError(f"no {ADAPTER_CONFIG} in {_shown(ref)}: pass a PEFT adapter",
                                      file=_shown(ref))
    check_supported(art, where)
    base_ref = base_ref_for(base, ref)
    base_dir = _shown(base_ref)
    local_inputs = [Path(r.location) for r in (ref, base_ref) if r.source == "local"]
    out_dir = claim_output(out, "mitigate", inputs=local_inputs, force=force)
    from .io.quantized import open_base

    base_ckpt = open_base(base_ref.open_source())  # a Hub base: byte ranges of touched matrices; quantised: dequantised
    result = MitigationResult(_shown(ref), str(base_dir), str(out), params)
    tensors = {key: art.ckpt.get(key, dtype=None) for key in art.ckpt.keys()}  # an adapter is small
    layers = lora_matrices(art, set(base_ckpt.keys()), where, str(base_dir))
    for i, layer in enumerate(layers, 1):
        factors, info = _mitigate_layer(layer, tensors, base_ckpt, params, where)
        info.module, info.base_key = layer.module, layer.base_key
        result.matrices.append(info)
        if factors is not None:
            stored = tensors[layer.key_b].dtype  # keep the file's dtype, as PEFT keeps W's
            tensors[layer.key_b] = factors[0].to(stored).contiguous()
            tensors[layer.key_a] = factors[1].to(stored).contiguous()
        if on_progress:
            on_progress(i, len(layers), layer.module)
    if force:
        replace_output(out_dir, "mitigate")
    _publish(out_dir, art.config_text, tensors, result)
    return result


def _mitigate_layer(layer: LoraMatrix, tensors: dict[str, torch.Tensor], base_ckpt: Checkpoint,
                    params: MitigationParams, where: str
                    ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, MatrixMitigation]:
    dtype = _DTYPES[params.dtype]
    a = tensors[layer.key_a].to(dtype)   # [r, n]
    b = tensors[layer.key_b].to(dtype)   # [m, r]
    w0 = base_ckpt.get(layer.base_key, dtype=dtype)
    if a.shape[0] != layer.rank or b.shape[1] != layer.rank:
        raise AdapterConfigError(
            f"{layer.module}: factors have rank {a.shape[0]} / {b.shape[1]} but the config "
            f"(r, rank_pattern) says {layer.rank}", file=where, tensor=layer.key_a)
    if (b.shape[0], a.shape[1]) != tuple(w0.shape):
        raise BaseMismatchError(
            f"{layer.module}: B @ A is {b.shape[0]}x{a.shape[1]} but the base weight "
            f"{layer.base_key} is {tuple(w0.shape)}; check --base", file=where, tensor=layer.base_key)
    dw = (b @ a) * layer.scale  # PEFT: (B @ A) * scaling
    return mitigate_matrix(w0, dw, layer.scale, layer.rank, params)


def _publish(out: Path, config_text: str, tensors: dict[str, torch.Tensor],
             result: MitigationResult) -> None:
    """Each file is written to a temp name in `out` and renamed over its final name, so none is
    ever half written; nothing else in `out` is touched (it is a directory claim_output accepted)."""
    from safetensors.torch import save_file

    # the report last: one that exists describes the weights beside it
    (out / REPORT_FILE).unlink(missing_ok=True)  # a stale report must not describe new weights
    for name, write in ((ADAPTER_CONFIG, lambda p: p.write_text(config_text, encoding="utf-8")),
                        (ADAPTER_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"})),
                        (REPORT_FILE, lambda p: p.write_text(result.to_json(), encoding="utf-8"))):
        tmp = out / f".{name}.tmp-{os.getpid()}"
        try:
            write(tmp)
            os.replace(tmp, out / name)
        finally:
            tmp.unlink(missing_ok=True)
