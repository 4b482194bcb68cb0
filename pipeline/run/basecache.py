"""Durable, shared base SVDs: each (base model, revision, tensor, dtype) is decomposed once, ever;
for a quantised base the key also records how the tensor was dequantised (io/quantized.py).

A run's driver schedules one `prepare_base` per touched base tensor ahead of that tensor's units
(execute.py); it loads the stored decomposition, or computes and stores it. Units then load it
from here (or from their worker's one-entry memory) and never decompose W0 while the store has a
valid copy. Later runs, on any worker, reuse what earlier ones stored.

Layout under the cache root (default RESULTS/bases; `--base-cache PATH|URI` shares one across
results roots), through the same filesystem layer as the results store (local disk or fsspec /
pyarrow URIs):

    <key>.safetensors                 U [m, p], S [p], Vh [p, n] on the CPU in the analysis dtype;
                                      metadata: format, the key's fields, sha256 of the three
                                      tensors' bytes, sha256 of W0's bytes
    _damaged/<key>.<time>.safetensors entries that failed a check, moved aside for inspection

Entries are written whole by atomic rename (local) or a single PUT (object stores). safetensors
only: nothing here is ever unpickled. A truncated file, a bad checksum, another W0 behind the
same key (the base changed without a new revision) or a key mismatch is detected on load; the
entry is moved aside, never used, and the decomposition is recomputed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: a Ray driver never needs it
    import torch

    from ..config import AnalysisConfig
    from ..io.refs import ModelRef
    from ..spectral import BaseSVD

log = logging.getLogger(__name__)

FORMAT = "zoospectra-base-svd/1"   # bump when the stored content or its meaning changes
DAMAGED = "_damaged"
SUFFIX = ".safetensors"


def default_base_cache(results_root: str) -> str:
    """RESULTS/bases, for a local path or a URI alike."""
    text = os.fspath(results_root)
    return text.rstrip("/") + "/bases" if "://" in text else os.path.join(text, "bases")


@dataclass(frozen=True)
class BaseKey:
    """What identifies one decomposition. base_uid already pins (source, model id, revision)."""

    base_uid: str
    base_id: str
    revision: str
    tensor: str
    transpose: bool
    dtype: str                       # analysis dtype of the stored factors
    shape: tuple[int, int]           # [out, in] after any transpose
    dequant: str = ""                # how a quantised base tensor was dequantised ("" if stored as float)

    @staticmethod
    def of(base: ModelRef, tensor: str, transpose: bool, shape: tuple[int, int], dtype: str,
           dequant: str = "") -> BaseKey:
        return BaseKey(base.uid, base.model_id, base.revision, tensor, bool(transpose), dtype,
                       (int(shape[0]), int(shape[1])), dequant)

    def fields(self) -> dict:
        out = {"format": FORMAT, "base_uid": self.base_uid, "base_id": self.base_id,
               "revision": self.revision, "tensor": self.tensor, "transpose": self.transpose,
               "dtype": self.dtype, "shape": list(self.shape)}
        if self.dequant:  # only quantised bases carry it: keys (and entries) of float bases are unchanged
            out["dequant"] = self.dequant
        return out

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.fields(), sort_keys=True).encode()).hexdigest()

    @property
    def file_name(self) -> str:
        return self.digest[:40] + SUFFIX


class DamagedEntry(Exception):
    """A stored decomposition that must not be used (why in the message)."""


def tensor_digest(*tensors: torch.Tensor) -> str:
    """sha256 of the tensors' bytes (CPU, contiguous), in order."""
    import torch

    h = hashlib.sha256()
    for t in tensors:
        # ndarray is a buffer; numpy's stubs declare __buffer__ only for Python >= 3.12
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())  # type: ignore[arg-type]
    return h.hexdigest()


def encode(key: BaseKey, svd: BaseSVD, w0_sha256: str) -> bytes:
    from safetensors.torch import save

    tensors = {"U": svd.U.detach().cpu().contiguous(), "S": svd.S.detach().cpu().contiguous(),
               "Vh": svd.Vh.detach().cpu().contiguous()}
    meta = {"zoospectra.key": json.dumps(key.fields(), sort_keys=True),
            "zoospectra.sha256": tensor_digest(tensors["U"], tensors["S"], tensors["Vh"]),
            "zoospectra.w0_sha256": w0_sha256,
            "zoospectra.seconds": f"{svd.seconds:.6f}"}
    return save(tensors, metadata=meta)


