"""Lazy safetensors checkpoints in Hugging Face layout: headers first, one tensor's bytes at a time.

A safetensors file is `u64 little-endian header length N | N bytes of JSON | data`. The JSON maps
each tensor name to {dtype, shape, data_offsets=[begin, end]} (offsets relative to the data
section), plus an optional "__metadata__" of str -> str. We parse it ourselves, strictly, so a
7B checkpoint (local or over HTTP ranges) never has to be loaded to read one matrix.

    ckpt = Checkpoint.open("path/to/model_dir")    # or a .safetensors file, or any FileSource
    w = ckpt.get("encoder.layer.0.attention.self.query.weight")   # float32, only its bytes read
"""
from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, NoReturn, Protocol, runtime_checkable

from ..errors import (
    CheckpointNotFoundError,
    CorruptSafetensorsError,
    NonFiniteWeightsError,
    TensorNotFoundError,
    UnsafeCheckpointError,
    UnsupportedDtypeError,
)
from ..numeric import FLOAT32, all_finite, read_dtype

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 100_000_000  # same cap as the safetensors library: a larger "header" is garbage
SINGLE_FILES = ("model.safetensors", "adapter_model.safetensors")
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
REDOWNLOAD = "re-download the file (or re-save it with safetensors.torch.save_file)"

# safetensors dtype string -> bits per element. Sub-byte kinds (F4, F6) are packed.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
    "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
# Native torch dtype where this torch build has one (fp8 and unsigned types depend on version).
_TORCH_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32",
    "U32": "uint32", "I64": "int64", "U64": "uint64", "F16": "float16", "BF16": "bfloat16",
    "F32": "float32", "F64": "float64", "C64": "complex64", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
}


def torch_dtype_of(code: str) -> torch.dtype | None:
    """The torch dtype of a safetensors dtype code, None where this torch build has none (fp8 and
    unsigned types depend on the version). A function, not a table: importing this module (the
    driver plans from headers alone) does not import torch."""
    import torch
    name = _TORCH_NAMES.get(code)
    return getattr(torch, name, None) if name else None
# Only these may be upcast to a float dtype: the math never sees quantised or integer weights.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str                # safetensors dtype string: "F32", "BF16", ...
    shape: tuple[int, ...]
    file: str                 # file name inside the checkpoint (shard)
    start: int                # absolute byte offsets of the data inside that file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    file: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    header_bytes: int = 0     # 8 + N: what it cost to read


@runtime_checkable
class FileSource(Protocol):
    """Where checkpoint files live. Filenames are relative, '/'-separated."""

    name: str                                     # for error messages (path or repo@rev)

    def exists(self, filename: str) -> bool: ...
    def size(self, filename: str) -> int: ...
    def read_range(self, filename: str, start: int, end: int) -> bytes | bytearray: ...
    def read_text(self, filename: str) -> str: ...  # small JSON files


def check_relative_name(filename: str, source: str) -> str:
    """Refuse names that could escape the checkpoint root (index files come from strangers)."""
    p = PurePosixPath(filename)
    if (not filename or "\\" in filename or "\0" in filename or p.is_absolute()
            or ".." in p.parts or filename.startswith("~")):
        raise UnsafeCheckpointError(
            f"refusing file name {filename!r}: checkpoint files must be relative names inside "
            "the checkpoint; fix or remove the index/location that points outside it",
            file=f"{source}/{filename}")
    return filename


