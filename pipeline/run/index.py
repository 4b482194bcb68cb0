"""The done index: which (model_uid, tensor) pairs a results root holds, without reading every unit.

Two kinds of record, both written only by zoospectra and both immutable once written:

- `_index/<unit_id>.<fp16>.json`, one per unit commit: the unit's done pairs, the sha256 of its
  `_done.json` (its fingerprint; fp16 is its first 16 hex digits) and the size of every file of
  its folder. Written whole just BEFORE the unit folder is published, so a committed unit always
  has its entry; an entry whose unit never landed (a writer killed in between, the loser of a
  race) names a fingerprint no committed unit has and counts for nothing. Names are
  content-addressed: two writers of one name write the same bytes, and removing a stale entry
  can never remove a live one.
- `compacted/<gen>/_units.parquet` of each committed compaction generation (compact.py): the
  units (and their pairs) whose rows that generation holds.

Loading (a plan, `done_pairs()`) reads the generations, lists `_index/` and reads the entries it
has not seen, and lists `units/` once (one directory listing per unit on a local disk, one
recursive listing on an object store): a unit counts when its folder matches the sizes its entry
recorded, which is the same cheap check integrity.py makes, without reading the unit's files. A
committed unit without an entry (a root written before the index) is checked the old way and its
entry written: the index rebuilds itself from the units.

A commit does not load: it lists `_index/` (names only) and `compacted/`, reads only the entries
it has not seen, and for each of its own pairs that some entry claims, reads that one unit's
`_SUCCESS` (it holds the fingerprint) to see whether the claim is real. Cost: its own pairs plus
the entries written since this process last looked, never a pass over all units.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .integrity import DONE, SUCCESS, RootFS, check_unit, flagged_units

INDEX = "_index"
COMPACTED = "compacted"
UNITS_FILE = "_units.parquet"   # per generation: unit_id, fingerprint, model_uid, tensor
SNAPSHOT = "_snapshot.json"     # entries a load read, in one file (rewritten, never trusted blindly)
SNAPSHOT_AFTER = 500            # a load that read this many entry files writes a snapshot
_ENTRY = re.compile(r"(?P<unit>[A-Za-z0-9_-][A-Za-z0-9._-]{0,199})\.(?P<fp>[0-9a-f]{16})\.json")

Pair = tuple[str, str]


def entry_name(unit_id: str, fingerprint: str) -> str:
    return f"{INDEX}/{unit_id}.{fingerprint[:16]}.json"


def make_entry(unit_id: str, done_raw: bytes, success: bytes, files: dict[str, bytes],
               pairs: list[Pair]) -> dict[str, Any]:
    """The index entry of a unit about to be committed (sizes of every file of its folder)."""
    sizes = {name: len(data) for name, data in files.items()}
    sizes[SUCCESS] = len(success)
    return {"unit_id": unit_id, "fingerprint": hashlib.sha256(done_raw).hexdigest(),
            "sizes": dict(sorted(sizes.items())), "done": [list(p) for p in pairs]}


def entry_from_unit(fs: RootFS, unit_id: str) -> dict[str, Any] | None:
    """Rebuild a unit's entry from its folder (None if it is not a committed unit)."""
    entries = fs.entries(f"units/{unit_id}")
    check = check_unit(fs, unit_id, None, full=False)
    if not check.ok or check.manifest is None:
        return None
    pairs = [(str(m), str(t)) for m, t in check.manifest.get("done", [])]
    return {"unit_id": unit_id, "fingerprint": check.fingerprint,
            "sizes": {k: v for k, v in sorted(entries.items()) if v is not None},
            "done": [list(p) for p in sorted(set(pairs))]}


def marker_fingerprint(success: bytes | None) -> str | None:
    """The fingerprint (sha256 of _done.json) a `_SUCCESS` marker records; None if unreadable."""
    try:
        return str(json.loads(success or b"")[DONE]["sha256"])
    except (ValueError, TypeError, KeyError):
        return None


def unit_fingerprint(fs: RootFS, unit_id: str) -> str | None:
    """The fingerprint of the unit committed in units/<unit_id> now (None: none is): what its
    marker records, or for a marker of before checksums (empty), the sha256 of its _done.json."""
    success = fs.read(f"units/{unit_id}/{SUCCESS}")
    if success is None:
        return None
    fp = marker_fingerprint(success)
    if fp is None and not success.strip():
        done = fs.read(f"units/{unit_id}/{DONE}")
        fp = hashlib.sha256(done).hexdigest() if done is not None else None
    return fp