def decode(raw: bytes, key: BaseKey, w0_sha256: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(U, S, Vh, seconds the decomposition took) after every check; DamagedEntry otherwise."""
    from safetensors.torch import load  # the format's own parser: no pickle

    meta = _metadata(raw)
    try:
        tensors = load(raw)
    except Exception as err:  # noqa: BLE001 - any parse failure (truncation, bad header) is damage
        raise DamagedEntry(f"unreadable safetensors ({type(err).__name__}: {err})") from None
    if meta.get("zoospectra.key") != json.dumps(key.fields(), sort_keys=True):
        raise DamagedEntry("stored key does not match the requested one")
    if set(tensors) != {"U", "S", "Vh"}:
        raise DamagedEntry(f"holds tensors {sorted(tensors)}, expected U, S, Vh")
    u, s, vh = tensors["U"], tensors["S"], tensors["Vh"]
    m, n = key.shape
    p = min(m, n)
    if tuple(u.shape) != (m, p) or tuple(s.shape) != (p,) or tuple(vh.shape) != (p, n):
        raise DamagedEntry(f"shapes U {tuple(u.shape)}, S {tuple(s.shape)}, Vh {tuple(vh.shape)} "
                           f"do not fit W0 {key.shape}")
    if str(s.dtype).removeprefix("torch.") != key.dtype:
        raise DamagedEntry(f"dtype {s.dtype}, expected {key.dtype}")
    if tensor_digest(u, s, vh) != meta.get("zoospectra.sha256"):
        raise DamagedEntry("checksum mismatch")
    if meta.get("zoospectra.w0_sha256") != w0_sha256:
        raise DamagedEntry("decomposes another W0 (the base changed under the same revision)")
    return u, s, vh, float(meta.get("zoospectra.seconds") or 0.0)


def _metadata(raw: bytes) -> dict:
    """The safetensors header's __metadata__, or DamagedEntry when the header is unreadable."""
    if len(raw) < 8:
        raise DamagedEntry(f"{len(raw)} bytes: truncated")
    n = int.from_bytes(raw[:8], "little")
    if n > len(raw) - 8:
        raise DamagedEntry("header runs past the end of the file: truncated")
    try:
        header = json.loads(raw[8 : 8 + n])
    except (ValueError, UnicodeDecodeError):
        raise DamagedEntry("header is not JSON") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise DamagedEntry("no zoospectra metadata")
    return meta


class BaseCache:
    """One cache root. Cheap to construct (no I/O)."""

    def __init__(self, uri: str) -> None:
        from .store import open_root

        self._fs = open_root(uri)
        self.uri = self._fs.uri

    def exists(self, key: BaseKey) -> bool:
        return self._fs.exists(key.file_name)

    def load(self, key: BaseKey, w0_sha256: str, device: torch.device) -> BaseSVD | None:
        """The stored decomposition on `device`, or None (absent, or damaged and moved aside)."""
        from ..spectral import BaseSVD

        try:
            raw = self._fs.read(key.file_name)
        except OSError as err:  # an unreadable cache costs reuse, not the analysis
            log.warning("base SVD cache %s: could not read %s (%s); recomputing", self.uri, key.file_name, err)
            return None
        if raw is None:
            return None
        try:
            u, s, vh, _ = decode(raw, key, w0_sha256)
        except DamagedEntry as why:
            aside = self.move_aside(key)
            log.warning("base SVD cache: %s for %s (%s) in %s: %s; moved to %s, recomputing",
                        key.file_name, key.tensor, key.base_id, self.uri, why, aside)
            return None
        return BaseSVD(U=u.to(device), S=s.to(device), Vh=vh.to(device), seconds=0.0)

    def store(self, key: BaseKey, svd: BaseSVD, w0_sha256: str) -> None:
        self._fs.put(key.file_name, encode(key, svd, w0_sha256))

    def move_aside(self, key: BaseKey) -> str:
        """Move a damaged entry under _damaged/ (kept, never used again); returns where."""
        dest = f"{DAMAGED}/{key.file_name.removesuffix(SUFFIX)}.{time.time_ns()}{SUFFIX}"
        fs = self._fs
        # store.py's filesystem classes have no move; reach their paths here (no store.py change)
        try:
            if fs.local:
                (fs.path / DAMAGED).mkdir(parents=True, exist_ok=True)
                os.replace(fs.path / key.file_name, fs.path / dest)
            else:
                fs.fs.create_dir(fs._abs(DAMAGED), recursive=True)
                fs.fs.move(fs._abs(key.file_name), fs._abs(dest))
        except FileNotFoundError:  # another worker moved it first
            pass
        return dest


# --- obtaining a base SVD: memory, store, or compute ---------------------------------------------
@dataclass(frozen=True)
class Obtained:
    w0: torch.Tensor
    svd: BaseSVD
    how: str                  # computed | stored (loaded from the cache) | memory (this worker)


_MEMORY: dict[tuple, Obtained] = {}   # one entry per worker process: bounded memory


def obtain(base: ModelRef, tensor: str, transpose: bool, cfg: AnalysisConfig, device: str,
           cache_uri: str, run_id: str = "") -> Obtained:
    """W0 [out, in] and its SVD: from this worker's last one, the store, or computed and stored.

    The planner emits the units of one tensor back to back, so a worker usually finds the next
    unit's base in memory; otherwise the store has it (prepare_base ran first). The memory and
    the opened checkpoint belong to one run: a process that runs again (a notebook, a test, the
    in-process executor) reads the base files and the store afresh, so a base replaced on disk
    or a store entry damaged in between is seen, never answered from the last run's memory."""
    from ..spectral import BaseSVD, base_svd
    from ..spectral.inputs import resolve_device

    mem_key = (run_id, base, tensor, bool(transpose), cfg.dtype, str(device), cache_uri)
    hit = _MEMORY.get(mem_key)
    if hit is not None:
        return Obtained(hit.w0, hit.svd, "memory")
    from ..io.components import as_matrix

    ckpt = open_checkpoint(base, run_id)
    w0 = as_matrix(ckpt.get(tensor))   # Conv2d kernels: [out, in*kh*kw]
    if transpose:
        w0 = w0.T.contiguous()
    key = BaseKey.of(base, tensor, transpose, (int(w0.shape[0]), int(w0.shape[1])), cfg.dtype,
                     ckpt.quantization_of(tensor))
    w0_sha = tensor_digest(w0)
    cache = BaseCache(cache_uri)
    svd = cache.load(key, w0_sha, resolve_device(device))
    how = "stored"
    if svd is None:
        svd = base_svd(w0, cfg, device, tensor=tensor)
        # the layout a load gives (row-major): LAPACK returns U column-major, and products with
        # the two layouts round differently, so a unit's rows would depend on where its base came from
        svd = BaseSVD(U=svd.U.contiguous(), S=svd.S.contiguous(), Vh=svd.Vh.contiguous(),
                      seconds=svd.seconds)
        try:
            cache.store(key, svd, w0_sha)
        except OSError as err:  # an unwritable cache costs reuse, not the analysis
            log.warning("base SVD cache %s: could not store %s (%s); later units recompute it",
                        cache.uri, key.tensor, err)
        how = "computed"
    _MEMORY.clear()
    _MEMORY[mem_key] = Obtained(w0, svd, how)
    return Obtained(w0, svd, how)


@lru_cache(maxsize=8)
def open_checkpoint(ref: ModelRef, run_id: str = ""):
    """The opened base checkpoint of `ref`, kept per process and run (headers parsed once per
    worker and run); a bitsandbytes or GGUF base is read dequantised (io/quantized.py)."""
    from ..io.quantized import open_base

    return open_base(ref.open_source())


@dataclass
class BaseOutcome:
    """What a prepare_base task did: computed, reused (a valid stored one), or failed."""

    tensor: str
    how: str                  # computed | reused | failed
    seconds: float = 0.0
    error: str = ""


def prepare_base(base: ModelRef, tensor: str, transpose: bool, cfg: AnalysisConfig,
                 device: str, cache_uri: str, run_id: str = "") -> BaseOutcome:
    """Make sure the store holds a valid decomposition of this tensor (run ahead of its units).

    A failure is reported, not raised: the units then meet the same problem and turn it into
    their own error rows."""
    from ..errors import ZoospectraError

    t0 = time.perf_counter()
    try:
        got = obtain(base, tensor, transpose, cfg, device, cache_uri, run_id)
    except (ZoospectraError, OSError) as err:
        return BaseOutcome(tensor, "failed", time.perf_counter() - t0, f"{type(err).__name__}: {err}")
    how = "computed" if got.how == "computed" else "reused"
    return BaseOutcome(tensor, how, time.perf_counter() - t0)
