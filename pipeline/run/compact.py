"""Compaction: merge committed unit folders into a few large Parquet files, readers never stopped.

One compaction writes one generation:

    compacted/<gen_id>/<table>.parquet              (or bases/<key>/<table>.parquet, by base model)
    compacted/<gen_id>/_units.parquet               unit_id, fingerprint, model_uid, tensor
    compacted/<gen_id>/_manifest.json               every file's size, sha256, rows; every unit's rows
    compacted/<gen_id>/_SUCCESS                     written last: the record of _manifest.json

Steps, each leaving a valid root if the process dies right after it:
1. candidates: loose units that pass the cheap checks and are of the current schema version;
2. merge: each unit's files are read once, their bytes checked against the sha256 recorded at
   commit (a mismatch stops the compaction: run `zoospectra verify`), and appended; the files are
   written where no reader looks (local: `_staging/`, object stores: the generation folder,
   which counts only once its `_SUCCESS` exists);
3. publish: local, one rename of the whole folder; object stores, `_SUCCESS` last. From here the
   views read the generation, and the units' folders (still there) are skipped: no double count;
4. fold: the units' done-index entries are removed (their pairs are in `_units.parquet`);
5. prove and remove: the published files are read back (sha256 against the manifest; rows per
   unit_id against each unit's `_done.json`), and only then is each unit folder removed, and only
   if it still holds exactly the files its commit recorded (the tool's own, unchanged).

Removal waits `grace_s` after publishing, so a reader that listed the unit files just before
(a long-open `shell`) can finish: a later compaction removes those leftovers. A killed
compaction leaves staging junk (cleaned like any other) or a published generation whose units
are still in units/ (skipped by readers; the next compaction removes them).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ResultsError
from ..schemas.tables import SCHEMA_VERSION, schema_for
from .index import (
    COMPACTED,
    GEN_MANIFEST,
    INDEX,
    UNITS_FILE,
    Generation,
    check_generation,
    generation_marker,
)
from .integrity import DONE, SUCCESS, UnitCheck

ROW_GROUP = 131_072           # rows per row group of a compacted file
AUTO_THRESHOLD_FILES = 2_000  # crawls compact once loose units hold this many files
AUTO_GRACE_S = 3_600.0        # crawls: unit folders go one hour after their generation (readers)
FAILPOINT_ENV = "ZOOSPECTRA_FAILPOINT"   # tests: die (like kill -9) at a named step


def _failpoint(name: str) -> None:
    """Exit at once, as a killed process would, when the test environment names this step."""
    if os.environ.get(FAILPOINT_ENV) == name:
        os._exit(137)


@dataclass
class CompactResult:
    gen_id: str | None = None
    units: int = 0
    files_written: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    units_removed: int = 0
    leftovers_kept: list[str] = field(default_factory=list)   # unit folders not (yet) removed
    entries_folded: int = 0
    seconds: float = 0.0


def compact(root: Any, *, partition_by_base: bool = False, grace_s: float = 0.0,
            min_units: int = 1) -> CompactResult:
    """Merge the loose committed units of `root` into one new generation; remove the folders
    of units whose generation is at least `grace_s` old once proven to hold their rows."""
    from .store import ResultsStore

    t0 = time.perf_counter()
    store = ResultsStore(root)
    fs = store._fs
    if not fs.exists("units") and not fs.exists(COMPACTED):
        raise ResultsError(f"no results root at {store.uri}: give the --out folder of an analyze or "
                           "crawl run", root=store.uri)
    with _compaction_lock(store):
        out = _compact_locked(store, partition_by_base, grace_s, min_units)
    out.seconds = time.perf_counter() - t0
    return out


@contextmanager
def _compaction_lock(store: Any) -> Iterator[None]:
    """One compaction at a time per root (two would merge the same units twice): an flock on
    _index/.compact.lock for local roots. Object stores have no lock: run one compaction at a time
    there (crawls of one root run one after another); `verify` names overlapping generations."""
    if not store._fs.local:
        yield
        return
    import fcntl

    path = store._fs.path / INDEX / ".compact.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ResultsError(f"another compaction of {store.uri} is running; try again when it has "
                               "finished", root=store.uri) from None
        yield
    finally:
        os.close(fd)


def _compact_locked(store: Any, partition_by_base: bool, grace_s: float, min_units: int) -> CompactResult:
    out = CompactResult()
    _remove_leftovers(store, grace_s, out)   # what an earlier (killed, or graced) compaction left
    candidates = [c for c in store.committed().values()
                  if _not_newer((c.manifest or {}).get("schema_version"))]
    if len(candidates) >= max(min_units, 1):
        gen = _write_generation(store, sorted(candidates, key=lambda c: c.name), partition_by_base, out)
        out.entries_folded = store._index.fold(gen.units)
        _failpoint("compact:folded")
        if grace_s <= 0:
            _remove_units(store, gen, out)
    return out


def _version(text: object) -> tuple[int, ...] | None:
    try:
        return tuple(int(p) for p in str(text).split("."))
    except ValueError:
        return None


def _not_newer(version: object) -> bool:
    """Units of this schema version or an older one are compacted (older tables gain the new
    columns as nulls, as the views read them); a newer one, written by a newer zoospectra, is
    left loose: its columns would be lost."""
    got, ours = _version(version), _version(SCHEMA_VERSION)
    return got is not None and ours is not None and got <= ours


def _upgrade(table: pa.Table, name: str) -> pa.Table:
    """A unit table in the current schema: columns an older version lacks become nulls."""
    schema = schema_for(name)
    cols = [table.column(f.name).cast(f.type) if f.name in table.column_names
            else pa.nulls(table.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def loose_files(store: Any) -> int:
    """Files held by loose committed units (what compaction would merge)."""
    return sum(len(c.files) + 2 for c in store.committed().values())


def maybe_compact(root: Any, threshold_files: int | None = AUTO_THRESHOLD_FILES,
                  grace_s: float = AUTO_GRACE_S) -> CompactResult | None:
    """Compact when loose units hold at least `threshold_files` files (None or 0: never)."""
    from .store import ResultsStore

    if not threshold_files:
        return None
    store = ResultsStore(root)
    if loose_files(store) < threshold_files:
        return None
    return compact(root, grace_s=grace_s)


# --- writing a generation ------------------------------------------------------------------------
class _Sink:
    """Where a generation's files are written before it is published."""

    def __init__(self, fs: Any, gen_id: str) -> None:
        self.fs, self.gen_id = fs, gen_id
        self.rel = f"{COMPACTED}/{gen_id}"
        if fs.local:
            self.dir = fs.path / "_staging" / f"gen-{gen_id}"
            self.dir.mkdir(parents=True)

    def open(self, rel: str):
        if self.fs.local:
            path = self.dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            return open(path, "xb")
        dest = f"{self.fs.base}/{self.rel}/{rel}"
        self.fs.fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
        return self.fs.fs.open_output_stream(dest)

    def read(self, rel: str) -> bytes:
        if self.fs.local:
            return (self.dir / rel).read_bytes()
        data = self.fs.read(f"{self.rel}/{rel}")
        if data is None:
            raise ResultsError(f"{self.rel}/{rel} vanished while compacting", path=rel)
        return data

    def put(self, rel: str, data: bytes) -> None:
        with self.open(rel) as f:
            f.write(data)
            if self.fs.local:
                f.flush()
                os.fsync(f.fileno())

    def publish(self) -> None:
        """Local: fsync and rename the whole folder into compacted/ (one step). Object stores:
        the files are in place; `_SUCCESS`, written last by the caller, published them."""
        if not self.fs.local:
            return
        from .store import _fsync_dir

        for path in sorted(self.dir.rglob("*")):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            else:
                _fsync_dir(path)
        _fsync_dir(self.dir)
        dest = self.fs.path / COMPACTED / self.gen_id
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.dir, dest)
        _fsync_dir(dest.parent)


