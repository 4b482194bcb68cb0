"""The results root: a Parquet tree with atomic per-unit commits, manifests and skip/resume.

Layout under the root (the contract for SQL users; schemas/views.sql reads exactly these globs):

    units/<unit_id>/<table>.parquet   matrices, vectors, spectra, similarity, pairs of one unit
    units/<unit_id>/_done.json        (model_uid, tensor) pairs the unit completed, row counts
    units/<unit_id>/_SUCCESS          written last: a unit exists for readers iff this exists
    models/<model_uid>.parquet        one file per analysed artifact (rewrites replace it)
    errors/<run_id>/<key>.parquet     failed units / members, one file per (run, key)
    catalog/<run_id>.parquet          Hub discovery results of one run
    runs/<run_id>.json, .parquet      run manifest: human-readable JSON and a RUNS row
    _staging/                         in-flight writes; never read, old entries cleaned

Every visible file appears by a rename of a fully written, fsynced file or directory. On a
local POSIX disk a unit directory is renamed into `units/` in one step: rename(2) refuses a
non-empty target, so when two runs race on one unit exactly one copy lands and the loser's
commit returns False. Object stores and other fsspec filesystems have no atomic directory
rename: there each file is published whole (a PUT is atomic) and `_SUCCESS` is written last;
readers (done_units(), the DuckDB views) only see units whose `_SUCCESS` exists. Two writers
racing on one unit there write the same file names, so they overwrite rather than duplicate.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..errors import InvalidNameError, ResultsError, SchemaMismatchError
from ..schemas.tables import SCHEMA_VERSION, TABLES, schema_for, to_table
from .index import DoneIndex, Generation, make_entry
from .integrity import (
    VERIFY_FILE,
    RootScan,
    UnitCheck,
    check_unit,
    file_record,
    quarantine,
    quarantine_generations,
    record_verification,
    scan,
    success_marker,
    verified_before,
)

UNIT_TABLES = ("matrices", "vectors", "spectra", "similarity", "pairs", "null_vectors")
RUN_STATUSES = ("running", "finished", "failed")
SUCCESS = "_SUCCESS"
DONE = "_done.json"
STAGING = "_staging"

# Globs (relative to the root) of every table; schemas/views.sql spells out the same ones.
TABLE_GLOBS: dict[str, str] = {
    **{t: f"units/*/{t}.parquet" for t in UNIT_TABLES},
    "models": "models/*.parquet",
    "runs": "runs/*.parquet",
    "errors": "errors/*/*.parquet",
    "catalog": "catalog/*.parquet",
}

_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")


def check_name(name: str, what: str = "name") -> str:
    """`name` if it is a safe single path component, else InvalidNameError (no traversal)."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
        raise InvalidNameError(
            f"{what} {name!r} is not a safe file name: use 1-200 characters of [A-Za-z0-9._-], "
            "not starting with '.'", **{what.replace(" ", "_"): repr(name)}
        )
    return name


def model_file_name(model_uid: str) -> str:
    """File stem for a model_uid: the uid itself when safe, else a readable slug + hash."""
    if _SAFE_NAME.fullmatch(model_uid):
        return model_uid
    import hashlib

    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_uid).strip("._")[:80]
    return f"{slug or 'model'}-{hashlib.sha256(model_uid.encode()).hexdigest()[:16]}"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    # page checksums: a reader that verifies them (pq.read_table(page_checksum_verification=True),
    # `zoospectra verify` on units written before whole-file checksums) finds flipped bytes
    pq.write_table(table, sink, compression="zstd", write_page_checksum=True)
    return sink.getvalue().to_pybytes()


def _conform(name: str, table: pa.Table) -> pa.Table:
    """The table with exactly the declared schema (and its version metadata), or a typed error."""
    if name not in TABLES:
        raise SchemaMismatchError(f"unknown table {name!r}; known: {sorted(TABLES)}", table=name)
    schema = schema_for(name)
    if table.schema.names != schema.names:
        raise SchemaMismatchError(
            f"table {name!r} has columns {table.schema.names}, expected {schema.names}; "
            "build it with zoospectra.schemas.tables.to_table", table=name,
        )
    try:
        return table.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, ValueError) as err:
        # ValueError: nulls in a non-nullable column (from_pydict does not check them, cast does)
        raise SchemaMismatchError(f"table {name!r} does not fit its schema: {err}", table=name) from err


