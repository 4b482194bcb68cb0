"""A results root that checks itself: which unit folders count as committed, `verify`, quarantine.

Each committed unit records, in `_done.json`, the size and sha256 of every file it wrote, and its
`_SUCCESS` marker (written last) holds the size and sha256 of `_done.json`. Two levels of check
read those records:

- cheap (`full=False`), run whenever zoospectra lists units: when the SQL views are built
  (connect()), when a plan asks which pairs are done, and by `status`. Per unit folder it reads two
  small files and lists the folder: the name is a unit id, `_SUCCESS` and `_done.json` are present
  and agree, the recorded unit id is the folder's name, every recorded file is there with its
  recorded size and nothing else is. No Parquet data is read and nothing is hashed, so a query does
  not pay for checksums (1,000 units: see bench/verify_bench.py).
Folders of units whose rows a compaction generation holds (compact.py) are neither: they are
leftovers the next compaction removes. `verify` also checks every generation (sizes, checksums,
rows per unit) and the done index (index.py) against the units.

- full (`full=True`), run by `zoospectra verify` and at the start of `analyze` / `crawl`: the
  cheap checks, then the sha256 of every file against its record and the Parquet footer's row
  count against `_done.json`. This is what finds flipped bytes that kept a file's size.

Why not an index of verified units materialised at commit: commits happen concurrently on Ray
workers, and on object stores there is no lock to update one shared file safely; the per-unit
records need no coordination and work the same on local and fsspec roots. The result of the last
full pass is kept in `_verify.json`; units it found damaged stay out of the views (and out of the
done pairs, so the next run recomputes them) until that unit's marker changes.

Anything in `units/` that fails a check never reaches a view. A rerun moves it, whole, to
`quarantine/<name>-<UTC time>/` (never deleting it) and recomputes the unit's pairs, so after a
rerun `units/` holds only healthy units and the plain glob `units/*/<table>.parquet` gives the
same rows as the views.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq


class RootFS(Protocol):
    """What integrity needs of a results root's filesystem (store.py's _Local and _Remote)."""

    @property
    def local(self) -> bool: ...   # read-only: store.py declares it Literal[True] / Literal[False]

    def entries(self, rel: str) -> dict[str, int | None]: ...
    def exists(self, rel: str) -> bool: ...
    def read(self, rel: str) -> bytes | None: ...
    def put(self, rel: str, data: bytes) -> None: ...
    def move(self, rel: str, dest: str) -> None: ...

SUCCESS = "_SUCCESS"
DONE = "_done.json"
VERIFY_FILE = "_verify.json"
QUARANTINE = "quarantine"
MARKER_FORMAT = 1
REMEDY = "rerun analyze/crawl to recompute; damaged files will be moved to quarantine/"
_UNIT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")  # store.check_name's rule


def file_record(data: bytes) -> dict[str, Any]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def success_marker(done_json: bytes) -> bytes:
    """The `_SUCCESS` payload: the record of `_done.json`, so a changed manifest is noticed too."""
    return json.dumps({"format": MARKER_FORMAT, DONE: file_record(done_json)}).encode()


@dataclass
class UnitCheck:
    """What one entry of `units/` is: ok (a committed unit), damaged, stray, or in_flight."""

    name: str
    state: str = "ok"
    problems: list[str] = field(default_factory=list)
    manifest: dict | None = None
    fingerprint: str | None = None     # sha256 of _done.json: which version of the unit this is
    files: dict[str, int | None] = field(default_factory=dict)   # recorded file -> size (None: legacy)
    hashed: bool = False               # its files' checksums were checked by this check

    @property
    def ok(self) -> bool:
        return self.state == "ok"

    def table_file(self, table: str) -> str | None:
        """`<table>.parquet` if the unit wrote one."""
        name = f"{table}.parquet"
        return name if name in self.files else None

    def damage(self, problem: str) -> UnitCheck:
        self.state = "damaged"
        self.problems.append(problem)
        return self

    def as_dict(self) -> dict[str, Any]:
        return {"unit": self.name, "state": self.state, "problems": self.problems,
                "fingerprint": self.fingerprint}


def check_unit(fs: RootFS, name: str, size: int | None, *, full: bool, trusted: str | None = None) -> UnitCheck:
    """Check one entry `units/<name>` (size: None for a folder, bytes for a plain file).
    `trusted`: the fingerprint with which an earlier full check found this unit whole; a unit
    that still has it (and passes the cheap checks) is not hashed again."""
    check = UnitCheck(name)
    if size is not None or not _UNIT_NAME.fullmatch(name):
        check.state = "stray"
        what = "a file" if size is not None else "a folder whose name is not a unit id"
        copy_of = _copy_of(fs, name) if size is None else None
        check.problems.append(f"{what}, " + (f"a copy of unit {copy_of!r}" if copy_of else
                                             "not written by zoospectra as a unit") + "; the views ignore it")
        return check
    rel = f"units/{name}"
    entries = fs.entries(rel)
    if SUCCESS not in entries:
        if not fs.local:  # object stores: files land one by one, _SUCCESS last; a writer may be on it
            check.state = "in_flight"
            check.problems.append("no _SUCCESS yet (a writer may still be on it); a rerun completes it")
            return check
        return check.damage("no _SUCCESS marker: half-written, or the marker was deleted")
    done_raw = fs.read(f"{rel}/{DONE}")
    if done_raw is None:
        return check.damage(f"{DONE} is missing")
    check.fingerprint = hashlib.sha256(done_raw).hexdigest()
    _check_marker(check, fs.read(f"{rel}/{SUCCESS}") or b"", done_raw)
    if not check.ok:
        return check
    try:
        check.manifest = json.loads(done_raw)
        recorded = _recorded_files(check.manifest)
    except (ValueError, TypeError, AttributeError, KeyError):
        return check.damage(f"{DONE} is not a valid unit manifest")
    if check.manifest.get("unit_id") != name:
        return check.damage(f"folder {name!r} holds unit {check.manifest.get('unit_id')!r} "
                            "(a copy or a renamed folder): the views count it under neither name")
    check.files = {f: r.get("size") for f, r in recorded.items()}
    _check_listing(check, entries, recorded)
    if full and check.ok and (trusted is None or trusted != check.fingerprint):
        _check_contents(check, fs, rel, recorded)
        check.hashed = True
    return check


def _copy_of(fs: RootFS, name: str) -> str | None:
    """The unit id recorded in a stray folder's _done.json, if it has one (a copied unit)."""
    try:
        return str(json.loads(fs.read(f"units/{name}/{DONE}") or b"null")["unit_id"])
    except (ValueError, TypeError, KeyError, OSError):
        return None