@dataclass
class Generation:
    """A committed compaction generation: where its files are and which units it holds."""

    gen_id: str
    manifest: dict
    units: dict[str, str]                  # unit_id -> fingerprint
    pairs: dict[str, list[Pair]]           # unit_id -> its done pairs

    @property
    def pair_set(self) -> set[Pair]:
        if not hasattr(self, "_pair_set"):
            self._pair_set = {p for done in self.pairs.values() for p in done}
        return self._pair_set

    @property
    def replaces(self) -> list[str]:
        return list(self.manifest.get("replaces", []))


GEN_MANIFEST = "_manifest.json"


def generation_marker(manifest_raw: bytes) -> bytes:
    """A generation's `_SUCCESS`: size and sha256 of its `_manifest.json` (as a unit's marker
    records its `_done.json`)."""
    return json.dumps({"format": 1, GEN_MANIFEST: {"size": len(manifest_raw),
                                                   "sha256": hashlib.sha256(manifest_raw).hexdigest()}}).encode()


def read_generation(fs: RootFS, gen_id: str) -> Generation | None:
    """A generation if it is committed (`_SUCCESS` written last, matching its manifest), else None."""
    rel = f"{COMPACTED}/{gen_id}"
    success = fs.read(f"{rel}/{SUCCESS}")
    raw = fs.read(f"{rel}/{GEN_MANIFEST}") if success is not None else None
    if raw is None or success != generation_marker(raw):
        return None
    units_raw = fs.read(f"{rel}/{UNITS_FILE}")
    if units_raw is None:
        return None
    t = pq.read_table(pa.BufferReader(units_raw))
    units: dict[str, str] = {}
    pairs: dict[str, list[Pair]] = {}
    cols = [t.column(c).to_pylist() for c in ("unit_id", "fingerprint", "model_uid", "tensor")]
    for u, fp, m, ten in zip(*cols, strict=True):
        units[u] = fp
        pairs.setdefault(u, []).append((m, ten))
    return Generation(gen_id, json.loads(raw), units, pairs)


@dataclass
class Loaded:
    """What a load found: every unit that counts as done, and where it lives."""

    units: dict[str, str] = field(default_factory=dict)       # unit_id -> fingerprint
    pairs: set[Pair] = field(default_factory=set)
    compacted: dict[str, str] = field(default_factory=dict)   # unit_id -> generation id
    healed: list[str] = field(default_factory=list)           # entries written for unindexed units