def _new_gen_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def _read_unit_table(fs: Any, check: UnitCheck, fname: str) -> pa.Table:
    """One file of a unit, its bytes checked against the sha256 recorded at commit."""
    rec = (check.manifest or {}).get("files", {}).get(fname, {})
    data = fs.read(f"units/{check.name}/{fname}")
    if data is None or "sha256" not in rec or hashlib.sha256(data).hexdigest() != rec["sha256"]:
        raise ResultsError(
            f"units/{check.name}/{fname} does not match the checksum recorded at commit (or has "
            "none); run `zoospectra verify` and rerun analyze/crawl to quarantine it, then compact",
            unit_id=check.name)
    return pq.read_table(pa.BufferReader(data))


def _write_generation(store: Any, units: list[UnitCheck], partition_by_base: bool,
                      out: CompactResult) -> Generation:
    from .store import UNIT_TABLES, _parquet_bytes, model_file_name

    fs = store._fs
    gen_id = _new_gen_id()
    sink = _Sink(fs, gen_id)
    writers: dict[str, tuple[Any, pq.ParquetWriter]] = {}
    buffers: dict[str, list[pa.Table]] = defaultdict(list)
    unit_info: dict[str, dict] = {}
    pair_rows: list[dict] = []

    def flush(rel: str, table: str) -> None:
        if not buffers[rel]:
            return
        if rel not in writers:
            f = sink.open(rel)
            writers[rel] = (f, pq.ParquetWriter(f, schema_for(table), compression="zstd",
                                                write_page_checksum=True))
        writers[rel][1].write_table(pa.concat_tables(buffers[rel]), row_group_size=ROW_GROUP)
        buffers[rel] = []

    for check in units:
        manifest = check.manifest or {}
        tables = {t: _read_unit_table(fs, check, f) for t in UNIT_TABLES if (f := check.table_file(t))}
        rows = {t: tables[t].num_rows if t in tables else 0 for t in UNIT_TABLES}
        recorded = {t: int(manifest.get("rows", {}).get(t, 0)) for t in UNIT_TABLES}
        if rows != recorded:
            raise ResultsError(f"units/{check.name} holds {rows} rows, {recorded} recorded at commit: "
                               "run `zoospectra verify`", unit_id=check.name)
        key = None
        if partition_by_base and "matrices" in tables:
            bases = tables["matrices"].column("base_uid").unique().to_pylist()
            key = model_file_name(str(bases[0])) if len(bases) == 1 else "mixed"
        unit_info[check.name] = {"fingerprint": check.fingerprint, "rows": rows, "partition": key}
        pair_rows += [{"unit_id": check.name, "fingerprint": check.fingerprint, "model_uid": str(m),
                       "tensor": str(t)} for m, t in manifest.get("done", [])]
        for t, table in tables.items():
            rel = f"bases/{key}/{t}.parquet" if key else f"{t}.parquet"
            buffers[rel].append(_upgrade(table, t))
            if sum(b.num_rows for b in buffers[rel]) >= ROW_GROUP:
                flush(rel, t)
    for rel in list(buffers):
        flush(rel, rel.rsplit("/", 1)[-1].removesuffix(".parquet"))
    for f, w in writers.values():
        w.close()
        if fs.local:
            f.flush()
            os.fsync(f.fileno())
        f.close()
    _failpoint("compact:written")

    files = {}
    for rel in sorted(writers):
        data = sink.read(rel)
        files[rel] = {"table": rel.rsplit("/", 1)[-1].removesuffix(".parquet"),
                      "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                      "rows": pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows}
        out.rows[files[rel]["table"]] = out.rows.get(files[rel]["table"], 0) + files[rel]["rows"]
    units_table = pa.Table.from_pylist(pair_rows, schema=pa.schema(
        [(c, pa.string()) for c in ("unit_id", "fingerprint", "model_uid", "tensor")]))
    units_raw = _parquet_bytes(units_table)
    sink.put(UNITS_FILE, units_raw)
    manifest = {
        "gen_id": gen_id, "created_at": datetime.now(timezone.utc).isoformat(),
        "schema_version": SCHEMA_VERSION, "partition_by": "base_uid" if partition_by_base else None,
        "files": files, "units": unit_info, "replaces": [],
        "units_file": {"size": len(units_raw), "sha256": hashlib.sha256(units_raw).hexdigest()},
    }
    manifest_raw = json.dumps(manifest, indent=1).encode()
    sink.put(GEN_MANIFEST, manifest_raw)
    _failpoint("compact:manifest")
    if fs.local:
        sink.put(SUCCESS, generation_marker(manifest_raw))
        sink.publish()
    else:
        sink.put(SUCCESS, generation_marker(manifest_raw))
    _failpoint("compact:published")
    out.gen_id, out.units, out.files_written = gen_id, len(units), len(files) + 3
    gen = store._index.generations().get(gen_id)
    if gen is None:
        raise ResultsError(f"generation {gen_id} did not appear in {store.uri}/{COMPACTED} after "
                           "publishing; run `zoospectra verify`", root=store.uri)
    return gen


# --- removing compacted unit folders ---------------------------------------------------------
def _remove_leftovers(store: Any, grace_s: float, out: CompactResult) -> None:
    """Remove folders of units that generations older than `grace_s` hold (proven first)."""
    now = datetime.now(timezone.utc)
    present = set(store._fs.entries("units"))
    for gen in store._index.generations().values():
        if not present & set(gen.units):
            continue
        created = datetime.fromisoformat(gen.manifest.get("created_at", now.isoformat()))
        if (now - created).total_seconds() >= grace_s:
            _remove_units(store, gen, out)
        else:
            out.leftovers_kept += sorted(present & set(gen.units))


def _remove_units(store: Any, gen: Generation, out: CompactResult) -> None:
    """Remove each unit folder of `gen` once the generation's files are proven to hold its rows
    and the folder still is exactly what the unit committed (nothing else is ever deleted)."""
    fs = store._fs
    present = set(fs.entries("units"))
    todo = sorted(present & set(gen.units))
    if not todo:
        return
    problems = check_generation(fs, gen, full=True)
    if problems:
        raise ResultsError(f"compacted/{gen.gen_id} does not hold what its manifest records "
                           f"({problems[0]}); unit folders kept. Run `zoospectra verify`",
                           root=store.uri)
    for i, unit_id in enumerate(todo):
        if _remove_unit(fs, unit_id, gen.units[unit_id]):
            out.units_removed += 1
            if i == 0:
                _failpoint("compact:removing")
        else:
            out.leftovers_kept.append(unit_id)


def _remove_unit(fs: Any, unit_id: str, fingerprint: str) -> bool:
    """Remove units/<unit_id> if it is the committed unit `fingerprint` names, holding only the
    files its manifest records with their recorded sizes; False (and untouched) otherwise."""
    from .integrity import check_unit

    rel = f"units/{unit_id}"
    check = check_unit(fs, unit_id, None, full=False)
    if not check.ok or check.fingerprint != fingerprint:
        return False
    if fs.local:  # one rename out of units/ (readers never see a half-removed unit), then delete
        trash = fs.path / "_staging" / f"rm-{unit_id}-{uuid.uuid4().hex[:8]}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.rename(fs.path / rel, trash)
        shutil.rmtree(trash)
        return True
    fs.delete(f"{rel}/{SUCCESS}")  # first: the folder stops counting as a unit at once
    for name in sorted(check.files):
        fs.delete(f"{rel}/{name}")
    fs.delete(f"{rel}/{DONE}")
    try:
        fs.fs.delete_dir(f"{fs.base}/{rel}")
    except (FileNotFoundError, OSError):
        pass  # object stores have no empty folders to remove
    return True