def _check_marker(check: UnitCheck, success: bytes, done_raw: bytes) -> None:
    """Compare _done.json with the record in _SUCCESS (an empty marker: a unit written before
    checksums were recorded, accepted as it is)."""
    if not success.strip():
        return
    try:
        want = json.loads(success)[DONE]
    except (ValueError, TypeError, KeyError):
        check.damage(f"{SUCCESS} marker is unreadable")
        return
    if want != file_record(done_raw):
        check.damage(f"{DONE} differs from the checksum recorded in {SUCCESS} (changed after commit)")


def _recorded_files(manifest: dict) -> dict[str, dict]:
    if "files" in manifest:
        return {str(k): dict(v) for k, v in manifest["files"].items()}
    return {f"{t}.parquet": {} for t, n in manifest["rows"].items() if n}  # older units: names only


def _check_listing(check: UnitCheck, entries: dict[str, int | None],
                   recorded: dict[str, dict]) -> None:
    for fname, rec in sorted(recorded.items()):
        got = entries.get(fname, -1)
        if got == -1:
            check.damage(f"{fname} is missing")
        elif got is None:
            check.damage(f"{fname} is a folder, not a file")
        elif "size" in rec and got != rec["size"]:
            check.damage(f"{fname} is {got} bytes, {rec['size']} recorded at commit (truncated or replaced)")
    extra = sorted(set(entries) - set(recorded) - {SUCCESS, DONE})
    if extra:
        check.damage(f"unexpected entries {extra} that the unit did not write")


def _check_contents(check: UnitCheck, fs: RootFS, rel: str,
                    recorded: dict[str, dict]) -> None:
    rows = (check.manifest or {}).get("rows", {})
    for fname, rec in sorted(recorded.items()):
        data = fs.read(f"{rel}/{fname}")
        if data is None:
            check.damage(f"{fname} vanished while being checked")
            continue
        if "sha256" in rec and hashlib.sha256(data).hexdigest() != rec["sha256"]:
            check.damage(f"{fname} checksum differs from the one recorded at commit "
                         "(flipped bytes, or a file swapped in from elsewhere)")
            continue
        table = fname.removesuffix(".parquet")
        try:
            if "sha256" in rec:  # bytes as written: the footer's row count is enough
                n = pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
            else:  # no record (older unit): read it all, verifying page checksums where present
                n = pq.read_table(pa.BufferReader(data), page_checksum_verification=True).num_rows
        except (pa.ArrowException, OSError, ValueError) as err:
            check.damage(f"{fname} is not readable Parquet ({type(err).__name__}: {err})")
            continue
        if table in rows and n != rows[table]:
            check.damage(f"{fname} has {n} rows, {rows[table]} recorded at commit")


@dataclass
class RootScan:
    checks: list[UnitCheck]
    seconds: float = 0.0

    def of(self, state: str) -> list[UnitCheck]:
        return [c for c in self.checks if c.state == state]

    @property
    def ok(self) -> dict[str, UnitCheck]:
        return {c.name: c for c in self.checks if c.ok}

    @property
    def findings(self) -> list[UnitCheck]:
        """Everything a rerun moves to quarantine: damaged units and stray entries."""
        return [c for c in self.checks if c.state in ("damaged", "stray")]


REHASH_AFTER_S = float(os.environ.get("ZOOSPECTRA_REHASH_AFTER_DAYS", "7")) * 86400