class DoneIndex:
    """One root's index, cached per process: entries and generations are immutable once written,
    so each is read once."""

    def __init__(self, fs: Any) -> None:
        self._fs = fs
        self._entries: dict[str, dict] = {}           # entry file name -> entry
        self._claims: dict[Pair, set[tuple[str, str]]] = {}   # pair -> {(unit_id, fingerprint)}
        self._gens: dict[str, Generation] = {}
        self._dead_gens: set[str] = set()
        self._lock = threading.RLock()   # one store may serve several threads of a process
        self._compacted: dict[str, str] = {}
        self._compacted_key: tuple[str, ...] | None = None

    # every public method holds the lock (an RLock: they call each other)
    def load(self) -> Loaded:
        with self._lock:
            return self._load_unlocked()

    def claimed(self, pairs: list[Pair]) -> set[Pair]:
        with self._lock:
            return self._claimed_unlocked(pairs)

    def record(self, entry: dict) -> str:
        with self._lock:
            return self._record_unlocked(entry)

    def forget(self, name: str) -> None:
        with self._lock:
            self._forget_unlocked(name)

    def generations(self) -> dict[str, Generation]:
        with self._lock:
            return self._generations_unlocked()

    # --- reading -------------------------------------------------------------------------------
    def _add(self, name: str, entry: dict) -> None:
        self._entries[name] = entry
        key = (str(entry["unit_id"]), str(entry["fingerprint"]))
        for m, t in entry.get("done", []):
            self._claims.setdefault((str(m), str(t)), set()).add(key)

    def _refresh_entries(self) -> int:
        """Read the entries written since the last look (a listing of names, then only new files;
        a fresh process first takes what the snapshot holds). Returns entry files read."""
        names = self._fs.names(INDEX)  # names only: no stat per entry, no sort
        if not self._entries and SNAPSHOT in names:
            self._read_snapshot(set(names))
        n = 0
        for name in names:
            if name in self._entries or not _ENTRY.fullmatch(name):
                continue
            n += 1
            raw = self._fs.read(f"{INDEX}/{name}")
            try:
                entry = json.loads(raw) if raw else None
            except ValueError:
                entry = None  # unreadable: verify reports it, a rebuild rewrites it
            if isinstance(entry, dict) and "unit_id" in entry and "fingerprint" in entry:
                self._add(name, entry)
        return n

    def _read_snapshot(self, names: set[str]) -> None:
        """Entries as a load found them, in one file: their names are content-addressed, so an
        entry of the snapshot is the file of that name as long as the name is still listed."""
        try:
            snap = json.loads(self._fs.read(f"{INDEX}/{SNAPSHOT}") or b"{}")
        except ValueError:
            return  # unreadable: the entry files are read instead
        if isinstance(snap, dict):
            for name, entry in snap.items():
                if name in names and isinstance(entry, dict) and "unit_id" in entry and "fingerprint" in entry:
                    self._add(name, entry)

    def _write_snapshot(self) -> None:
        self._fs.put(f"{INDEX}/{SNAPSHOT}", json.dumps(self._entries, separators=(",", ":")).encode())

    def _generations_unlocked(self) -> dict[str, Generation]:
        """Committed generations not replaced by a later one (a killed re-compaction leaves both:
        the replacing one wins, so no unit is read twice)."""
        present = set(self._fs.names(COMPACTED))  # one listing, names only
        for gen_id in sorted(present):
            if gen_id not in self._gens and gen_id not in self._dead_gens and not gen_id.startswith("."):
                gen = read_generation(self._fs, gen_id)
                if gen is not None:
                    self._gens[gen_id] = gen
        for gone in [g for g in self._gens if g not in present]:  # removed by a later compaction
            self._dead_gens.add(gone)
            del self._gens[gone]
        replaced = {r for g in self._gens.values() for r in g.replaces}
        return {k: g for k, g in sorted(self._gens.items()) if k not in replaced}

    def compacted_units(self) -> dict[str, str]:
        """unit_id -> generation id of every unit whose rows a live generation holds."""
        gens = self.generations()
        key = tuple(gens)
        if self._compacted_key != key:  # rebuilt only when the live generations change
            self._compacted = {u: g.gen_id for g in gens.values() for u in g.units}
            self._compacted_key = key
        return self._compacted

    def _load_unlocked(self) -> Loaded:
        """Every unit that counts as done (and its pairs): compacted ones, and loose folders whose
        listing matches their entry's recorded sizes; unindexed committed units get an entry."""
        out = Loaded()
        for gen in self.generations().values():
            for u, fp in gen.units.items():
                out.units[u], out.compacted[u] = fp, gen.gen_id
                out.pairs.update(gen.pairs.get(u, []))
        if self._refresh_entries() >= SNAPSHOT_AFTER:  # the next fresh process reads one file
            self._write_snapshot()
        by_unit: dict[str, list[dict]] = {}
        for e in self._entries.values():
            by_unit.setdefault(str(e["unit_id"]), []).append(e)
        flagged = flagged_units(self._fs)
        for unit_id, listing in self._unit_listings().items():
            if unit_id in out.compacted or listing is None:
                continue  # a compacted unit's leftover folder, or a plain file in units/
            entry: dict | None = self._match(unit_id, listing, by_unit.get(unit_id, []))
            if entry is None and SUCCESS in listing:  # no entry fits: unindexed, or damaged
                entry = self.heal(unit_id)
                if entry is not None:
                    out.healed.append(unit_id)
            if entry is None:
                continue
            hit = flagged.get(unit_id)
            if hit and hit.get("fingerprint") == entry["fingerprint"]:
                continue  # the last verify found it damaged
            out.units[unit_id] = str(entry["fingerprint"])
            out.pairs.update((str(m), str(t)) for m, t in entry.get("done", []))
        return out

    def _unit_listings(self) -> dict[str, dict[str, int | None] | None]:
        """units/<name> -> {file: size} of its folder (None for a plain file): one listing per
        folder locally, one recursive listing on object stores."""
        if not self._fs.local:
            return self._fs.tree("units")
        out: dict[str, dict[str, int | None] | None] = {}
        try:
            top = os.scandir(os.path.join(str(self._fs.path), "units"))
        except FileNotFoundError:
            return out
        with top:
            for d in top:
                if not d.is_dir(follow_symlinks=False):
                    out[d.name] = None
                    continue
                try:
                    with os.scandir(d.path) as it:
                        out[d.name] = {e.name: (None if e.is_dir(follow_symlinks=False)
                                                else e.stat(follow_symlinks=False).st_size) for e in it}
                except (FileNotFoundError, NotADirectoryError):
                    continue  # moved away while listing (quarantine, compaction)
        return out

    def _match(self, unit_id: str, listing: dict[str, int | None], cands: list[dict]) -> dict | None:
        """The entry describing the folder as it is (sizes of every file, nothing more); with
        several candidates of equal sizes, the one whose fingerprint the marker records."""
        ok = [e for e in cands if _sizes_match(e, listing)]
        if len(ok) <= 1:
            return ok[0] if ok else None
        fp = unit_fingerprint(self._fs, unit_id)
        return next((e for e in ok if e["fingerprint"] == fp), None)

    def heal(self, unit_id: str) -> dict | None:
        """Write the entry of a committed unit that has none (written before the index existed,
        or an entry deleted by hand); None if the folder is not a healthy committed unit."""
        entry = entry_from_unit(self._fs, unit_id)
        if entry is None:
            return None
        name = entry_name(unit_id, entry["fingerprint"])
        self._fs.put(name, json.dumps(entry).encode())
        self._add(name.removeprefix(f"{INDEX}/"), entry)
        return entry

    # --- the commit path -----------------------------------------------------------------------
    def _claimed_unlocked(self, pairs: list[Pair]) -> set[Pair]:
        """Of `pairs`, those a committed unit (loose or compacted) holds right now. Reads only
        entries new since the last look, and one marker per unit that claims one of `pairs`."""
        self._refresh_entries()
        gens = self.generations()
        compacted = self.compacted_units()
        out = {p for p in pairs if any(p in g.pair_set for g in gens.values())}
        live: dict[tuple[str, str], bool] = {}
        gone: set[Pair] = set()
        for pair in pairs:
            for unit_id, fp in self._claims.get(pair, ()):
                if pair in out:
                    break
                if unit_id in compacted:
                    continue  # a compacted unit's pairs are those of its generation (checked above)
                key = (unit_id, fp)
                if key not in live:
                    live[key] = unit_fingerprint(self._fs, unit_id) == fp
                if live[key]:
                    out.add(pair)
                    break
                gone.add(pair)
        if gone - out:  # a compaction publishes before it removes a folder: look at generations again
            gens = self._generations_unlocked()
            out |= {p for p in gone if any(p in g.pair_set for g in gens.values())}
        return out

    def _record_unlocked(self, entry: dict) -> str:
        """Write a unit's entry (before its folder is published); returns its path."""
        name = entry_name(entry["unit_id"], entry["fingerprint"])
        self._fs.put(name, json.dumps(entry).encode())
        self._add(name.removeprefix(f"{INDEX}/"), entry)
        return name

    def _forget_unlocked(self, name: str) -> None:
        """Remove an entry this process wrote for a commit that did not land (it lost a race)."""
        self._fs.delete(name)
        entry = self._entries.pop(name.removeprefix(f"{INDEX}/"), None)
        if entry:
            key = (str(entry["unit_id"]), str(entry["fingerprint"]))
            for m, t in entry.get("done", []):
                self._claims.get((str(m), str(t)), set()).discard(key)

    # --- verify / rebuild ----------------------------------------------------------------------
    def check(self, committed: dict[str, Any]) -> list[str]:
        """Problems of the index against the committed loose units (integrity UnitChecks): an
        entry whose pairs or sizes differ from the unit's own records. A unit without an entry
        (written before the index) gets one, as a load would give it."""
        self._refresh_entries()
        by_key = {(str(e["unit_id"]), str(e["fingerprint"])): e for e in self._entries.values()}
        problems = []
        for unit_id, check in sorted(committed.items()):
            entry = by_key.get((unit_id, str(check.fingerprint)))
            if entry is None:  # a unit of before the index (or an entry deleted): rebuilt, not damage
                self.heal(unit_id)
                continue
            want = sorted({(str(m), str(t)) for m, t in (check.manifest or {}).get("done", [])})
            if sorted((str(m), str(t)) for m, t in entry.get("done", [])) != want:
                problems.append(f"index entry of units/{unit_id} lists other pairs than its _done.json")
            elif not _sizes_match(entry, self._fs.entries(f"units/{unit_id}")):
                problems.append(f"index entry of units/{unit_id} records other file sizes")
        return problems

    def rebuild(self, committed: list[str]) -> int:
        """Rewrite the entries of the given committed units from their folders (fixing what
        check() found); entries of units no longer in units/ are removed. Returns entries written."""
        self._refresh_entries()
        keep: set[str] = set()
        n = 0
        for unit_id in committed:
            entry = entry_from_unit(self._fs, unit_id)
            if entry is None:
                continue
            name = entry_name(unit_id, entry["fingerprint"]).removeprefix(f"{INDEX}/")
            old = self._entries.get(name)
            if old is None or old.get("done") != entry["done"] or old.get("sizes") != entry["sizes"]:
                self._fs.put(f"{INDEX}/{name}", json.dumps(entry).encode())
                n += 1
            self._add(name, entry)
            keep.add(name)
        compacted = self.compacted_units()
        for name, entry in list(self._entries.items()):
            if name not in keep and entry["unit_id"] not in compacted:
                self.forget(f"{INDEX}/{name}")
        self._fs.delete(f"{INDEX}/{SNAPSHOT}")  # it may hold the content just rewritten
        return n

    def fold(self, units: dict[str, str]) -> int:
        """Remove the entries of units a live generation now holds (their pairs are in its
        _units.parquet): the index stays as small as the loose units. Returns entries removed."""
        self._refresh_entries()
        n = 0
        for name, entry in list(self._entries.items()):
            if entry["unit_id"] in units:
                self.forget(f"{INDEX}/{name}")
                n += 1
        if n:
            self._fs.delete(f"{INDEX}/{SNAPSHOT}")  # mostly folded entries now: a later load rewrites it
        return n


