"""Quantised bases, dequantised per tensor on read: bitsandbytes (NF4, FP4, LLM.int8) and GGUF.

    base = open_base(source)                 # a plain Checkpoint, a BnbCheckpoint or a GgufCheckpoint
    w0 = base.get("model.layers.0.self_attn.q_proj.weight")   # float32, dequantised
    base.quantization_of(key)                # "bnb-nf4 (double quant, blocksize 64, bfloat16)", "" if plain

Both subclasses keep Checkpoint's interface: keys() lists the logical weights under their Hugging
Face names (quantisation-state tensors hidden), info() gives the logical [out, in] shape and a float
dtype, get() dequantises only that tensor. The adapters and the planner never see packed bytes.

bitsandbytes, as `save_pretrained` of a 4-bit / 8-bit transformers model writes it (bitsandbytes
0.50: QuantState.as_dict(packed=True), Linear8bitLt._save_to_state_dict):
  4-bit  <m>.weight            uint8 [ceil(N/2), 1], two codes per byte, high nibble first
         <m>.weight.absmax     float32 [ceil(N/blocksize)], or uint8 when double-quantised
         <m>.weight.quant_map  float32 [16]: the code table (nf4 or fp4)
         <m>.weight.nested_absmax float32, <m>.weight.nested_quant_map float32 [256]  (double quant)
         <m>.weight.quant_state.bitsandbytes__{nf4|fp4}  uint8: JSON {quant_type, blocksize, dtype,
                                shape, nested_blocksize, nested_dtype, nested_offset}
  int8   <m>.weight int8 [out, in], <m>.SCB float32 [out] (row absmax), <m>.weight_format uint8
Dequantisation follows bitsandbytes' own reference (backends/default/ops.py): W = code[q] * absmax
per block in float32, cast to the state's dtype; absmax of a double-quantised state is
nested_code[absmax] * nested_absmax per 256-block (cast to nested_dtype) + nested_offset. int8 is
W = q * SCB[row] * (1/127) in float32 (bitsandbytes' int8_vectorwise_dequant).

GGUF (local files only: it is memory-mapped) through the `gguf` package's reader and its own
`gguf.quants.dequantize`; tensor names map to Hugging Face names for the llama, qwen2 and qwen3
architectures, and llama's q/k rows are un-permuted as transformers' GGUF loader does (llama.cpp's
converter permutes them for its rotary layout).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointNotFoundError, QuantizedBaseError, TensorNotFoundError
from ..numeric import FLOAT32, read_dtype
from .checkpoint import (
    FLOAT_DTYPES,
    Checkpoint,
    FileSource,
    LocalFileSource,
    SingleFileSource,
    TensorInfo,
    _check_finite,
    torch_dtype_of,
)

if TYPE_CHECKING:
    import torch

CHUNK = 1 << 20   # values dequantised per step: bounds the int64 index and float temporaries (~40 MB)

# bitsandbytes' 4-bit code tables (functional.get_4bit_type), normalised to [-1, 1] as it does.
_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0]
_FP4 = [v / 12.0 for v in (0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0,
                           -2.0, -3.0)]
CODES_4BIT = {"nf4": _NF4, "fp4": _FP4}
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_STATE_DTYPES = ("float32", "float16", "bfloat16")    # torch dtype names bitsandbytes writes
_DTYPE_CODE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_QS = ".quant_state.bitsandbytes__"
_4BIT_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def open_base(source: FileSource) -> Checkpoint:
    """The base checkpoint in `source`: GGUF when it holds a .gguf and no safetensors weights,
    bitsandbytes when its safetensors carry quantisation state, else the plain Checkpoint."""
    gguf_name = _gguf_file(source)
    if gguf_name is not None:
        return GgufCheckpoint(source, gguf_name)
    ckpt = Checkpoint.open(source)
    return BnbCheckpoint.wrap(ckpt) or ckpt


def _gguf_file(source: FileSource) -> str | None:
    """The one .gguf file of a local base folder without safetensors weights (None otherwise: Hub
    sources are never asked, so a Hub base costs no extra request)."""
    if isinstance(source, SingleFileSource):
        return source.filename if source.filename.endswith(".gguf") else None
    if not isinstance(source, LocalFileSource) or any(
            source.exists(f) for f in ("model.safetensors", "model.safetensors.index.json")):
        return None
    root = source.root
    found = sorted(p.name for p in root.iterdir() if p.is_file() and p.name.endswith(".gguf"))
    if len(found) > 1:
        raise QuantizedBaseError(f"{len(found)} GGUF files {found} in one base folder: pass the one to analyse "
                                 "against as --base FOLDER/FILE.gguf", file=str(root))
    return found[0] if found else None


# --- bitsandbytes ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class BnbState:
    """How one bitsandbytes weight is stored: enough to dequantise it and to describe it."""

    key: str                          # the logical weight key, "<module>.weight"
    method: str                       # nf4 | fp4 | int8
    shape: tuple[int, ...]
    dtype: torch.dtype                # the weight's dtype before quantisation: bitsandbytes dequantises to it
    blocksize: int = 0
    nested: bool = False
    nested_blocksize: int = 0
    nested_dtype: torch.dtype | None = None   # set when nested
    nested_offset: float = 0.0
    parts: tuple[tuple[str, str], ...] = ()   # (role, checkpoint key) of the state tensors

    def describe(self) -> str:
        if self.method == "int8":
            return "bnb-int8 (LLM.int8, row-wise absmax)"
        quant = "double quant, " if self.nested else ""
        return f"bnb-{self.method} ({quant}blocksize {self.blocksize}, {str(self.dtype).removeprefix('torch.')})"

    def part(self, role: str) -> str:
        return dict(self.parts)[role]


class BnbCheckpoint(Checkpoint):
    """A safetensors checkpoint whose quantised weights are dequantised on get()."""

    @classmethod
    def wrap(cls, ckpt: Checkpoint) -> BnbCheckpoint | None:
        """The same checkpoint read as bitsandbytes, or None when it holds no quantisation state."""
        raw = ckpt.keys()
        if not any(_QS in k or k.endswith((".weight.absmax", ".SCB")) for k in raw):
            return None
        out = cls(ckpt.source, ckpt.files, ckpt.weight_map)
        out._headers = ckpt._headers
        out._index(raw)
        return out

    def _index(self, raw: list[str]) -> None:
        """Which keys are quantised weights, and which are state tensors hidden from keys()."""
        keys = set(raw)
        self._quant: dict[str, str] = {}          # weight key -> "4bit" | "int8"
        hidden: set[str] = set()
        for k in raw:
            if _QS in k or any(k.endswith(".weight." + p) for p in _4BIT_PARTS):
                weight = k.split(_QS)[0] if _QS in k else k.rsplit(".", 1)[0]
                self._quant[weight] = "4bit"
                hidden.add(k)
            elif k.endswith((".SCB", ".weight_format")):
                self._quant[k.rsplit(".", 1)[0] + ".weight"] = "int8"
                hidden.add(k)
        for weight in self._quant:
            if weight not in keys:
                raise QuantizedBaseError(f"quantisation state for {weight!r} but no such weight tensor: the "
                                         "checkpoint is incomplete; re-save or re-download it",
                                         file=self.source.name, tensor=weight)
        self._raw_keys = [k for k in raw if k not in hidden]
        self._hidden = hidden
        self._states: dict[str, BnbState] = {}

    def keys(self) -> list[str]:
        return list(self._raw_keys)

    # the stored tensors as the safetensors layer sees them (state tensors included)
    def _has(self, key: str) -> bool:
        return Checkpoint.__contains__(self, key)

    def _rinfo(self, key: str) -> TensorInfo:
        return Checkpoint.info(self, key)

    def _rget(self, key: str, dtype: torch.dtype | None) -> torch.Tensor:
        info = self._rinfo(key)   # not self.info(): that gives a quantised weight's logical shape
        native = torch_dtype_of(info.dtype)
        if native is None:
            raise QuantizedBaseError(f"state tensor {key!r} has dtype {info.dtype}, which bitsandbytes never "
                                     "writes; re-save the quantised model", file=self._where(key), tensor=key)
        tensor = self._read(info, native)
        return tensor if dtype is None else tensor.to(dtype)


    def info(self, key: str) -> TensorInfo:
        raw = self._rinfo(key)
        if key not in self._quant:
            return raw
        st = self.state(key)
        code = _DTYPE_CODE[str(st.dtype).removeprefix("torch.")]
        return TensorInfo(key, code, st.shape, raw.file, raw.start, raw.end)

    def quantization_of(self, key: str) -> str:
        return self.state(key).describe() if key in self._quant else ""

    def _where(self, key: str) -> str:
        return f"{self.source.name}/{self._rinfo(key).file}"

    def _bad(self, key: str, what: str) -> QuantizedBaseError:
        return QuantizedBaseError(f"bitsandbytes state of {key!r}: {what}; re-save the quantised model "
                                  "(save_pretrained) or analyse against the unquantised base",
                                  file=self._where(key), tensor=key)

    def state(self, key: str) -> BnbState:
        if key not in self._states:
            self._states[key] = self._read_state(key) if self._quant[key] == "4bit" else self._int8_state(key)
        return self._states[key]

    def _int8_state(self, key: str) -> BnbState:
        import torch
        module = key.rsplit(".", 1)[0]
        raw = self._rinfo(key)
        scb = module + ".SCB"
        if raw.dtype != "I8":
            raise self._bad(key, f"an LLM.int8 weight must be I8, found {raw.dtype}")
        if not self._has(scb):
            raise self._bad(key, f"the int8 weight has no row scales {scb!r}")
        s = self._rinfo(scb)
        if len(raw.shape) != 2 or s.dtype not in FLOAT_DTYPES or s.shape != raw.shape[:1]:
            raise self._bad(key, f"SCB {s.dtype} {list(s.shape)} does not scale the rows of {list(raw.shape)}")
        fmt = module + ".weight_format"
        if self._has(fmt):
            code = self._rget(fmt, dtype=None).reshape(-1)
            if code.numel() != 1 or int(code[0]) != 0:
                raise self._bad(key, f"weight_format {code.tolist()} is not 0 (row-major): only the row "
                                     "layout bitsandbytes writes today is understood")
        return BnbState(key, "int8", raw.shape, torch.float32, parts=(("SCB", scb),))

    def _read_state(self, key: str) -> BnbState:
        import torch
        found = [k for k in (key + _QS + t for t in CODES_4BIT) if self._has(k)]
        others = [k for k in self._hidden if k.startswith(key + _QS) and k not in found]
        if others:
            kind = others[0].rsplit("__", 1)[1]
            raise self._bad(key, f"unknown quant type {kind!r} ({others[0]}); zoospectra dequantises "
                                 f"{sorted(CODES_4BIT)} and LLM.int8")
        if len(found) != 1:
            raise self._bad(key, f"missing quant state tensor {key + _QS}<nf4|fp4>" if not found
                            else f"two quant state tensors {found}")
        meta = self._state_json(key, found[0])
        method = found[0].rsplit("__", 1)[1]
        if meta.get("quant_type") != method:
            raise self._bad(key, f"quant_type {meta.get('quant_type')!r} in the state disagrees with {found[0]!r}")
        shape, dtype, blocksize = meta.get("shape"), meta.get("dtype"), meta.get("blocksize")
        if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
            raise self._bad(key, f"shape {shape!r} is not a list of positive integers")
        if dtype not in _STATE_DTYPES or blocksize not in BLOCKSIZES:
            raise self._bad(key, f"dtype {dtype!r} / blocksize {blocksize!r} are not ones bitsandbytes writes")
        parts = [("absmax", key + ".absmax"), ("quant_map", key + ".quant_map")]
        nested = "nested_absmax" in meta or self._has(key + ".nested_absmax")
        extra: dict[str, Any] = {}
        if nested:
            nb, nd, off = meta.get("nested_blocksize"), meta.get("nested_dtype"), meta.get("nested_offset")
            if nb not in BLOCKSIZES or nd not in _STATE_DTYPES or not isinstance(off, (int, float)):
                raise self._bad(key, f"nested_blocksize {nb!r} / nested_dtype {nd!r} / nested_offset {off!r} "
                                     "are missing or invalid")
            extra = dict(nested=True, nested_blocksize=nb, nested_dtype=getattr(torch, nd), nested_offset=float(off))
            parts += [("nested_absmax", key + ".nested_absmax"), ("nested_quant_map", key + ".nested_quant_map")]
        st = BnbState(key, method, tuple(shape), getattr(torch, dtype), blocksize, parts=tuple(parts), **extra)
        self._check_sizes(st)
        return st

    def _state_json(self, key: str, qs_key: str) -> dict:
        import torch
        raw = self._rget(qs_key, dtype=None)
        if raw.dtype != torch.uint8:
            raise self._bad(key, f"{qs_key!r} is {raw.dtype}, not the uint8 JSON bitsandbytes writes")
        try:
            meta = json.loads(bytes(raw.reshape(-1).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise self._bad(key, f"{qs_key!r} is not UTF-8 JSON ({type(err).__name__})") from None
        if not isinstance(meta, dict):
            raise self._bad(key, f"{qs_key!r} holds JSON {type(meta).__name__}, not an object")
        return meta

    def _check_sizes(self, st: BnbState) -> None:
        """Every state tensor present with the size the shape and block sizes imply."""
        n = 1
        for d in st.shape:
            n *= d
        n_abs = -(-n // st.blocksize)
        want = {"absmax": n_abs, "quant_map": 16}
        if st.nested:
            want |= {"nested_absmax": -(-n_abs // st.nested_blocksize), "nested_quant_map": 256}
        for role, k in st.parts:
            if not self._has(k):
                raise self._bad(st.key, f"missing state tensor {k!r}")
            info = self._rinfo(k)
            if info.numel != want[role]:
                raise self._bad(st.key, f"{k!r} has {info.numel} values, expected {want[role]} for shape "
                                        f"{list(st.shape)} and blocksize {st.blocksize}")
            ok = ("U8",) if role == "absmax" and st.nested else FLOAT_DTYPES
            if info.dtype not in ok:
                raise self._bad(st.key, f"{k!r} is {info.dtype}, expected one of {list(ok)}")
        packed = self._rinfo(st.key)
        if packed.nbytes != -(-n // 2):
            raise self._bad(st.key, f"packed weight holds {packed.nbytes} bytes, expected {-(-n // 2)} for shape "
                                    f"{list(st.shape)}")

    def get(self, key: str, dtype: torch.dtype | None = FLOAT32) -> torch.Tensor:
        dtype = read_dtype(dtype)
        if key not in self._quant:  # plain weights (norms, embeddings left unquantised) and state tensors
            return super().get(key, dtype)
        st = self.state(key)
        w = self._dequant_int8(st) if st.method == "int8" else self._dequant_4bit(st)
        _check_finite(w, key, self._where(key))
        return w if dtype is None else w.to(dtype)

    def _dequant_int8(self, st: BnbState) -> torch.Tensor:
        import torch
        q = self._rget(st.key, dtype=None)
        scb = self._rget(st.part("SCB"), dtype=torch.float32)
        out = torch.empty(q.shape, dtype=torch.float32)
        rows = max(1, CHUNK // max(1, q.shape[1]))
        for i in range(0, q.shape[0], rows):  # bnb: A * stats.view(-1, 1) * 7.874015718698502e-3
            out[i:i + rows] = q[i:i + rows] * scb[i:i + rows].view(-1, 1) * 7.874015718698502e-3
        return out

    def _absmax(self, st: BnbState) -> torch.Tensor:
        import torch
        if not st.nested:
            return self._rget(st.part("absmax"), dtype=torch.float32)
        q = self._rget(st.part("absmax"), dtype=None).reshape(-1)
        code2 = self._rget(st.part("nested_quant_map"), dtype=torch.float32).reshape(-1)
        a2 = self._rget(st.part("nested_absmax"), dtype=torch.float32).reshape(-1)
        nested = _blockwise(q, a2, code2, st.nested_blocksize, st.nested_dtype or torch.float32)
        return nested.float() + st.nested_offset

    def _dequant_4bit(self, st: BnbState) -> torch.Tensor:
        import torch
        stored = self._rget(st.part("quant_map"), dtype=torch.float32).reshape(-1)
        code = torch.tensor(CODES_4BIT[st.method], dtype=torch.float32)
        if not torch.equal(stored, code):  # bitsandbytes' kernels use the built-in table, not the stored one
            raise self._bad(st.key, f"quant_map is not bitsandbytes' {st.method} code table (damaged state)")
        absmax = self._absmax(st)
        packed = self._rget(st.key, dtype=None).reshape(-1)
        if packed.dtype != torch.uint8:  # quant_storage other than uint8 (e.g. bf16 for FSDP): same bytes
            packed = packed.view(torch.uint8)
        n = 1
        for d in st.shape:
            n *= d
        out = torch.empty(n, dtype=st.dtype)
        step = max(2 * st.blocksize, CHUNK - CHUNK % (2 * st.blocksize))   # whole blocks and bytes per step
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            b = packed[lo // 2: (hi + 1) // 2].to(torch.int64)
            idx = torch.stack((b >> 4, b & 0xF), dim=1).reshape(-1)[: hi - lo]
            scale = absmax[lo // st.blocksize: -(-hi // st.blocksize)].repeat_interleave(st.blocksize)[: hi - lo]
            out[lo:hi] = (code[idx] * scale).to(st.dtype)
        return out.reshape(st.shape).float()


def _blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
               dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' dequantize_blockwise (8-bit codes): code[q] * absmax per block, cast to dtype."""
    import torch
    vals = code[q.to(torch.int64)]
    scale = absmax.repeat_interleave(blocksize)[: vals.numel()]
    return (vals * scale).to(dtype)