class LocalFileSource:
    """A local directory. Reads exactly [start, end) with seek + readinto; never whole files."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        self.name = str(self.root)

    def path(self, filename: str) -> Path:
        check_relative_name(filename, self.name)
        path = self.root / filename
        if not path.resolve().is_relative_to(self.root):  # a symlink pointing elsewhere
            raise UnsafeCheckpointError(
                f"refusing {filename!r}: it resolves outside the checkpoint directory "
                "(symlink?); copy the real file into the checkpoint", file=str(path))
        return path

    def exists(self, filename: str) -> bool:
        return self.path(filename).is_file()

    def size(self, filename: str) -> int:
        path = self.path(filename)
        if not path.is_file():
            raise CheckpointNotFoundError(f"no such file: {path}; check the path", file=str(path))
        return path.stat().st_size

    def read_range(self, filename: str, start: int, end: int) -> bytearray:
        path = self.path(filename)
        buf = bytearray(end - start)  # writable, so torch.frombuffer can share it without a copy
        view, done = memoryview(buf), 0
        with open(path, "rb", buffering=0) as f:
            f.seek(start)
            while done < len(buf):  # raw reads may return short
                n = f.readinto(view[done:])
                if not n:
                    raise CorruptSafetensorsError(
                        f"file ended at byte {start + done}, expected data up to {end}: "
                        f"truncated; {REDOWNLOAD}", file=str(path))
                done += n
        return buf

    def read_text(self, filename: str) -> str:
        return self.path(filename).read_text(encoding="utf-8")


SINGLE_FILE_SUFFIXES = (".safetensors", ".gguf")


class SingleFileSource(LocalFileSource):
    """One weight file given on its own (a single-file base such as Flux's flux1-dev.safetensors or
    a .gguf, or a kohya LoRA file) seen as a folder that holds only it: its neighbours are not
    part of the artifact."""

    def __init__(self, path: str | os.PathLike) -> None:
        p = Path(path)
        super().__init__(p.parent)
        self.filename = p.name
        self.name = str(self.root / self.filename)

    def path(self, filename: str) -> Path:
        if filename == self.filename:  # the file the user named: a symlink to it is followed (the HF
            return self.root / filename  # cache's snapshots/<sha>/x.safetensors -> blobs/<hash>)
        return super().path(filename)

    def exists(self, filename: str) -> bool:
        return filename == self.filename and super().exists(filename)

    def files(self) -> list[str]:
        """The artifact's root listing (image_lora_file reads it, as it reads a Hub repo's)."""
        return [self.filename]


def _corrupt(what: str, file: str, tensor: str | None = None) -> CorruptSafetensorsError:
    return CorruptSafetensorsError(f"corrupt safetensors file: {what}; {REDOWNLOAD}",
                                   file=file, tensor=tensor)


def _is_uint(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """json.loads keeps the last duplicate silently; two tensors under one name is corruption."""
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(repr(key))
        out[key] = value
    return out


def read_header(source: FileSource, filename: str) -> SafetensorsHeader:
    """Read and strictly validate one safetensors header (2 small range reads)."""
    where = f"{source.name}/{filename}"
    size = source.size(filename)
    if size < 8:
        raise _corrupt(f"only {size} bytes, shorter than the 8-byte header length", where)
    n = int.from_bytes(source.read_range(filename, 0, 8), "little")
    if n > MAX_HEADER_BYTES:
        raise _corrupt(f"header length {n} exceeds the {MAX_HEADER_BYTES} byte cap", where)
    if 8 + n > size:
        raise _corrupt(f"header length {n} is larger than the file ({size} bytes)", where)
    try:
        raw = json.loads(bytes(source.read_range(filename, 8, 8 + n)).decode("utf-8"),
                         object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(f"header is not valid UTF-8 JSON ({e})", where) from None
    except RecursionError:  # e.g. "[[[[...": nesting no safetensors header has
        raise _corrupt("header JSON is nested too deeply", where) from None
    except _DuplicateKey as e:
        raise _corrupt(f"duplicate key {e} in header", where) from None
    if not isinstance(raw, dict):
        raise _corrupt(f"header is a JSON {type(raw).__name__}, not an object", where)
    metadata = raw.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _corrupt("__metadata__ must map strings to strings", where)
    tensors = {name: _tensor_info(name, entry, filename, where, 8 + n, size)
               for name, entry in raw.items()}
    _check_no_overlap(tensors, where)
    return SafetensorsHeader(filename, tensors, metadata, 8 + n)


def _tensor_info(name: str, entry: object, filename: str, where: str, data_start: int,
                 size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _corrupt("header entry is not an object", where, name)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise _corrupt(f"unknown dtype {dtype!r}", where, name)
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise _corrupt(f"shape {shape!r} is not a list of non-negative integers", where, name)
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_uint, offsets))
            or offsets[0] > offsets[1]):
        raise _corrupt(f"data_offsets {offsets!r} are not [begin, end] with begin <= end",
                       where, name)
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
        raise _corrupt(f"{dtype} x {shape} needs {bits / 8:g} bytes but data_offsets "
                       f"{offsets} span {offsets[1] - offsets[0]}", where, name)
    start, end = data_start + offsets[0], data_start + offsets[1]
    if end > size:
        raise _corrupt(f"data ends at byte {end}, past the end of the file ({size} bytes)",
                       where, name)
    return TensorInfo(name, dtype, tuple(shape), filename, start, end)


def _check_no_overlap(tensors: dict[str, TensorInfo], where: str) -> None:
    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
    for (_, prev_end, prev), (start, _, name) in pairwise(spans):
        if start < prev_end:
            raise _corrupt(f"data of {name!r} overlaps {prev!r}", where, name)


class Checkpoint:
    """One checkpoint (single file or sharded). Headers are read on first need and cached."""

    def __init__(self, source: FileSource, files: list[str],
                 weight_map: dict[str, str] | None = None) -> None:
        self.source = source
        self.files = files                      # safetensors files, in index/shard order
        self.weight_map = weight_map            # key -> shard, when sharded
        self.bytes_read = 0                     # tensor data bytes read by get()
        self.header_bytes_read = 0              # safetensors header bytes read
        self._headers: dict[str, SafetensorsHeader] = {}

    @classmethod
    def open(cls, location: str | os.PathLike | FileSource,
             filename: str | None = None) -> Checkpoint:
        """A directory or FileSource (model.safetensors, the sharded index, or
        adapter_model.safetensors; `filename` picks one explicitly), or a .safetensors path."""
        if isinstance(location, FileSource):
            if filename is None and isinstance(location, SingleFileSource):
                filename = location.filename
            return cls._from_source(location, filename)
        path = Path(location)
        if path.is_file():
            return cls._from_source(LocalFileSource(path.parent), path.name)
        if not path.is_dir():
            raise CheckpointNotFoundError(
                f"no checkpoint at {path}: neither a directory nor a file; check the path",
                file=str(path))
        return cls._from_source(LocalFileSource(path), filename)

    @classmethod
    def _from_source(cls, source: FileSource, filename: str | None) -> Checkpoint:
        name = filename or next((f for f in (SINGLE_FILES[0], INDEX_FILE, SINGLE_FILES[1])
                                 if source.exists(f)), None)
        if name is None and filename is None:  # a diffusers pipeline: one checkpoint per component
            from .components import is_pipeline, open_components

            if is_pipeline(source):
                return open_components(source, cls.open)  # type: ignore[return-value]  # same reading interface
        if name is None or name.endswith(PICKLE_SUFFIXES):
            _refuse_pickles(source, name)
        if not source.exists(name):
            raise CheckpointNotFoundError(f"{name!r} not found in {source.name}; check the "
                                          "file name", file=f"{source.name}/{name}")
        if name.endswith(".index.json"):
            return cls._from_index(source, name)
        return cls(source, [name])

    @classmethod
    def _from_index(cls, source: FileSource, index_file: str) -> Checkpoint:
        where = f"{source.name}/{index_file}"
        try:
            weight_map = json.loads(source.read_text(index_file)).get("weight_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, RecursionError) as e:
            raise _corrupt(f"index is not a JSON object ({type(e).__name__}: {e})", where) from None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise _corrupt("index has no weight_map of tensor name -> shard file", where)
        base = str(PurePosixPath(index_file).parent)  # shards sit next to their index
        weight_map = {k: check_relative_name(v, source.name) for k, v in weight_map.items()}
        if base != ".":
            weight_map = {k: f"{base}/{v}" for k, v in weight_map.items()}
        return cls(source, list(dict.fromkeys(weight_map.values())), weight_map)

    def header(self, filename: str) -> SafetensorsHeader:
        if filename not in self._headers:
            head = read_header(self.source, filename)
            self.header_bytes_read += head.header_bytes
            self._headers[filename] = head
        return self._headers[filename]

    def keys(self) -> list[str]:
        """All tensor names; for a sharded checkpoint from the index alone (no shard read)."""
        if self.weight_map is not None:
            return list(self.weight_map)
        return list(self.header(self.files[0]).tensors)

    def __contains__(self, key: str) -> bool:
        if self.weight_map is not None:
            return key in self.weight_map
        return key in self.header(self.files[0]).tensors

    def info(self, key: str) -> TensorInfo:
        if key not in self:
            raise TensorNotFoundError(f"tensor {key!r} is not in this checkpoint; check the "
                                      "key (see Checkpoint.keys())", file=self.source.name,
                                      tensor=key)
        shard = self.weight_map[key] if self.weight_map is not None else self.files[0]
        info = self.header(shard).tensors.get(key)
        if info is None:
            raise _corrupt(f"the index maps {key!r} to {shard} but that shard lacks it",
                           f"{self.source.name}/{shard}", key)
        return info

    def quantization_of(self, key: str) -> str:
        """How tensor `key` was dequantised on read ("" here: stored as is; io/quantized.py)."""
        return ""

    def get(self, key: str, dtype: torch.dtype | None = FLOAT32) -> torch.Tensor:
        """Read only this tensor's bytes (float32 by default). `dtype=None` returns the stored
        (native) dtype; a float dtype upcasts F16/BF16/F32/F64 and refuses integer, fp8 or packed
        weights."""
        import torch
        dtype = read_dtype(dtype)
        info = self.info(key)
        where = f"{self.source.name}/{info.file}"
        native = torch_dtype_of(info.dtype)
        if native is None or (dtype is not None and dtype != native and not (
                dtype.is_floating_point and info.dtype in FLOAT_DTYPES)):
            want = "its native dtype" if dtype is None else str(dtype)
            raise UnsupportedDtypeError(
                f"cannot read {info.dtype} tensor {key!r} as {want}: only F16/BF16/F32/F64 "
                "weights are analysed; dequantise the checkpoint first, or pass dtype=None "
                "to read integer tensors natively", file=where, tensor=key)
        tensor = self._read(info, native)
        if dtype is not None:
            tensor = tensor.to(dtype)
        if tensor.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            _check_finite(tensor, key, where)
        return tensor

    def scalar(self, key: str) -> float:
        """The first element of a float tensor (a kohya `alpha`) as a Python float, decoded from its
        bytes alone: planning reads such scalars, and the driver plans without importing torch.
        The checks of `get` apply: float dtypes only, NaN/Inf refused (file and tensor named)."""
        info = self.info(key)
        where = f"{self.source.name}/{info.file}"
        width = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}.get(info.dtype)
        if width is None:
            raise UnsupportedDtypeError(f"cannot read {info.dtype} tensor {key!r} as a float scalar: "
                                        "expected F16/BF16/F32/F64", file=where, tensor=key)
        if info.nbytes < width:
            raise _corrupt(f"holds {info.nbytes} bytes, not one {info.dtype} value", where, key)
        data = bytes(self.source.read_range(info.file, info.start, info.start + width))
        if len(data) != width:
            raise _corrupt(f"read {len(data)} bytes, expected {width}", where, key)
        if info.dtype == "BF16":   # the top half of a float32
            value = struct.unpack("<f", b"\0\0" + data)[0]
        else:
            value = struct.unpack({"F64": "<d", "F32": "<f", "F16": "<e"}[info.dtype], data)[0]
        if not math.isfinite(value):
            raise NonFiniteWeightsError(
                f"tensor {key!r} holds {value} (as {info.dtype}); the weights are broken (diverged "
                "training or a bad conversion): exclude this model or fix the checkpoint",
                file=where, tensor=key, nan=int(math.isnan(value)), inf=int(math.isinf(value)))
        return float(value)

    def _read(self, info: TensorInfo, native: torch.dtype) -> torch.Tensor:
        import torch
        if info.nbytes == 0:  # frombuffer refuses empty buffers
            return torch.empty(info.shape, dtype=native)
        data = self.source.read_range(info.file, info.start, info.end)
        if len(data) != info.nbytes:
            raise _corrupt(f"read {len(data)} bytes, expected {info.nbytes}",
                           f"{self.source.name}/{info.file}", info.name)
        self.bytes_read += info.nbytes
        buf = data if isinstance(data, bytearray) else bytearray(data)
        tensor = torch.frombuffer(buf, dtype=native).reshape(info.shape)
        if sys.byteorder == "big":  # safetensors is little-endian on disk
            tensor = torch.from_numpy(tensor.numpy().byteswap())
        return tensor


def _check_finite(tensor: torch.Tensor, key: str, where: str) -> None:
    import torch
    if all_finite(tensor):
        return
    finite = torch.isfinite(tensor)      # only on the failure path: count what is broken
    n_nan = int(torch.isnan(tensor).sum())
    n_inf = int((~finite).sum()) - n_nan
    raise NonFiniteWeightsError(
        f"tensor {key!r} has {n_nan} NaN and {n_inf} Inf values (as {tensor.dtype}); the "
        "weights are broken (diverged training or a bad conversion): exclude this model or "
        "fix the checkpoint", file=where, tensor=key, nan=n_nan, inf=n_inf)


def _refuse_pickles(source: FileSource, name: str | None) -> NoReturn:
    """Never unpickle: a pickle runs arbitrary code on load. Refuse without opening it."""
    found = [name] if name else [f for f in PICKLE_FILES if source.exists(f)]
    if found:
        raise UnsafeCheckpointError(
            f"only pickle weights ({', '.join(found)}) found: zoospectra never unpickles "
            "untrusted files; provide safetensors weights (e.g. convert with "
            "safetensors.torch.save_file, or use the repo's .safetensors revision)",
            file=f"{source.name}/{found[0]}")
    raise CheckpointNotFoundError(
        f"no model.safetensors, {INDEX_FILE} or adapter_model.safetensors in {source.name}; "
        "check that this is a model or adapter directory", file=source.name)
