"""Executors: run a Plan's units on Ray (the default, local or a cluster) or in-process (debug).

The executor knows nothing about the math: ahead of each touched base tensor's units it
schedules one `basecache.prepare_base` (the base SVD, loaded from or written to the durable base
cache; the units depend on it), ships frozen WorkUnits to `unit.process_unit`, keeps a bounded
number of tasks in flight, retries tasks whose worker died, and records the run's manifest.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal, TypeVar

from ..config import AnalysisConfig
from ..errors import ClusterUnreachableError, ConfigError, error_row, redact
from .basecache import BaseCache, BaseOutcome, default_base_cache, prepare_base
from .plan import Plan, WorkUnit, base_key, base_tensors
from .unit import UnitOutcome, process_unit

log = logging.getLogger(__name__)
Executor = Literal["ray", "local"]
T = TypeVar("T")


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
    base_svd_computed: int = 0      # base decompositions this run computed (and stored)
    base_svd_reused: int = 0        # base decompositions found valid in the store
    nodes: set[str] = field(default_factory=set)   # Ray node ids (or "local") that ran units
    cluster: str = ""               # which cluster ran it: "local Ray started by this run", an address, ...

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)


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


AUTH_HINT = ("if the cluster uses token authentication, set RAY_AUTH_MODE=token and give its token "
             "in RAY_AUTH_TOKEN or ~/.ray/auth_token")


def warm_workers() -> None:
    """One task per CPU of a local Ray started by this process that imports what a unit needs
    (unit.warm_imports: torch, the engines, Arrow) on the idle workers Ray starts with it, so the
    first units do not each wait for `import torch`; api.analyze calls it while the plan is still
    being read. Nothing waits for these tasks: the units queue behind them on the same workers.
    A joined cluster's workers are left alone (their number and placement are its business)."""
    import ray

    from .unit import warm_imports

    if not _started_here:
        return
    warm = ray.remote(num_cpus=1, max_retries=0)(warm_imports)
    for _ in range(max(1, int(ray.cluster_resources().get("CPU", 1)))):
        warm.remote()


_started_here = False


def plan_while_ray_starts(planned: Callable[[], T], address: str | None) -> T:
    """planned() on a helper thread while this thread starts (or joins) Ray and warms its
    workers: Ray's start (GCS, raylet, agents, workers: seconds) overlaps the plan's header reads
    (local files for `analyze`, Hub byte ranges for a crawl) instead of following them. Ray stays
    on the calling thread (the processes it starts are tied to the thread that started them). A
    planning error is raised first, as without the overlap; a Ctrl-C does not wait for the plan."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zs-plan")
    future = pool.submit(planned)
    try:
        ensure_ray(address)
        warm_workers()
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    except Exception:
        future.result()  # the plan's own error, if it has one, comes first
        raise
    finally:
        pool.shutdown(wait=False)
    return future.result()


def started_local_ray() -> bool:
    """Whether ensure_ray started a private local Ray in this process (rather than joining one)."""
    return _started_here


class _Drop(logging.Filter):
    """Drops the log records whose message contains `text`."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> str:
    """Join `address` (a cluster) or start a private local Ray once; reuse an initialised one.
    Returns which cluster this process is on, for the run summary and manifest.

    No address (and no RAY_ADDRESS) starts a new local instance even when a cluster started with
    `ray start` runs on this machine: Ray's own default would join that cluster silently."""
    global _started_here
    import ray

    address = address or os.environ.get("RAY_ADDRESS")  # set inside a Ray Job: join its cluster
    if ray.is_initialized():  # started earlier in this process (api.analyze), or by the caller
        return _cluster_name(address, started=_started_here and not address)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict = dict(logging_level=logging.WARNING, log_to_driver=True, configure_logging=False)
    if not address:
        # Ray protects a new local cluster with a token of its own (~/.ray/auth_token) and says
        # so on every start; this private cluster lives and dies with the run: not news to print
        notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
        quiet = _Drop("Token authentication is enabled for this Ray cluster")
        notice.addFilter(quiet)
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
        finally:
            notice.removeFilter(quiet)
        _started_here = True
        return _cluster_name(None, started=True)
    probe_address(address)
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as err:  # the port answered but Ray did not let this driver in
        raise ClusterUnreachableError(f"cannot join the Ray cluster at {address}: {err} ({AUTH_HINT})",
                                      address=address) from err
    return _cluster_name(address, started=False)