# --- checking a generation -------------------------------------------------------------------
def generation_fingerprint(gen: Generation) -> str:
    """sha256 of a generation's manifest (its files' sizes and checksums, its units)."""
    return hashlib.sha256(json.dumps(gen.manifest, sort_keys=True).encode()).hexdigest()


def check_generation(fs: Any, gen: Generation, *, full: bool) -> list[str]:
    """What is wrong with a committed generation: files missing or of another size (cheap);
    with `full`, checksums and row counts too (per file, and per unit against the manifest)."""
    rel = f"{COMPACTED}/{gen.gen_id}"
    problems = []
    listing = _listing(fs, rel)
    files = gen.manifest.get("files", {})
    for name, rec in sorted(files.items()):
        if listing.get(name) != rec.get("size"):
            problems.append(f"{name} is {'missing' if name not in listing else f'{listing[name]} bytes'}, "
                            f"{rec.get('size')} bytes recorded")
    if problems or not full:
        return problems
    counted = _rows_per_unit(fs, rel, files, problems)
    if problems:
        return problems
    for unit_id, info in sorted(gen.manifest.get("units", {}).items()):
        for table, n in info.get("rows", {}).items():
            if counted.get((unit_id, table), 0) != n:
                problems.append(f"unit {unit_id}: {counted.get((unit_id, table), 0)} {table} rows, "
                                f"{n} recorded")
    return problems


