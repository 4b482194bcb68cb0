"""Executors: run a Plan's units on Ray (the default, local or a cluster) or in-process (debug).

The executor knows nothing about SVDs: it ships frozen WorkUnits to `unit.process_unit`, keeps a
bounded number in flight, retries tasks whose worker died, and records the run's manifest.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Literal, Optional

from ..config import AnalysisConfig
from ..errors import ClusterUnreachableError, ConfigError, error_row
from .plan import Plan, WorkUnit
from .unit import UnitOutcome, process_unit

log = logging.getLogger(__name__)
Executor = Literal["ray", "local"]


@dataclass
class RunSummary:
    run_id: str
    n_units: int
    n_done: int = 0
    n_skipped: int = 0
    n_failed: int = 0
    n_member_errors: int = 0
    n_plan_errors: int = 0          # artifacts that could not be planned (each an errors row)
    seconds: float = 0.0
    devices: dict[str, int] = field(default_factory=dict)
    peak_rss_mb: float = 0.0        # the largest peak resident memory reported by a worker
    n_solver_fallbacks: int = 0     # fast engine: dense-SVD fallbacks over all units


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


PROBE_TIMEOUT_S = 5.0


def probe_address(address: str, timeout: float = PROBE_TIMEOUT_S, what: str = "Ray cluster") -> None:
    """One bounded TCP connect to a Ray (ray://HOST:PORT, HOST:PORT) or Jobs API (http://...)
    address. ray.init retries an unreachable GCS for minutes; this fails in `timeout` seconds
    with a message naming the address. 'auto' / 'local' name no socket and are not probed."""
    import socket
    from urllib.parse import urlsplit

    if address in ("auto", "local"):
        return
    try:
        parts = urlsplit(address if "://" in address else f"tcp://{address}")
        host, port = parts.hostname, parts.port
    except ValueError as err:  # a port that is not a number, or out of range
        raise ConfigError(f"--address {address!r} is not HOST:PORT or SCHEME://HOST:PORT ({err})",
                          option="address") from err
    if port is None and parts.scheme in ("http", "https"):
        port = 443 if parts.scheme == "https" else 80
    if not host or port is None:
        raise ConfigError(f"--address {address!r} needs a host and a port, e.g. ray://head:10001",
                          option="address")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except socket.gaierror as err:
        raise ClusterUnreachableError(f"cannot reach {what} at {address}: host {host!r} does not "
                                      "resolve", address=address) from err
    except OSError as err:
        why = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise ClusterUnreachableError(f"cannot reach {what} at {address}: {why} (is it running, and "
                                      "is the port right?)", address=address) from err


def ensure_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> None:
    """Join `address` (a cluster) or start a local Ray once; reuse an initialised one."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict = dict(logging_level=logging.WARNING, log_to_driver=True, configure_logging=False)
    address = address or os.environ.get("RAY_ADDRESS")  # set inside a Ray Job: join its cluster
    if address:
        probe_address(address)
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)


def _ray_task():
    """The remote function, built lazily so importing this module does not import Ray."""
    import ray

    @ray.remote(max_retries=3, retry_exceptions=False)
    def analyze_unit(unit: WorkUnit, cfg: AnalysisConfig, run_id: str, root: str) -> UnitOutcome:
        gpu_ids = ray.get_gpu_ids()
        device = "cuda" if gpu_ids else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES for this worker
        return process_unit(unit, cfg, run_id, root, device=device)

    return analyze_unit