def verified_before(fs: RootFS, max_age_s: float | None = None
                    ) -> tuple[dict[str, tuple[str, float]], dict[str, tuple[str, float]]]:
    """What earlier verifications found whole by checksum less than `max_age_s` ago:
    (unit -> (fingerprint, when hashed), generation -> (fingerprint, when hashed)), from
    _verify.json (empty when there is none or it is unreadable)."""
    raw = fs.read(VERIFY_FILE)
    now, max_age_s = time.time(), REHASH_AFTER_S if max_age_s is None else max_age_s
    try:
        record = json.loads(raw) if raw else {}
        out: list[dict[str, tuple[str, float]]] = []
        for key in ("verified_units", "verified_generations"):
            found = record.get(key) or {}
            out.append({str(k): (str(v[0]), float(v[1])) for k, v in found.items()
                        if isinstance(v, list) and len(v) == 2 and now - float(v[1]) < max_age_s})
        return out[0], out[1]
    except (ValueError, TypeError, AttributeError, IndexError):
        return {}, {}


def flagged_units(fs: RootFS) -> dict[str, dict]:
    """Units the last full verification found damaged: name -> its entry in _verify.json."""
    raw = fs.read(VERIFY_FILE)
    try:
        record = json.loads(raw) if raw else {}
        return {d["unit"]: d for d in record.get("damaged", []) if d.get("fingerprint")}
    except (ValueError, TypeError, KeyError, AttributeError):
        return {}  # an unreadable record is as good as none: the next verify rewrites it


def scan(fs: RootFS, *, full: bool, known: dict[str, UnitCheck] | None = None,
         compacted: dict[str, str] | None = None, trusted: dict[str, str] | None = None) -> RootScan:
    """Check every entry of `units/`. `known`: units already found ok by a cheap check in this
    process (committed units never change in place), re-checked only for their marker.
    `compacted`: unit id -> generation of units whose rows a compacted file holds: their folders
    are leftovers a compaction removes (state "compacted": not read, not damage).
    `trusted` (with `full`): unit -> fingerprint an earlier full check found whole (see
    verified_before): those units get the cheap checks only."""
    t0 = time.perf_counter()
    flagged = {} if full else flagged_units(fs)
    checks = []
    for name, size in sorted(fs.entries("units").items()):
        if compacted and name in compacted and size is None:
            checks.append(UnitCheck(name, "compacted", [f"its rows are in compacted/{compacted[name]}; "
                                                        "`zoospectra compact` removes this folder"]))
            continue
        if known and name in known and not full and name not in flagged and fs.exists(f"units/{name}/{SUCCESS}"):
            checks.append(known[name])
            continue
        check = check_unit(fs, name, size, full=full, trusted=(trusted or {}).get(name))
        hit = flagged.get(name)
        if check.ok and hit and hit.get("fingerprint") == check.fingerprint:
            check.damage("found damaged by the last `zoospectra verify`: " + "; ".join(hit.get("problems", [])))
        checks.append(check)
    return RootScan(checks, time.perf_counter() - t0)


def quarantine(fs: RootFS, checks: list[UnitCheck]) -> list[dict[str, str]]:
    """Move each damaged or stray entry of units/ to quarantine/<name>-<UTC time>/ (never delete)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    moved = []
    for check in checks:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", check.name).lstrip(".") or "entry"
        dest = f"{QUARANTINE}/{safe}-{stamp}"
        try:
            fs.move(f"units/{check.name}", dest)
        except FileNotFoundError:
            continue  # another run moved it first
        moved.append({"unit": check.name, "to": dest})
    return moved


def quarantine_generations(fs: RootFS, gen_ids: list[str]) -> list[dict[str, str]]:
    """Move damaged compaction generations to quarantine/ (never delete): their units no longer
    count as done, so the next run recomputes them."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    moved = []
    for gen in gen_ids:
        dest = f"{QUARANTINE}/compacted-{gen}-{stamp}"
        try:
            fs.move(f"compacted/{gen}", dest)
        except FileNotFoundError:
            continue
        moved.append({"unit": f"compacted/{gen}", "to": dest})
    return moved


def record_verification(fs: RootFS, result: RootScan, moved: list[dict[str, str]],
                        extra: dict[str, Any] | None = None) -> dict:
    """Write _verify.json (the last full verification) and return it. `extra`: findings about
    compacted generations and the done index (healthy only when they are empty)."""
    gone = {m["unit"] for m in moved}  # moved to quarantine/: no longer part of the root
    left = [c for c in result.findings if c.name not in gone]
    record = {
        "at": datetime.now(timezone.utc).isoformat(), "seconds": round(result.seconds, 3),
        "units_checked": len(result.checks), "units_ok": len(result.ok), "healthy": not left,
        "damaged": [c.as_dict() for c in left if c.state == "damaged"],
        "stray": [c.as_dict() for c in left if c.state == "stray"],
        "in_flight": [c.name for c in result.of("in_flight")],
        "quarantined": [dict(m, problems=c.problems) for m in moved for c in result.findings
                        if c.name == m["unit"]],
        **(extra or {}),
    }
    record["healthy"] = not left and not any(
        (extra or {}).get(k) for k in ("generations_damaged", "index_problems"))
    fs.put(VERIFY_FILE, json.dumps(record, indent=1).encode())
    return record