def _cluster_name(address: str | None, started: bool) -> str:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    where = "local Ray started by this run" if started else f"Ray cluster at {address or 'this process'}"
    cpus = int(ray.cluster_resources().get("CPU", 0))
    return f"{where} ({len(nodes)} node{'s' if len(nodes) != 1 else ''}, {cpus} CPUs)"


def _task_device() -> str:
    """'cuda' when Ray gave this task a GPU and torch can use one; otherwise 'cpu' (a node that
    advertises GPUs without a usable CUDA, e.g. a custom resource count, must not fail units)."""
    import ray

    if not ray.get_gpu_ids():
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"  # Ray sets CUDA_VISIBLE_DEVICES for this worker
    log.warning("Ray assigned GPU %s to this task but torch sees no CUDA device; running on the CPU",
                ray.get_gpu_ids())
    return "cpu"


def _ray_task():
    """The remote function, built lazily so importing this module does not import Ray."""
    import ray

    @ray.remote(max_retries=3, retry_exceptions=False)
    def analyze_unit(unit: WorkUnit, cfg: AnalysisConfig, run_id: str, root: str, cache: str,
                     *after: BaseOutcome) -> UnitOutcome:
        # `after`: the tensor's prepare_base result; Ray starts this task only once it exists
        outcome = process_unit(unit, cfg, run_id, root, device=_task_device(), base_cache=cache)
        outcome.node = ray.get_runtime_context().get_node_id()
        return outcome

    return analyze_unit


def _ray_base_task():
    import ray

    @ray.remote(max_retries=3, retry_exceptions=False)
    def prepare(unit: WorkUnit, cfg: AnalysisConfig, cache: str, run_id: str) -> BaseOutcome:
        return prepare_base(unit.base, unit.tensor, unit.transpose_w0, cfg, _task_device(), cache, run_id)

    return prepare


def run_plan(
    plan: Plan,
    results_root: str,
    *,
    run_id: str | None = None,
    executor: Executor = "ray",
    address: str | None = None,
    max_in_flight: int | None = None,
    gpus_per_task: float | None = None,
    device: str = "auto",
    command: str = "",
    on_progress: Callable[[int, int, UnitOutcome], None] | None = None,
    base_cache: str | None = None,
) -> RunSummary:
    """Execute every unit not yet committed under `results_root`; write the run manifest.

    `base_cache`: where base decompositions are stored and shared (default RESULTS/bases)."""
    from .store import ResultsStore

    if max_in_flight is not None and (not isinstance(max_in_flight, int) or max_in_flight < 1):
        # 0 or less would never submit a task and wait forever
        raise ConfigError(f"--max-in-flight must be an integer >= 1, got {max_in_flight!r}",
                          option="max_in_flight")
    store = ResultsStore(results_root)
    # absolute (local) or the URI: Ray workers need not share the driver's working directory
    cache = BaseCache(base_cache or default_base_cache(results_root)).uri
    run_id = run_id or new_run_id()
    store.start_run(run_id, plan.config.to_json(), command)
    if plan.models:
        store.write_models([dict(m, run_id=run_id) for m in plan.models])
    if plan.errors:
        store.write_errors(run_id, "plan", [dict(e, run_id=run_id, unit_id="plan") for e in plan.errors])

    # A damaged unit is not done (done_pairs() left its pairs in the plan), but its folder would
    # block the recommit: move it to quarantine/ first. Full checksums: repair(), before planning.
    if plan.units:  # nothing to commit (a no-op crawl): no unit folder needs reading
        store.quarantine_known_damage()
    done = store.done_units() if plan.units else set()
    todo = [u for u in plan.units if u.unit_id not in done]
    summary = RunSummary(run_id, n_units=len(plan.units), n_skipped=len(plan.units) - len(todo),
                         n_plan_errors=len(plan.errors))
    t0 = time.perf_counter()
    status = "failed"
    try:
        if executor == "local":
            summary.cluster = "in-process (--local, no Ray)"
            outcomes = _run_local(todo, plan.config, run_id, results_root, device, cache)
        else:
            outcomes = _run_ray(todo, plan.config, run_id, results_root, address, max_in_flight,
                                gpus_per_task, cache, summary)
        i, solo = 0, _solo_units(todo)
        for outcome in outcomes:
            if isinstance(outcome, BaseOutcome):
                _tally_base(summary, outcome)
                continue
            i += 1
            _tally(summary, outcome)
            if outcome.unit_id in solo:  # no prepare task ran for its tensor: the unit's own load
                summary.base_svd_reused += outcome.base_svd_loaded
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
                   "n_solver_fallbacks": summary.n_solver_fallbacks,
                   "base_svd_computed": summary.base_svd_computed,
                   "base_svd_reused": summary.base_svd_reused, "base_cache": cache,
                   "n_nodes": summary.n_nodes, "cluster": summary.cluster},
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
    if o.node and o.status != "skipped":
        summary.nodes.add(o.node)
    summary.peak_rss_mb = max(summary.peak_rss_mb, o.peak_rss_mb)
    summary.n_solver_fallbacks += o.n_solver_fallbacks
    summary.base_svd_computed += o.base_svd_computed   # only when the store had no valid copy