def run_plan(
    plan: Plan,
    results_root: str,
    *,
    run_id: Optional[str] = None,
    executor: Executor = "ray",
    address: Optional[str] = None,
    max_in_flight: Optional[int] = None,
    gpus_per_task: Optional[float] = None,
    device: str = "auto",
    command: str = "",
    on_progress: Optional[Callable[[int, int, UnitOutcome], None]] = None,
) -> RunSummary:
    """Execute every unit not yet committed under `results_root`; write the run manifest."""
    from .store import ResultsStore

    if max_in_flight is not None and (not isinstance(max_in_flight, int) or max_in_flight < 1):
        # 0 or less would never submit a task and wait forever
        raise ConfigError(f"--max-in-flight must be an integer >= 1, got {max_in_flight!r}",
                          option="max_in_flight")
    store = ResultsStore(results_root)
    run_id = run_id or new_run_id()
    store.start_run(run_id, plan.config.to_json(), command)
    if plan.models:
        store.write_models([dict(m, run_id=run_id) for m in plan.models])
    if plan.errors:
        store.write_errors(run_id, "plan", [dict(e, run_id=run_id, unit_id="plan") for e in plan.errors])

    # A damaged unit is not done (done_pairs() left its pairs in the plan), but its folder would
    # block the recommit: move it to quarantine/ first. Full checksums: repair(), before planning.
    store.quarantine_known_damage()
    done = store.done_units()
    todo = [u for u in plan.units if u.unit_id not in done]
    summary = RunSummary(run_id, n_units=len(plan.units), n_skipped=len(plan.units) - len(todo),
                         n_plan_errors=len(plan.errors))
    t0 = time.perf_counter()
    status = "failed"
    try:
        outcomes = (
            _run_local(todo, plan.config, run_id, results_root, device)
            if executor == "local"
            else _run_ray(todo, plan.config, run_id, results_root, address, max_in_flight, gpus_per_task)
        )
        for i, outcome in enumerate(outcomes, 1):
            _tally(summary, outcome)
            if on_progress:
                on_progress(i, len(todo), outcome)
        status = "finished"
    finally:
        summary.seconds = time.perf_counter() - t0
        store.finish_run(
            run_id, status,
            n_units=summary.n_units, n_done=summary.n_done,
            n_skipped=summary.n_skipped, n_failed=summary.n_failed,
            extra={"seconds": round(summary.seconds, 3), "devices": summary.devices,
                   "worker_peak_rss_mb": round(summary.peak_rss_mb, 1),
                   "n_solver_fallbacks": summary.n_solver_fallbacks},
        )
    return summary


def _tally(summary: RunSummary, o: UnitOutcome) -> None:
    if o.status == "done":
        summary.n_done += 1
    elif o.status == "skipped":
        summary.n_skipped += 1
    else:
        summary.n_failed += 1
    summary.n_member_errors += o.n_failed
    summary.devices[o.device] = summary.devices.get(o.device, 0) + 1
    summary.peak_rss_mb = max(summary.peak_rss_mb, o.peak_rss_mb)
    summary.n_solver_fallbacks += getattr(o, "n_solver_fallbacks", 0)


def _run_local(units, cfg, run_id, root, device: str):
    """In-process executor, for debugging and single-GPU boxes (same unit code as the Ray path)."""
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    for u in units:
        yield process_unit(u, cfg, run_id, root, device=device)


def _run_ray(units, cfg, run_id, root, address, max_in_flight, gpus_per_task):
    import ray

    if not units:  # nothing to do: no cluster to start or join
        return
    ensure_ray(address)
    task = _ray_task()
    n_gpus = ray.cluster_resources().get("GPU", 0)
    if gpus_per_task is None:
        gpus_per_task = 0.25 if n_gpus else 0  # several units share a GPU (one CUDA context per worker)
    opts = {"num_gpus": gpus_per_task} if gpus_per_task else {}
    max_in_flight = max_in_flight or max(2, int(ray.cluster_resources().get("CPU", 1)) * 2)
    cfg_ref = ray.put(cfg)
    pending: dict = {}
    queue = list(units)
    while queue or pending:
        while queue and len(pending) < max_in_flight:
            u = queue.pop(0)
            pending[task.options(**opts).remote(u, cfg_ref, run_id, root)] = u
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            unit = pending.pop(ref)
            try:
                yield ray.get(ref)
            except Exception as err:  # task failed past its retries: an error row, the run goes on
                yield _task_failure(unit, err, run_id, root)


def _task_failure(unit: WorkUnit, err: Exception, run_id: str, root: str) -> UnitOutcome:
    from .store import ResultsStore

    # the same redacted, capped row as every other stage: a Ray traceback quotes whatever the
    # worker saw, tokens included
    rows = [dict(error_row("execute", err, model=m, tensor=unit.tensor), run_id=run_id,
                 unit_id=unit.unit_id) for m in unit.members]
    ResultsStore(root).write_errors(run_id, unit.unit_id, rows)
    return UnitOutcome(unit.unit_id, "failed", n_failed=len(rows), errors=rows)
