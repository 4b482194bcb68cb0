"""Where an artifact lives and which exact version of it: the identity every row is keyed by."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointNotFoundError
from .identity import Source, artifact_uid

if TYPE_CHECKING:
    from .hub import HubOptions

_WEIGHT_SUFFIXES = (".safetensors", ".json", ".gguf")
_FULL_HASH_LIMIT = 256 << 20  # files up to this size are hashed whole; larger ones by header


@dataclass(frozen=True, order=True)
class ModelRef:
    """A pinned artifact: a local directory at a content hash, or a Hub repo at a commit sha."""

    model_id: str        # display id: Hub repo id, or the local name
    revision: str        # commit sha (hub) or content hash (local)
    location: str        # local absolute path, or the repo id for the hub
    source: Source = "local"
    # (hub layer) How to reach the Hub for this ref: endpoint, cache, timeouts, retries. Travels
    # with the ref to Ray workers so a crawl's options apply there too; token-free by design.
    # Not part of the identity (compare=False): repo@sha is the same artifact however it is read.
    hub_options: HubOptions | None = field(default=None, compare=False, repr=False)

    @property
    def uid(self) -> str:
        return artifact_uid(self.source, self.model_id, self.revision)

    def open_source(self):
        """The FileSource this artifact's files are read through (lazy byte ranges)."""
        if self.source == "hub":
            from .hub import HubFileSource

            return HubFileSource(self.location, self.revision, self.hub_options)
        from .checkpoint import SINGLE_FILE_SUFFIXES, LocalFileSource, SingleFileSource

        if self.location.endswith(SINGLE_FILE_SUFFIXES) and os.path.isfile(self.location):
            return SingleFileSource(self.location)   # one weight file given on its own (local_ref)
        return LocalFileSource(self.location)


def hub_ref(repo_id: str, sha: str, options: HubOptions | None = None, name: str | None = None) -> ModelRef:
    """A Hub repo pinned at commit `sha`, recorded as `name` (default: the repo id); `options`
    travel with it to the Ray workers that read it."""
    return ModelRef(model_id=name or repo_id, revision=sha, location=repo_id, source="hub",
                    hub_options=options)


def local_ref(path: str | os.PathLike, name: str | None = None) -> ModelRef:
    """Pin a local checkpoint/adapter directory, or one weight file, by content.

    Small files (adapters, configs) are hashed whole; large weight files by their safetensors
    header plus size, which identifies a checkpoint without reading gigabytes. A single
    .safetensors or .gguf file (a BFL / original-layout image base, a kohya LoRA file, a GGUF
    base) is an artifact on its own: its folder's other files are not part of it.
    """
    from .checkpoint import SINGLE_FILE_SUFFIXES

    given = Path(path).expanduser()
    p = given.resolve()
    single = p.is_file() and given.name.endswith(SINGLE_FILE_SUFFIXES)
    if single:  # keep the name given: a file in the HF cache is a symlink to a blob named by its hash
        p = given.parent.resolve() / given.name
    if not p.is_dir() and not single:
        what = "not a directory" if p.exists() else "no such directory or file"
        raise CheckpointNotFoundError(
            f"{what}: pass a checkpoint or adapter directory, or a single .safetensors / .gguf weight file",
            file=str(path))
    h = hashlib.sha256()
    for f in [p] if single else sorted(p.iterdir()):
        if not f.is_file() or not f.name.endswith(_WEIGHT_SUFFIXES):
            continue
        h.update(f.name.encode())
        size = f.stat().st_size
        h.update(str(size).encode())
        with open(f, "rb") as fh:
            if size <= _FULL_HASH_LIMIT:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            else:  # header + tail: changes whenever the layout or the last tensor changes
                # safetensors: its header; GGUF: the first 16 MB, where its metadata and tensor table are
                n = int.from_bytes(fh.read(8), "little") if f.suffix == ".safetensors" else (
                    16 << 20 if f.suffix == ".gguf" else 0)
                h.update(fh.read(min(n, 100 << 20)))
                fh.seek(max(0, size - (1 << 20)))
                h.update(fh.read())
    model_id = name or (p.stem if single else p.name)
    return ModelRef(model_id=model_id, revision=h.hexdigest()[:16], location=str(p))
