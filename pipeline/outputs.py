"""Output ownership: the one place that decides whether a command may write (or replace) a path.

Rules (issue 12): a writer never deletes or overwrites what zoospectra did not write.

- An output directory must be new, empty, or a previous output of the *same* command, which is
  recognised by the marker file `.zoospectra-output.json` ({"command", "created"}) that
  `claim_output` writes into every directory it hands out. A previous output is written over
  file by file (files the command writes are replaced, anything else is left); with `force` the
  command may remove it first and write it afresh (`replace_output`). `force` never unlocks a
  directory without the marker.
- An output equal to or inside an input (an artifact, a base, a results root) is refused, and so
  is one that contains an input (replacing it would delete the input).
- A results root (`analyze --out`, `demo --out`, `crawl --out`) is owned when it is new, empty,
  or already a results root (it has one of the store's own folders).
- A single-file output (`plot --out`, `sql --output`) must not be a directory; an existing file
  is only overwritten when the tool can tell it wrote it (figures carry a "zoospectra" creator
  tag, see `figure_metadata`), otherwise it is refused.
Remote results roots (URIs) are not checked here: the store only ever adds files to them.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

from .errors import OutputError, ResultsNotFoundError

MARKER = ".zoospectra-output.json"
# Folders of a results root (run/store.py's layout): any one makes a directory a results root.
ROOT_FOLDERS = ("units", "runs", "models", "errors", "catalog", "_staging", "compacted", "_index")
FIGURE_TAG = "zoospectra plot"


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_not_input(out: Path, inputs: Iterable[str | os.PathLike], option: str) -> None:
    """Refuse an output equal to / inside an input, or one that contains an input."""
    for given in inputs:
        if given is None or "://" in os.fspath(given):
            continue
        inp = _resolved(given)
        if _inside(out, inp):
            raise OutputError(f"{option} {out} is inside the input {inp}; write the output elsewhere",
                              path=str(out))
        if _inside(inp, out):
            raise OutputError(f"{option} {out} contains the input {inp}; write the output elsewhere",
                              path=str(out))


def read_marker(path: Path) -> dict | None:
    """The marker of a directory zoospectra wrote, or None (missing or not ours)."""
    try:
        data = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("command"), str) else None


def _check_writable(path: Path, option: str) -> None:
    """The nearest existing ancestor must be a writable directory (read-only filesystems, files)."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{option} {path}: {probe} is a file, not a directory; choose a directory path",
                          path=str(path))
    try:  # a real write: os.access says yes to root on read-only mounts and pseudo filesystems
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise OutputError(f"{option} {path}: cannot write in {probe} ({err.strerror or err}: a "
                          "read-only filesystem or permissions); choose a writable directory",
                          path=str(path)) from None


def claim_output(path: str | os.PathLike, command: str, *, inputs: Iterable[str | os.PathLike] = (),
                 force: bool = False, option: str = "--out") -> Path:
    """Check that `command` may write the directory `path`, create it and mark it as ours.

    Returns the resolved path. `force` only matters to `replace_output`; it is accepted here so
    that a caller passes its flag once and gets the same refusals whether or not it is set.
    """
    out = _resolved(path)
    check_not_input(out, inputs, option)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{option} {path} is a file; pass a directory (new or empty)", path=str(path))
    _check_writable(out, option)
    if out.is_dir() and any(out.iterdir()):
        marker = read_marker(out)
        if marker is None:
            raise OutputError(
                f"{option} {path} is not empty and was not written by zoospectra {command}; "
                "choose a new or empty directory (nothing was changed)", path=str(path))
        if marker["command"] != command:
            raise OutputError(
                f"{option} {path} holds the output of zoospectra {marker['command']}, not of "
                f"{command}; choose another directory", path=str(path))
    out.mkdir(parents=True, exist_ok=True)
    if read_marker(out) is None:
        _write_marker(out, command)
    return out


def _write_marker(out: Path, command: str) -> None:
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    (out / MARKER).write_text(json.dumps({"command": command, "created": created}) + "\n",
                              encoding="utf-8")


def replace_output(out: Path, command: str) -> None:
    """With --force: empty a directory `claim_output` has accepted (so it carries our marker)."""
    marker = read_marker(out)
    if marker is None or marker["command"] != command:  # claim_output's guarantee, checked again
        raise OutputError(f"refusing to replace {out}: it is not a zoospectra {command} output",
                          path=str(out))
    for entry in out.iterdir():
        if entry.name == MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def claim_results_root(path: str, *, inputs: Iterable[str | os.PathLike] = (),
                       option: str = "--out") -> None:
    """A results root may be new, empty or an existing results root; never a user's folder."""
    if "://" in path:
        return
    out = _resolved(path)
    check_not_input(out, inputs, option)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{option} {path} is a file; pass a results directory", path=path)
    _check_writable(out, option)
    if out.is_dir() and any(out.iterdir()) and not any((out / f).is_dir() for f in ROOT_FOLDERS):
        raise OutputError(
            f"{option} {path} is not empty and is not a zoospectra results root (no "
            f"{'/, '.join(ROOT_FOLDERS[:3])}/); choose a new or empty directory", path=path)


def require_results_root(path: str) -> None:
    """A results root to read must exist (a typo would otherwise read as zero results)."""
    if "://" in path:
        return
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ResultsNotFoundError(f"no results at {path}: not a directory; pass the --out of an "
                                   "analyze run", root=path)
    if not any((p / f).is_dir() for f in ROOT_FOLDERS):
        raise ResultsNotFoundError(f"no results at {path}: it has no runs/ or units/; pass the --out "
                                   "of an analyze run", root=path)


def claim_file(path: str | os.PathLike, command: str, *, inputs: Iterable[str | os.PathLike] = (),
               option: str = "--out", ours: bool = False) -> Path:
    """A single output file: not a directory, not inside an input, and only overwritten when
    `ours` (the caller recognised its own earlier output); otherwise an existing file is refused."""
    out = _resolved(path)
    check_not_input(out, inputs, option)
    if out.is_dir():
        raise OutputError(f"{option} {path} is a directory; pass a file name", path=str(path))
    _check_writable(out.parent, option)
    if out.exists() and not ours:
        raise OutputError(f"{option} {path} exists and was not written by zoospectra {command}; "
                          "remove it or choose another name", path=str(path))
    return out


def figure_is_ours(path: Path) -> bool:
    """Whether a PNG/SVG carries the creator tag write_figure puts in (see figure_metadata)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return FIGURE_TAG.encode() in head


def figure_metadata(fmt: str) -> dict:
    """Matplotlib savefig metadata that tags a figure as ours (PNG: Software, SVG: Creator)."""
    return {"Software": FIGURE_TAG} if fmt == "png" else {"Creator": FIGURE_TAG}