def _tally_base(summary: RunSummary, o: BaseOutcome) -> None:
    if o.how == "computed":
        summary.base_svd_computed += 1
    elif o.how == "reused":
        summary.base_svd_reused += 1
    else:  # the tensor's units meet the same failure and write it as their error rows
        log.warning("base decomposition of %s failed: %s", o.tensor, o.error)


def _solo_units(units: list[WorkUnit]) -> set[str]:
    """Units that are the only one of their tensor: they obtain the base themselves (a separate
    decomposition task would only read W0 a second time, on another worker)."""
    count = Counter(base_key(u) for u in units)
    return {u.unit_id for u in units if count[base_key(u)] == 1}


def _cost(unit: WorkUnit) -> float:
    """A unit's work, roughly: the base SVD (m n p) plus, per member, a reduced solve on blocks of
    ~200 columns of length max(m, n). Only its order matters: largest first."""
    m, n = unit.shape
    return m * n * min(m, n) + len(unit.members) * max(m, n) * 4e4


def _schedule(units: list[WorkUnit]) -> list[tuple[str, WorkUnit]]:
    """("base", first unit of a tensor) ahead of that tensor's ("unit", u) entries: one base
    decomposition per touched tensor (plan.base_tensors) of two or more units, each before the
    first of its units; a tensor's only unit decomposes (or loads) its base itself. The largest
    units go first (_cost), so the run does not end waiting on one big unit started last while
    the other workers idle."""
    solo = _solo_units(units)
    todo = set(base_tensors([u for u in units if u.unit_id not in solo]))
    out: list[tuple[str, WorkUnit]] = []
    for u in sorted(units, key=_cost, reverse=True):
        key = base_key(u)
        if key in todo:
            todo.discard(key)
            out.append(("base", u))
        out.append(("unit", u))
    return out