def _listing(fs: Any, rel: str) -> dict[str, int | None]:
    """Relative path -> size of every file under `rel` (partition folders included)."""
    out: dict[str, int | None] = {}
    for name, size in fs.entries(rel).items():
        if size is None:
            out.update({f"{name}/{k}": v for k, v in _listing(fs, f"{rel}/{name}").items()})
        else:
            out[name] = size
    return out


def _rows_per_unit(fs: Any, rel: str, files: dict, problems: list[str]) -> dict[tuple[str, str], int]:
    """(unit_id, table) -> rows in the generation's files, each file's sha256 checked first."""
    counted: dict[tuple[str, str], int] = defaultdict(int)
    for name, rec in sorted(files.items()):
        data = fs.read(f"{rel}/{name}")
        if data is None or hashlib.sha256(data).hexdigest() != rec.get("sha256"):
            problems.append(f"{name} checksum differs from the one recorded in {GEN_MANIFEST}")
            continue
        ids = pq.read_table(pa.BufferReader(data), columns=["unit_id"]).column("unit_id")
        if len(ids) != rec.get("rows"):
            problems.append(f"{name} has {len(ids)} rows, {rec.get('rows')} recorded")
            continue
        for d in ids.value_counts().to_pylist():
            counted[(d["values"], rec["table"])] += d["counts"]
    return counted


def _sizes_match(entry: dict, listing: dict[str, int | None]) -> bool:
    """The folder holds exactly the files the entry recorded, each of its recorded size."""
    sizes = entry.get("sizes") or {}
    return bool(sizes) and listing == sizes