def _rows_table(name: str, rows: list[dict]) -> pa.Table:
    return _conform(name, to_table(name, rows))


# --- filesystems -------------------------------------------------------------------------------
class _Local:
    """A root on the local disk: fsync + rename(2) make every publish atomic."""

    local: Literal[True] = True   # Literal: `if fs.local:` tells the type checker which class

    def __init__(self, path: Path) -> None:
        self.path = path
        self.uri = str(path)

    def _abs(self, rel: str) -> Path:
        return self.path / rel

    def exists(self, rel: str) -> bool:
        return self._abs(rel).exists()

    def read(self, rel: str) -> bytes | None:
        try:
            return self._abs(rel).read_bytes()
        except FileNotFoundError:
            return None

    def list_names(self, rel: str) -> list[str]:
        try:
            return sorted(e.name for e in os.scandir(self._abs(rel)))
        except FileNotFoundError:
            return []

    def names(self, rel: str) -> list[str]:
        """Names in folder `rel`, unsorted (one scandir, no stat): the index's hot path."""
        try:
            with os.scandir(os.path.join(self.uri, rel)) as it:
                return [e.name for e in it]
        except FileNotFoundError:
            return []

    def has_match(self, pattern: str) -> bool:
        return next(self.path.glob(pattern), None) is not None

    def entries(self, rel: str) -> dict[str, int | None]:
        """Names in folder `rel` -> size in bytes (None for a sub-folder); {} if `rel` is absent."""
        out: dict[str, int | None] = {}
        try:
            for e in os.scandir(self._abs(rel)):
                out[e.name] = None if e.is_dir(follow_symlinks=False) else e.stat(follow_symlinks=False).st_size
        except (FileNotFoundError, NotADirectoryError):
            pass
        return out

    def is_dir(self, rel: str) -> bool:
        return self._abs(rel).is_dir()

    def move(self, rel: str, dest: str) -> None:
        """Rename a file or folder within the root (one step on a local disk); never replaces."""
        target = self._abs(dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            raise ResultsError(f"{target} exists; not replacing it", path=str(target))
        os.rename(self._abs(rel), target)
        _fsync_dir(target.parent)

    def delete(self, rel: str) -> None:
        """Remove one file (missing: nothing to do)."""
        self._abs(rel).unlink(missing_ok=True)

    def _staging_dir(self) -> Path:
        d = self.path / STAGING
        d.mkdir(parents=True, exist_ok=True)
        return d

    def put(self, rel: str, data: bytes) -> None:
        dest = self._abs(rel)
        tmp = self._staging_dir() / f"tmp-{uuid.uuid4().hex}"
        try:
            _write_synced(tmp, data)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dest)  # atomic; replaces an older version of the same file
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(dest.parent)

    def publish_dir(self, rel: str, files: Mapping[str, bytes], stem: str, success: bytes = b"") -> bool:
        dest = self._abs(rel)
        if (dest / SUCCESS).exists():
            return False
        staging = self._staging_dir() / f"{stem}.{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            for name, data in {**files, SUCCESS: success}.items():
                _write_synced(staging / name, data)
            _fsync_dir(staging)
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(staging, dest)  # one step; fails on a non-empty target
            except OSError as err:
                if (dest / SUCCESS).exists():  # another writer won the race
                    return False
                if err.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                    raise ResultsError(
                        f"{dest} exists but holds no committed unit ({SUCCESS} missing); "
                        "it was not written by zoospectra: move it away and rerun", path=str(dest),
                    ) from err
                raise
            _fsync_dir(dest.parent)
            return True
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone after a rename; junk otherwise

    def clean_staging(self, max_age_s: float) -> int:
        cutoff, n = time.time() - max_age_s, 0
        for entry in self.list_names(STAGING):
            path = self.path / STAGING / entry
            try:
                if path.lstat().st_mtime < cutoff:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
                    n += 1
            except FileNotFoundError:
                continue
        return n


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Persist a rename (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_PUBLISH_ATTEMPTS = 8  # rewrites of a unit whose racing writers interleaved (see _Remote.publish_dir)


class _Remote:
    """A root on a pyarrow filesystem (s3://, gs://, hdfs://) or any fsspec one (memory://).

    No atomic directory rename: files are published whole, `_SUCCESS` last (see module doc).
    """

    local: Literal[False] = False

    def __init__(self, fs: pafs.FileSystem, base: str, uri: str) -> None:
        self.fs, self.base, self.uri = fs, base.rstrip("/"), uri.rstrip("/")

    def _abs(self, rel: str) -> str:
        return f"{self.base}/{rel}"

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self._abs(rel)).type != pafs.FileType.NotFound

    def read(self, rel: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(self._abs(rel)) as f:
                return f.read()
        except (FileNotFoundError, OSError):
            if not self.exists(rel):
                return None
            raise

    def list_names(self, rel: str) -> list[str]:
        sel = pafs.FileSelector(self._abs(rel), allow_not_found=True)
        return sorted(i.base_name for i in self.fs.get_file_info(sel))

    def names(self, rel: str) -> list[str]:
        return self.list_names(rel)

    def has_match(self, pattern: str) -> bool:
        top, _, rest = pattern.partition("/")
        sel = pafs.FileSelector(self._abs(top), allow_not_found=True, recursive=True)
        regex = re.compile(re.escape(rest).replace(r"\*", "[^/]*") + "$")
        prefix = self._abs(top) + "/"
        return any(
            i.type == pafs.FileType.File and regex.match(i.path.removeprefix(prefix))
            for i in self.fs.get_file_info(sel)
        )

    def entries(self, rel: str) -> dict[str, int | None]:
        sel = pafs.FileSelector(self._abs(rel), allow_not_found=True)
        try:
            infos = self.fs.get_file_info(sel)
        except (NotADirectoryError, OSError):
            return {}
        return {i.base_name: (None if i.type == pafs.FileType.Directory else i.size) for i in infos}

    def is_dir(self, rel: str) -> bool:
        return self.fs.get_file_info(self._abs(rel)).type == pafs.FileType.Directory

    def move(self, rel: str, dest: str) -> None:
        """Move a file, or a folder file by file (object stores rename by copy + delete)."""
        if self.exists(dest):
            raise ResultsError(f"{self._abs(dest)} exists; not replacing it", path=self._abs(dest))
        if not self.is_dir(rel):
            self.fs.create_dir(self._abs(dest).rsplit("/", 1)[0], recursive=True)
            self.fs.move(self._abs(rel), self._abs(dest))
            return
        self.fs.create_dir(self._abs(dest), recursive=True)
        for name in self.entries(rel):
            self.move(f"{rel}/{name}", f"{dest}/{name}")
        self.fs.delete_dir(self._abs(rel))  # empty by now: only the folder itself goes

    def delete(self, rel: str) -> None:
        """Remove one file (missing: nothing to do)."""
        try:
            self.fs.delete_file(self._abs(rel))
        except FileNotFoundError:
            pass

    def tree(self, rel: str) -> dict[str, dict[str, int | None] | None]:
        """Each entry of folder `rel` -> {file: size} of its files (None for a plain file), from
        one recursive listing (object stores: a few LIST requests, not one per folder)."""
        sel = pafs.FileSelector(self._abs(rel), allow_not_found=True, recursive=True)
        prefix = self._abs(rel) + "/"
        out: dict[str, dict[str, int | None] | None] = {}
        for info in self.fs.get_file_info(sel):
            parts = info.path.removeprefix(prefix).split("/")
            if len(parts) == 1:
                if info.type == pafs.FileType.Directory:
                    out.setdefault(parts[0], {})
                else:
                    out[parts[0]] = None
            elif len(parts) == 2 and isinstance(out.setdefault(parts[0], {}), dict):
                folder = out[parts[0]]
                assert folder is not None
                folder[parts[1]] = None if info.type == pafs.FileType.Directory else info.size
            elif isinstance(out.setdefault(parts[0], {}), dict):
                folder = out[parts[0]]
                assert folder is not None
                folder.setdefault(parts[1], None)  # a nested folder
        return out

    def put(self, rel: str, data: bytes) -> None:
        tmp = self._abs(f"{STAGING}/tmp-{uuid.uuid4().hex}")
        self.fs.create_dir(self._abs(STAGING), recursive=True)
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        dest = self._abs(rel)
        self.fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
        self.fs.move(tmp, dest)

    def publish_dir(self, rel: str, files: Mapping[str, bytes], stem: str, success: bytes = b"") -> bool:
        """Files one by one, `_SUCCESS` last. False if the unit was committed before we began,
        or by another writer whose whole copy stands once we are done.

        Writers racing on one unit write the same names, so there are never two copies, but
        their files can interleave (A's matrices.parquet beside B's _done.json): a unit that
        `verify` and the views would call damaged. So a writer reads the unit back after its
        marker, and while the unit is neither its own files nor another writer's whole copy, it
        waits a random moment and writes its whole copy again. Each writer finishes its files
        before its marker, so the last one to write whole leaves a whole unit. True: our copy
        stood when we looked (a slower racer may still replace it with its own whole copy of
        the same rows, and then also returns True: one copy, never a mixed one).
        """
        marker = f"{rel}/{SUCCESS}"
        if self.exists(marker):
            return False
        for attempt in range(_PUBLISH_ATTEMPTS):
            for name, data in files.items():
                self.put(f"{rel}/{name}", data)
            if attempt == 0 and self.exists(marker) and self._whole(rel):
                return False  # another writer finished first, and our writes did not spoil it
            self.put(marker, success)
            if all(self.read(f"{rel}/{name}") == data for name, data in [*files.items(), (SUCCESS, success)]):
                return True
            if self._whole(rel):
                return False  # another writer's whole copy replaced ours
            time.sleep(random.uniform(0.05, 0.5) * (attempt + 1))
        raise ResultsError(f"{self._abs(rel)}: writers kept interleaving their files for "
                           f"{_PUBLISH_ATTEMPTS} attempts; rerun to commit it", path=self._abs(rel))

    def _whole(self, rel: str) -> bool:
        """Whether units/<unit> is one writer's complete copy: marker, manifest and every file's
        checksum agree (integrity.check_unit in full)."""
        return check_unit(self, rel.rsplit("/", 1)[-1], None, full=True).ok

    def clean_staging(self, max_age_s: float) -> int:
        sel = pafs.FileSelector(self._abs(STAGING), allow_not_found=True)
        cutoff, n = time.time() - max_age_s, 0
        for info in self.fs.get_file_info(sel):
            mtime = info.mtime.timestamp() if info.mtime else 0.0  # unknown age: treat as old
            if mtime < cutoff:
                if info.type == pafs.FileType.Directory:
                    self.fs.delete_dir(info.path)
                else:
                    self.fs.delete_file(info.path)
                n += 1
        return n


def open_root(root: str | os.PathLike) -> _Local | _Remote:
    """A local path or `file://` URI, a pyarrow filesystem URI, or any fsspec URI."""
    text = os.fspath(root)
    if "://" not in text:
        return _Local(Path(text).expanduser().absolute())
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        try:
            from fsspec.core import url_to_fs
            from pyarrow.fs import FSSpecHandler, PyFileSystem
        except ImportError as err:
            raise ResultsError(
                f"results root {text!r} needs fsspec (pip install fsspec)", root=text
            ) from err
        ffs, path = url_to_fs(text)
        fs = PyFileSystem(FSSpecHandler(ffs))
    if isinstance(fs, pafs.LocalFileSystem):
        return _Local(Path(path).absolute())
    return _Remote(fs, path, text)


# --- the store -----------------------------------------------------------------------------------
class ResultsStore:
    """Writes and lists one results root. Cheap to construct (no I/O): one per task is fine."""

    def __init__(self, root: str | os.PathLike) -> None:
        self._fs = open_root(root)
        self._ok_cache: dict[str, UnitCheck] = {}
        self._index = DoneIndex(self._fs)   # index.py: done pairs without reading every unit

    @property
    def uri(self) -> str:
        """The root as DuckDB reads it: an absolute local path, or the URI as given."""
        return self._fs.uri

    @property
    def is_local(self) -> bool:
        return self._fs.local

    def has_files(self, table: str) -> bool:
        """Whether any file of `table` exists (committed or not; views filter on _SUCCESS)."""
        return self._fs.has_match(TABLE_GLOBS[table])

    # units ------------------------------------------------------------------------------------
    def commit_unit(self, unit_id: str, tables: Mapping[str, pa.Table],
                    done: Sequence[tuple[str, str]]) -> bool:
        """Publish all tables of one unit at once. False if the unit was already committed.

        Empty tables are not written. `done` are the (model_uid, tensor) pairs the unit
        completed; done_pairs() returns them so that later plans skip them.
        """
        check_name(unit_id, "unit id")
        files: dict[str, bytes] = {}
        counts: dict[str, int] = {}
        for name, table in tables.items():
            if name not in UNIT_TABLES:
                raise SchemaMismatchError(
                    f"{name!r} is not a per-unit table; commit_unit takes {UNIT_TABLES} "
                    "(models, errors, runs and catalog have their own writers)", unit_id=unit_id, table=name,
                )
            table = _conform(name, table)
            counts[name] = table.num_rows
            if table.num_rows:
                files[f"{name}.parquet"] = _parquet_bytes(table)
        pairs = sorted({(str(m), str(t)) for m, t in done})
        manifest = {
            "unit_id": unit_id, "schema_version": SCHEMA_VERSION, "committed_at": _now().isoformat(),
            "run_ids": sorted(_run_ids(tables.values())), "rows": counts,
            "done": [list(p) for p in pairs], "host": socket.gethostname(), "pid": os.getpid(),
            # size + sha256 of each file: what `verify` checks (integrity.py)
            "files": {name: file_record(data) for name, data in sorted(files.items())},
        }
        files[DONE] = json.dumps(manifest, indent=1).encode()
        success = success_marker(files[DONE])
        if unit_id in self._index.compacted_units():
            return False  # committed before, and its rows now live in a compacted file
        # the entry first: a committed unit always has one; one whose unit never lands names a
        # fingerprint no unit has and counts for nothing (index.py)
        entry = self._index.record(make_entry(unit_id, files[DONE], success, files, pairs))
        try:
            landed = self._fs.publish_dir(f"units/{unit_id}", files, stem=unit_id, success=success)
        except BaseException:
            self._index.forget(entry)  # nothing landed (a killed process leaves it: harmless)
            raise
        if not landed:
            self._index.forget(entry)  # another writer's commit of this unit won
        return landed

    def is_done(self, unit_id: str) -> bool:
        """Whether units/<unit_id> holds a commit marker (damaged or not: a commit there is refused
        until a rerun's repair() has moved a damaged unit aside), or a compacted file its rows."""
        return (self._fs.exists(f"units/{check_name(unit_id, 'unit id')}/{SUCCESS}")
                or unit_id in self._index.compacted_units())

    def claimed_pairs(self, pairs: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """Of `pairs`, those a committed unit holds now: the commit path's duplicate check, at the
        cost of these pairs and of the entries written since this store last looked (index.py)."""
        return self._index.claimed(list(pairs))

    def generations(self) -> dict[str, Generation]:
        """The live compaction generations (compact.py): id -> its manifest and units."""
        return self._index.generations()

    def scan(self, full: bool = False) -> RootScan:
        """Check every entry of units/ (integrity.py): cheap by default, checksums with full.
        Folders of compacted units are leftovers (state "compacted"), never read."""
        result = scan(self._fs, full=full, known=self._ok_cache, compacted=self._index.compacted_units())
        self._ok_cache = result.ok  # committed units never change in place: skip them next time
        return result

    def committed(self) -> dict[str, UnitCheck]:
        """The loose units that pass the cheap checks (and that the last verify did not find
        damaged): with the generations' files, exactly what the SQL views read."""
        return self.scan().ok

    def done_units(self) -> set[str]:
        """Ids of every committed, undamaged unit, loose or compacted (from the done index)."""
        return set(self._index.load().units)

    def done_pairs(self) -> set[tuple[str, str]]:
        """(model_uid, tensor) pairs of every committed, undamaged unit, across runs: read from
        the done index, each loose unit checked by its folder's listing (index.py)."""
        return self._index.load().pairs

    def verify(self, *, repair: bool = False, rebuild_index: bool = False, incremental: bool = False) -> dict:
        """Full check of every unit (sizes, checksums, row counts, ids); with `repair`, move each
        damaged unit and stray entry to quarantine/ so the next plan recomputes it. Records the
        result in _verify.json and returns it.

        `incremental`: units and compacted generations that the last verification found whole by
        checksum, and that still have the same fingerprint (their `_done.json`, their manifest),
        get the cheap checks only (marker, manifest, every file present at its recorded size)
        unless they were last hashed more than ZOOSPECTRA_REHASH_AFTER_DAYS (default 7) ago:
        what a run does before planning, so that its cost follows what is new, not the size of
        the root. A same-size change to a file already verified is then found by the next
        `zoospectra verify` (always in full) or the first run after that age, not by every run."""
        if self._fs.local and not self._fs.path.is_dir():  # never create a root by checking it
            raise ResultsError(f"no results root at {self.uri}: give the --out folder of an analyze "
                               "or crawl run", root=self.uri)
        from .index import check_generation, generation_fingerprint

        trusted_units, trusted_gens = verified_before(self._fs) if incremental else ({}, {})
        now = time.time()
        result = scan(self._fs, full=True, compacted=self._index.compacted_units(),
                      trusted={n: fp for n, (fp, _) in trusted_units.items()})
        moved = quarantine(self._fs, result.findings) if repair else []
        gens = self._index.generations()
        prints = {g: generation_fingerprint(gen) for g, gen in gens.items()}
        rehash = {g for g in gens if trusted_gens.get(g, ("", 0.0))[0] != prints[g]}
        damaged = {g: p for g, gen in gens.items() if (p := check_generation(self._fs, gen, full=g in rehash))}
        seen: dict[str, str] = {}
        for g, gen in gens.items():  # two compactions at once on an object store: a unit twice
            twice = sorted(u for u in gen.units if u in seen)
            if twice:
                damaged.setdefault(g, []).append(f"holds {len(twice)} units that compacted/{seen[twice[0]]} "
                                                 f"holds too (e.g. {twice[0]})")
            seen.update({u: g for u in gen.units if u not in seen})
        if repair and damaged:  # its units are then not done: the next plan recomputes them
            moved += quarantine_generations(self._fs, sorted(damaged))
        ok = {n: c for n, c in result.ok.items() if n not in {m["unit"] for m in moved}}
        index_problems = self._index.check(ok)
        if index_problems and (repair or rebuild_index):
            self._index.rebuild(sorted(ok))
            index_problems = self._index.check(ok)
        self._ok_cache = {}
        # what is known whole by checksum, and since when (the time of the last hashing)
        whole_units = {n: [c.fingerprint, now if c.hashed else trusted_units[n][1]]
                       for n, c in sorted(ok.items()) if c.fingerprint}
        whole_gens = {g: [prints[g], now if g in rehash else trusted_gens[g][1]] for g in gens if g not in damaged}
        extra = {"generations": {g: len(gen.units) for g, gen in gens.items() if g not in damaged},
                 "generations_damaged": {g: p for g, p in damaged.items() if not repair},
                 "units_compacted": sum(len(gen.units) for g, gen in gens.items() if g not in damaged),
                 "index_problems": index_problems,
                 "incremental": incremental,
                 "units_hashed": sum(c.hashed for c in result.checks),
                 "generations_hashed": len(rehash),
                 "verified_units": whole_units,
                 "verified_generations": whole_gens}
        return record_verification(self._fs, result, moved, extra)

    def repair(self) -> list[dict]:
        """What a rerun does first: verify (incrementally: checksums of what is new since the last
        verification) and move damage to quarantine/ (never delete). Returns the moves (none, and
        nothing written, for a root that does not exist yet)."""
        if not self._fs.exists("units") and not self._fs.exists("compacted"):
            return []
        return self.verify(repair=True, incremental=True)["quarantined"]

    def quarantine_known_damage(self) -> list[dict]:
        """Move units that fail the cheap checks (or that the last verify found damaged) to
        quarantine/: a plan built from done_pairs() already counts them as not done, and their
        commit would be refused while the damaged folder sits in units/."""
        findings = scan(self._fs, full=False).findings
        return quarantine(self._fs, findings) if findings else []

    # models, errors, catalog --------------------------------------------------------------------
    def write_models(self, rows: Iterable[dict]) -> None:
        """One file per model_uid; rewriting a model replaces its file (last row wins)."""
        latest: dict[str, dict] = {}
        for row in rows:
            latest[str(row["model_uid"])] = row
        for uid, row in latest.items():
            table = _rows_table("models", [{"created_at": _now(), **row}])
            self._fs.put(f"models/{model_file_name(uid)}.parquet", _parquet_bytes(table))

    def write_errors(self, run_id: str, key: str, rows: list[dict]) -> None:
        """errors/<run_id>/<key>.parquet; rewriting the same key replaces it. No rows: no file."""
        path = f"errors/{check_name(run_id, 'run id')}/{check_name(key, 'key')}.parquet"
        if rows:
            self._fs.put(path, _parquet_bytes(_rows_table("errors", [{"at": _now(), **r} for r in rows])))

    def read_rows(self, table: str, columns: list[str]) -> list[dict]:
        """`columns` of every file of a flat table (models, catalog): what a crawl reads to know
        which (repo, sha) are already analysed before it asks the Hub for anything."""
        folder = TABLE_GLOBS[table].split("/")[0]
        rows: list[dict] = []
        for name in self._fs.list_names(folder):
            raw = self._fs.read(f"{folder}/{name}") if name.endswith(".parquet") else None
            if raw:
                rows += pq.read_table(pa.BufferReader(raw), columns=columns).to_pylist()
        return rows

    def write_catalog(self, run_id: str, rows: list[dict]) -> None:
        """catalog/<run_id>.parquet (one file per run; a second call replaces the first)."""
        path = f"catalog/{check_name(run_id, 'run id')}.parquet"
        self._fs.put(path, _parquet_bytes(_rows_table("catalog", [{"run_id": run_id, **r} for r in rows])))

    # runs ---------------------------------------------------------------------------------------
    def start_run(self, run_id: str, config_json: str, command: str) -> None:
        """Write the manifest of a new run (status running); clean staging junk of dead runs."""
        check_name(run_id, "run id")
        try:
            config = json.loads(config_json) if config_json else None
        except json.JSONDecodeError as err:
            raise ResultsError(f"run config is not valid JSON: {err}", run_id=run_id) from err
        from .._version import __version__

        self.clean_staging()
        self._write_run({
            "run_id": run_id, "status": "running", "started_at": _now().isoformat(),
            "finished_at": None, "n_units": None, "n_done": None, "n_skipped": None, "n_failed": None,
            "command": command, "version": __version__, "host": socket.gethostname(),
            "schema_version": SCHEMA_VERSION, "config": config, "config_json": config_json,
            "mode": config.get("mode") if isinstance(config, dict) else None,
        })

    def finish_run(self, run_id: str, status: str, *, n_units: int | None = None,
                   n_done: int | None = None, n_skipped: int | None = None,
                   n_failed: int | None = None, extra: Mapping[str, Any] | None = None) -> None:
        """Close a run's manifest with its final status and counts (extra: more JSON fields)."""
        if status not in RUN_STATUSES:
            raise ResultsError(f"run status must be one of {RUN_STATUSES}, got {status!r}", run_id=run_id)
        manifest = self.run(run_id)
        if manifest is None:
            raise ResultsError(f"run {run_id!r} was never started in {self.uri}; call start_run first",
                               run_id=run_id)
        counts = {"n_units": n_units, "n_done": n_done, "n_skipped": n_skipped, "n_failed": n_failed}
        manifest.update({k: v for k, v in counts.items() if v is not None})
        manifest.update(dict(extra or {}), status=status, finished_at=_now().isoformat())
        self._write_run(manifest)

    def run(self, run_id: str) -> dict | None:
        raw = self._fs.read(f"runs/{check_name(run_id, 'run id')}.json")
        return json.loads(raw) if raw else None

    def runs(self) -> list[dict]:
        """Every run manifest, oldest first."""
        found = [self.run(n[: -len(".json")]) for n in self._fs.list_names("runs") if n.endswith(".json")]
        return sorted((r for r in found if r), key=lambda r: r.get("started_at") or "")

    def _write_run(self, manifest: dict) -> None:
        row = {k: manifest.get(k) for k in TABLES["runs"].names}
        for k in ("started_at", "finished_at"):
            stamp = row[k]
            row[k] = datetime.fromisoformat(stamp) if stamp else None
        run_id = manifest["run_id"]
        # parquet first: the JSON (what runs() reads) never points at a missing row
        self._fs.put(f"runs/{run_id}.parquet", _parquet_bytes(_rows_table("runs", [row])))
        self._fs.put(f"runs/{run_id}.json", json.dumps(manifest, indent=2, default=str).encode())

    # housekeeping -------------------------------------------------------------------------------
    def clean_staging(self, max_age_hours: float = 24.0) -> int:
        """Delete staging leftovers of crashed writers older than `max_age_hours`; returns count.

        Younger entries may belong to a live writer and are left alone; readers ignore them.
        """
        return self._fs.clean_staging(max_age_hours * 3600.0)

    def status(self) -> dict:
        """Summary for `zoospectra status`: runs, committed units and pairs, models, errors."""
        checked = self.scan()
        units = set(checked.ok) | set(self._index.compacted_units())
        pairs, runs = self.done_pairs(), self.runs()
        errors = self._error_keys()
        last = {k: v for k, v in runs[-1].items() if k not in ("config", "config_json")} if runs else None
        return {
            "root": self.uri,
            "runs": len(runs),
            "last_run": last,
            "units_done": len(units),
            "units_compacted": len(self._index.compacted_units()),
            # cheap checks (no checksums); `zoospectra verify` does the full pass
            "units_damaged": {c.name: c.problems for c in checked.of("damaged")},
            "units_stray": sorted(c.name for c in checked.of("stray")),
            "compaction_leftovers": len(checked.of("compacted")),
            "last_verify": self._last_verify(),
            "pairs_done": len(pairs),
            "models": sum(n.endswith(".parquet") for n in self._fs.list_names("models")),
            "errors": len(errors),
            "open_errors": sum(_is_open(e, units, pairs) for e in errors),
        }

    def _last_verify(self) -> dict | None:
        """When the last full verification ran and what it found (None: never)."""
        raw = self._fs.read(VERIFY_FILE)
        try:
            v = json.loads(raw) if raw else None
        except ValueError:
            return {"error": f"{VERIFY_FILE} is unreadable; run `zoospectra verify` again"}
        if not isinstance(v, dict):
            return None
        return {"at": v.get("at"), "healthy": v.get("healthy"), "units_checked": v.get("units_checked"),
                "damaged": len(v.get("damaged", [])), "stray": len(v.get("stray", [])),
                "quarantined": len(v.get("quarantined", [])), "incremental": bool(v.get("incremental"))}

    def _error_keys(self) -> list[tuple[str, str | None, str | None]]:
        """(unit_id, model_uid, tensor) of every error row."""
        keys: list[tuple[str, str | None, str | None]] = []
        cols = ["unit_id", "model_uid", "tensor"]
        for run_id in self._fs.list_names("errors"):
            for name in self._fs.list_names(f"errors/{run_id}"):
                raw = self._fs.read(f"errors/{run_id}/{name}") if name.endswith(".parquet") else None
                if raw:
                    t = pq.read_table(pa.BufferReader(raw), columns=cols)
                    keys += zip(*(t.column(c).to_pylist() for c in cols), strict=True)
        return keys


def _is_open(error: tuple[str, str | None, str | None], units: set[str],
             pairs: set[tuple[str, str]]) -> bool:
    """The rule of the open_errors view (schemas/views.sql), in Python."""
    unit_id, model_uid, tensor = error
    if model_uid is not None and tensor is not None:
        return (model_uid, tensor) not in pairs
    if model_uid is not None:
        return all(m != model_uid for m, _ in pairs)
    return unit_id not in units


def _run_ids(tables: Iterable[pa.Table]) -> set[str]:
    ids: set[str] = set()
    for t in tables:
        if "run_id" in t.schema.names and t.num_rows:
            ids.update(x for x in t.column("run_id").unique().to_pylist() if x is not None)
    return ids