# --- GGUF -----------------------------------------------------------------------------------------
# gguf tensor name (after "blk.N.") -> Hugging Face module path (after "model.layers.N."), shared by
# the architectures below (llama.cpp's tensor_mapping.py, transformers' GGUF loader).
_GGUF_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
GGUF_ARCHS = {"llama": True, "qwen2": False, "qwen3": False}   # arch -> llama.cpp permuted q/k rows
_BLK = re.compile(r"^blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")


def gguf_to_hf(name: str) -> str | None:
    """The Hugging Face key of a GGUF tensor name of a supported architecture, None if unmapped."""
    m = _BLK.match(name)
    if m:
        leaf = _GGUF_BLOCK.get(m.group(2))
        return None if leaf is None else f"model.layers.{m.group(1)}.{leaf}.{m.group(3)}"
    stem, _, kind = name.rpartition(".")
    top = _GGUF_TOP.get(stem)
    return None if top is None else f"{top}.{kind}"


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's rotary permutation of q/k rows (transformers' _reverse_permute_weights)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


class GgufCheckpoint(Checkpoint):
    """A .gguf file under Hugging Face names, each tensor dequantised with gguf's own code on get()."""

    def __init__(self, source: FileSource, filename: str) -> None:
        super().__init__(source, [filename])
        if not isinstance(source, LocalFileSource):
            raise QuantizedBaseError("GGUF bases are memory-mapped and must be local files: download the .gguf "
                                     "and pass --base PATH", file=f"{source.name}/{filename}")
        self.path = source.path(filename)
        self.where = str(self.path)
        try:
            from gguf import GGUFReader
        except ImportError:
            raise QuantizedBaseError("reading a GGUF base needs the `gguf` package: pip install "
                                     "'zoospectra[quant]'", file=self.where) from None
        try:
            self.reader = GGUFReader(self.path)
        except (ValueError, KeyError, IndexError, OverflowError, TypeError) as err:
            raise QuantizedBaseError(f"not a readable GGUF file ({type(err).__name__}: {err}); re-download it",
                                     file=self.where) from None
        except FileNotFoundError:
            raise CheckpointNotFoundError("no such GGUF file; check the path", file=self.where) from None
        self.arch = self._field("general.architecture")
        if self.arch not in GGUF_ARCHS:
            raise QuantizedBaseError(f"GGUF architecture {self.arch!r} has no Hugging Face name map in zoospectra "
                                     f"(supported: {sorted(GGUF_ARCHS)})", file=self.where)
        self.n_head = self._int_field(f"{self.arch}.attention.head_count")
        self.n_head_kv = self._int_field(f"{self.arch}.attention.head_count_kv", self.n_head)
        self._tensors: dict[str, Any] = {}
        unmapped = []
        for t in self.reader.tensors:
            hf = gguf_to_hf(t.name)
            if hf is None:
                unmapped.append(t.name)
            else:
                self._tensors[hf] = t
        self.unmapped = unmapped   # e.g. rope_freqs: not weights an adapter targets

    def _field(self, key: str) -> Any:
        f = self.reader.get_field(key)
        if f is None:
            raise QuantizedBaseError(f"GGUF metadata lacks {key!r}; the file is incomplete", file=self.where)
        return f.contents()

    def _int_field(self, key: str, default: int | None = None) -> int:
        if default is not None and self.reader.get_field(key) is None:
            return default
        value = self._field(key)
        if not isinstance(value, int) or value <= 0:
            raise QuantizedBaseError(f"GGUF metadata {key}={value!r} is not a positive integer", file=self.where)
        return value

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def _tensor(self, key: str) -> Any:
        if key not in self._tensors:
            raise TensorNotFoundError(f"tensor {key!r} is not in this GGUF file (under its Hugging Face name); "
                                      "check the key (see keys())", file=self.where, tensor=key)
        return self._tensors[key]

    def info(self, key: str) -> TensorInfo:
        t = self._tensor(key)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))   # ggml lists the fastest dimension first
        return TensorInfo(key, "F32", shape, self.files[0], int(t.data_offset), int(t.data_offset) + int(t.n_bytes))

    def quantization_of(self, key: str) -> str:
        return f"gguf {self._tensor(key).tensor_type.name}"

    def get(self, key: str, dtype: torch.dtype | None = FLOAT32) -> torch.Tensor:
        import numpy as np
        import torch
        from gguf.quants import dequantize

        dtype = read_dtype(dtype)
        t, info = self._tensor(key), self.info(key)
        data = t.data.reshape(-1, t.data.shape[-1]) if t.data.ndim > 1 else t.data.reshape(1, -1)
        out = np.empty((data.shape[0], info.numel // max(1, data.shape[0])), dtype=np.float32)
        step = max(1, CHUNK // max(1, out.shape[1]))   # whole rows (ggml blocks never span rows) per step:
        try:                                           # gguf's numpy temporaries stay a few chunks large
            for i in range(0, data.shape[0], step):
                out[i:i + step] = dequantize(data[i:i + step], t.tensor_type).reshape(-1, out.shape[1])
        except NotImplementedError as err:
            raise QuantizedBaseError(f"gguf cannot dequantise {t.tensor_type.name} ({err})", file=self.where,
                                     tensor=key) from None
        w = torch.from_numpy(out).reshape(info.shape)
        self.bytes_read += info.nbytes
        if GGUF_ARCHS[self.arch] and w.dim() == 2:
            stem = t.name.rsplit(".", 2)[-2]
            if stem == "attn_q":
                w = unpermute_rows(w, self.n_head)
            elif stem == "attn_k":
                w = unpermute_rows(w, self.n_head_kv)
        _check_finite(w, key, self.where)
        return w if dtype is None else w.to(dtype)