def _run_local(units, cfg, run_id, root, device: str, cache: str):
    """In-process executor: no Ray start, no worker imports (the same unit code as the Ray path).
    On the CPU, units run side by side on one thread per core, each on one BLAS thread, as Ray's
    one-CPU workers would; on a GPU, or with one core, one after another."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    schedule = _schedule(list(units))
    threads = torch.get_num_threads() if device == "cpu" else 1
    if threads <= 1 or sum(kind == "unit" for kind, _ in schedule) <= 1:
        for kind, u in schedule:
            yield _local_step(kind, u, cfg, run_id, root, device, cache)
        return
    yield from _run_threads(schedule, threads, cfg, run_id, root, device, cache)


def _local_step(kind: str, u: WorkUnit, cfg, run_id, root, device: str, cache: str):
    if kind == "base":
        return prepare_base(u.base, u.tensor, u.transpose_w0, cfg, device, cache, run_id)
    outcome = process_unit(u, cfg, run_id, root, device=device, base_cache=cache)
    outcome.node = "local"
    return outcome


def _run_threads(schedule, threads: int, cfg, run_id, root, device: str, cache: str):
    """_run_local's units on `threads` threads. A unit waits for its tensor's base task, which
    was submitted before it (first in, first out: it has started by then, so no deadlock)."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    import torch

    torch.set_num_threads(1)  # the process's BLAS pool: each thread runs its unit on one core
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="zs-unit")
    try:
        base_futures: dict = {}
        pending: dict = {}

        def unit_after(u: WorkUnit, base_future):
            if base_future is not None:
                base_future.result()   # never raises: prepare_base reports failures
            return _local_step("unit", u, cfg, run_id, root, device, cache)

        for kind, u in schedule:
            if kind == "base":
                fut = pool.submit(_local_step, "base", u, cfg, run_id, root, device, cache)
                base_futures[base_key(u)] = fut
            else:
                fut = pool.submit(unit_after, u, base_futures.get(base_key(u)))
            pending[fut] = (kind, u)
        while pending:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in done:
                kind, u = pending.pop(fut)
                try:
                    yield fut.result()
                except Exception as err:  # noqa: BLE001 - an error row, the run goes on
                    if kind == "base":
                        yield BaseOutcome(u.tensor, "failed", error=redact(f"{type(err).__name__}: {err}"))
                    else:
                        yield _task_failure(u, err, run_id, root)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        torch.set_num_threads(threads)


def _run_ray(units, cfg, run_id, root, address, max_in_flight, gpus_per_task, cache: str,
             summary: RunSummary):
    import ray

    if not units:  # nothing to do: no cluster to start or join
        return
    summary.cluster = ensure_ray(address)
    task, base_task = _ray_task(), _ray_base_task()
    n_gpus = ray.cluster_resources().get("GPU", 0)
    if gpus_per_task is None:
        gpus_per_task = 0.25 if n_gpus else 0  # several units share a GPU (one CUDA context per worker)
    opts = {"num_gpus": gpus_per_task} if gpus_per_task else {}
    max_in_flight = max_in_flight or max(2, int(ray.cluster_resources().get("CPU", 1)) * 2)
    cfg_ref = ray.put(cfg)
    # Base decompositions count against the in-flight bound too: at most that many W0 SVDs are
    # held by workers at once, and none go through the object store (tasks return outcomes).
    pending: dict = {}
    queue = _schedule(list(units))
    base_refs: dict = {}          # base_key -> its prepare task, which its units wait on
    while queue or pending:
        while queue and len(pending) < max_in_flight:
            kind, u = queue.pop(0)
            key = base_key(u)
            if kind == "base":
                base_refs[key] = base_task.options(**opts).remote(u, cfg_ref, cache, run_id)
                pending[base_refs[key]] = (kind, u)
            else:
                after = [base_refs[key]] if key in base_refs else []
                ref = task.options(**opts).remote(u, cfg_ref, run_id, root, cache, *after)
                pending[ref] = (kind, u)
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            kind, unit = pending.pop(ref)
            try:
                yield ray.get(ref)
            except Exception as err:  # task failed past its retries: an error row, the run goes on
                if kind == "base":
                    yield BaseOutcome(unit.tensor, "failed", error=redact(f"{type(err).__name__}: {err}"))
                else:
                    yield _task_failure(unit, err, run_id, root)


def _task_failure(unit: WorkUnit, err: Exception, run_id: str, root: str) -> UnitOutcome:
    from .store import ResultsStore

    # the same redacted, capped row as every other stage: a Ray traceback quotes whatever the
    # worker saw, tokens included
    rows = [dict(error_row("execute", err, model=m, tensor=unit.tensor), run_id=run_id,
                 unit_id=unit.unit_id) for m in unit.members]
    ResultsStore(root).write_errors(run_id, unit.unit_id, rows)
    return UnitOutcome(unit.unit_id, "failed", n_failed=len(rows), errors=rows)
