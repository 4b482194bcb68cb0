"""One unit of work, end to end, with no knowledge of where it runs (Ray task or in-process).

Read W0 once, load each member's exact update, analyse the batch, commit all rows atomically.
A member that fails to load, or that the math refuses, becomes an `errors` row; the rest of the
batch is still analysed.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..config import AnalysisConfig
from ..errors import ZoospectraError, error_row
from ..io.refs import ModelRef
from .plan import WorkUnit

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

    from ..spectral import BatchAnalysis
    from ..updates import MatrixUpdate
    from .store import ResultsStore


UnitStatus = Literal["done", "skipped", "failed"]


@dataclass
class UnitOutcome:
    unit_id: str
    status: UnitStatus
    n_done: int = 0                 # members analysed
    n_failed: int = 0               # members that became error rows
    seconds: float = 0.0
    device: str = "cpu"
    errors: list[dict] = field(default_factory=list)
    peak_rss_mb: float = field(default_factory=lambda: peak_rss_mb())
    n_solver_fallbacks: int = 0     # fast engine: solves that fell back to a dense SVD
    node: str = ""                  # the Ray node id that ran it ("local" in-process); set by the executor
    base_svd_computed: int = 0      # 1 when this unit had to decompose W0 itself (store had none)
    base_svd_loaded: int = 0        # 1 when it used a stored (or its worker's last) decomposition


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (the worker's, inside a Ray task)."""
    import resource
    import sys

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def warm_imports() -> None:
    """Import everything process_unit imports lazily (torch, the engines, the adapters, Arrow),
    so that a worker warmed by this (execute.start_ray_early) starts its first unit at once."""
    import pyarrow.compute  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import safetensors.torch  # noqa: F401

    from .. import adapters, spectral  # noqa: F401
    from ..io import components  # noqa: F401
    from ..spectral import fast  # noqa: F401
    from . import basecache, records, store  # noqa: F401


@lru_cache(maxsize=256)
def _artifact(ref: ModelRef):
    from ..adapters import open_artifact

    return open_artifact(ref.open_source(), model_id=ref.model_id)


def process_unit(unit: WorkUnit, cfg: AnalysisConfig, run_id: str, results_root: str,
                 device: str = "cpu", base_cache: str | None = None) -> UnitOutcome:
    """`base_cache`: where decompositions of W0 are stored and shared (default RESULTS/bases)."""
    from ..spectral.inputs import torch_dtype
    from .basecache import default_base_cache, obtain, open_checkpoint
    from .records import UnitContext, unit_tables
    from .store import ResultsStore

    t0 = time.perf_counter()
    store = ResultsStore(results_root)
    if store.is_done(unit.unit_id):
        return UnitOutcome(unit.unit_id, "skipped", device=device)

    errors: list[dict] = []
    try:
        base = open_checkpoint(unit.base, run_id)
        got = obtain(unit.base, unit.tensor, unit.transpose_w0, cfg, device,
                     base_cache or default_base_cache(results_root), run_id)
        w0, w0_svd = got.w0, got.svd
    except ZoospectraError as err:  # the base matrix is unreadable: every member fails
        errors = [error_row("load", err, model=m, tensor=unit.tensor) for m in unit.members]
        return _failed(store, run_id, unit, errors, t0, device)

    updates, members = [], []
    for ref in unit.members:
        try:
            update = _artifact(ref).load_update(unit.tensor, base, w0=w0, dtype=torch_dtype(cfg.dtype))
            update.null_key = ref.uid    # seeds its null draws (spectral/null.py)
            updates.append(update)
            members.append(ref)
        except Exception as err:  # noqa: BLE001 - one artifact's failure, of any kind, is its own row
            errors.append(error_row("load", err, model=ref, tensor=unit.tensor))
    if not updates:
        return _failed(store, run_id, unit, errors, t0, device, int(got.how == "computed"))

    from ..spectral.fast import fallback_count

    fallbacks0 = fallback_count()
    analysis, updates, members, bad = _analyze(w0, w0_svd, updates, members, cfg, device, unit.tensor)
    n_fallbacks = fallback_count() - fallbacks0
    errors += bad
    if analysis is None:
        return _failed(store, run_id, unit, errors, t0, device, int(got.how == "computed"))

    from ..io.components import component_of, kernel_shape

    stored = tuple(base.info(unit.tensor).shape)
    ks = kernel_shape(stored)
    ctx = UnitContext(
        run_id=run_id, unit_id=unit.unit_id, base_uid=unit.base.uid, base_id=unit.base.model_id,
        tensor=unit.tensor, members=tuple((m.uid, m.model_id) for m in members),
        component=component_of(base, unit.tensor), kernel_shape=None if ks is None else tuple(ks),
    )
    tables = unit_tables(ctx, updates, analysis, cfg)
    if errors:
        store.write_errors(run_id, unit.unit_id, _fill(errors, run_id, unit.unit_id))
    committed, members = _commit_new_pairs(results_root, unit, tables, members)
    return UnitOutcome(
        unit.unit_id, "done" if committed else "skipped", n_done=len(members),
        n_failed=len(errors), seconds=time.perf_counter() - t0, device=device, errors=errors,
        n_solver_fallbacks=n_fallbacks,
        base_svd_computed=int(got.how == "computed"), base_svd_loaded=int(got.how != "computed"),
    )


def _analyze(w0: torch.Tensor, base, updates: list[MatrixUpdate], members: list[ModelRef],
             cfg: AnalysisConfig, device: str, tensor: str
             ) -> tuple[BatchAnalysis | None, list[MatrixUpdate], list[ModelRef], list[dict]]:
    """analyze_batch, where one member that the math refuses (e.g. a scale that overflows to Inf)
    costs only its own row: on a batch failure each member is tried alone against one shared base
    SVD, then the survivors are analysed together again. Returns (analysis or None, updates,
    members, error rows)."""
    from ..spectral import analyze_batch

    try:
        return analyze_batch(w0, updates, cfg, device=device, base=base), updates, members, []
    except ZoospectraError as err:
        if len(updates) == 1:
            return None, [], [], [error_row("analyze", err, model=members[0], tensor=tensor)]
    keep_u, keep_m, errors = [], [], []
    for update, ref in zip(updates, members, strict=True):
        try:
            analyze_batch(w0, [update], cfg, device=device, base=base)
            keep_u.append(update)
            keep_m.append(ref)
        except ZoospectraError as err:
            errors.append(error_row("analyze", err, model=ref, tensor=tensor))
    if not keep_u:
        return None, [], [], errors
    try:
        return analyze_batch(w0, keep_u, cfg, device=device, base=base), keep_u, keep_m, errors
    except ZoospectraError as err:  # only together (e.g. pairs): the batch fails as a whole
        return None, [], [], errors + [error_row("analyze", err, model=m, tensor=tensor) for m in keep_m]


# --- committing: each (model, tensor) pair lands once, even when runs overlap ------------------
def _commit_new_pairs(results_root: str, unit: WorkUnit, tables: dict[str, pa.Table],
                      members: list[ModelRef]) -> tuple[bool, list[ModelRef]]:
    """Publish the unit minus members whose pair another unit committed since planning.

    Two runs over overlapping sets of artifacts batch them differently, so their unit ids differ
    and the atomic unit rename alone cannot stop both from writing the shared pairs. The check
    and the publish hold one lock (flock on the root's units/ directory, local roots), so of two
    concurrent writers of a pair exactly one lands it. Remote roots have no lock: the check then
    narrows the race to the few milliseconds of a commit.
    """
    store = _store(results_root)
    with _commit_lock(store):
        # the done index: this unit's pairs and the commits since the last look, not every unit
        done = store.claimed_pairs([(m.uid, unit.tensor) for m in members])
        dup = {m.uid for m in members if (m.uid, unit.tensor) in done}
        if dup:
            tables = {name: _without_models(t, dup) for name, t in tables.items()}
            members = [m for m in members if m.uid not in dup]
        if not members:
            return False, []
        return store.commit_unit(unit.unit_id, tables, done=[(m.uid, unit.tensor) for m in members]), members


@lru_cache(maxsize=16)
def _store(results_root: str) -> ResultsStore:
    """One store per root and process: its cache of committed units' pairs outlives a unit."""
    from .store import ResultsStore

    return ResultsStore(results_root)


@contextmanager
def _commit_lock(store: ResultsStore) -> Iterator[None]:
    if not store.is_local:
        yield
        return
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; the check alone still applies
        yield
        return
    units = Path(store.uri) / "units"
    units.mkdir(parents=True, exist_ok=True)
    fd = os.open(units, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _without_models(table: pa.Table, uids: set[str]) -> pa.Table:
    """Rows of `table` not about any model in `uids` (pairs: neither side)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keep = None
    for col in ("model_uid", "model_uid_a", "model_uid_b"):
        if col in table.schema.names:
            ok = pc.invert(pc.is_in(table[col], value_set=pa.array(sorted(uids), pa.string())))
            keep = ok if keep is None else pc.and_(keep, ok)
    return table if keep is None else table.filter(keep)


def _fill(rows: list[dict], run_id: str, unit_id: str) -> list[dict]:
    return [dict(r, run_id=run_id, unit_id=unit_id) for r in rows]


def _failed(store, run_id: str, unit: WorkUnit, errors: list[dict], t0: float, device: str,
            computed: int = 0) -> UnitOutcome:
    store.write_errors(run_id, unit.unit_id, _fill(errors, run_id, unit.unit_id))
    return UnitOutcome(unit.unit_id, "failed", n_failed=len(errors),
                       seconds=time.perf_counter() - t0, device=device, errors=errors,
                       base_svd_computed=computed)
