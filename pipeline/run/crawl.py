"""A crawl: for each base model, discover its adapters (and full fine-tunes) on the Hub, pin
them, write the catalog, then plan and execute (on the cluster at `ray_address`, else a local Ray).
Repos found by author, search or list are one more run, each planned against the base it names.

Incremental by construction: the results root's catalog is read first, and a listed (repo, sha)
already analysed in full costs its listing entry and nothing else (no config, no weights, even
with an empty HF cache); a new commit is a new ModelRef and is analysed. Per-repo failures become `errors`
rows; the crawl still completes. Driven by `zoospectra.crawl` (api.py), which the CLI and the
Ray Jobs entrypoint (jobs/entrypoint.py) wrap.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, TypeVar

from ..errors import HubError, ZoospectraError, error_row
from ..io.hub import (
    CatalogEntry,
    Discovery,
    HubFileSource,
    HubOptions,
    discover,
    discover_sources,
    pin,
    pinned_ref,
    weights_file,
)
from ..io.refs import hub_ref
from .compact import maybe_compact
from .execute import Executor, new_run_id, plan_while_ray_starts, run_plan
from .plan import Plan, build_plan
from .store import ResultsStore

if TYPE_CHECKING:
    from ..jobs.spec import CrawlSpec

log = logging.getLogger("zoospectra.crawl")
T = TypeVar("T")


@dataclass
class BaseCrawl:
    base_model: str
    run_id: str
    base_sha: str | None = None
    discovered: int = 0
    discovery_errors: int = 0
    units: int = 0
    units_done: int = 0
    units_skipped: int = 0
    units_failed: int = 0
    error_rows: int = 0


@dataclass
class CrawlSummary:
    name: str
    bases: list[BaseCrawl] = field(default_factory=list)

    @property
    def units_done(self) -> int:
        return sum(b.units_done for b in self.bases)


def run_crawl(spec: CrawlSpec, *, options: HubOptions | None = None, executor: Executor = "ray",
              command: str = "", on_progress: Callable[[int, int, str], None] | None = None
              ) -> CrawlSummary:
    """One crawl: discovery + catalog + plan + execute, one run per base model, and one run for
    the repos found by author, search or list (grouped by the base each names).
    on_progress(i, n, label) after each discovered repo is checked."""
    summary = CrawlSummary(spec.name)
    opts = options or spec.hub
    for base in spec.base_models:
        summary.bases.append(_crawl_base(spec, base, opts, executor, command, on_progress))
    if spec.author or spec.search or spec.repos:
        summary.bases.append(_crawl_sources(spec, opts, executor, command, on_progress))
    maybe_compact(spec.out, spec.compact_after_files)  # many small unit files -> a few large ones
    return summary


def analysed(store: ResultsStore) -> dict[tuple[str, str], CatalogEntry]:
    """(repo, sha) -> catalog entry of every Hub artifact already analysed in full under the
    results root: in the catalog, with a models row whose every target has a committed pair.
    Read from the root alone, so a crawl on an empty HF cache fetches nothing for them."""
    from collections import Counter

    from ..io.identity import artifact_uid

    done = Counter(uid for uid, _ in store.done_pairs())
    targets = {r["model_uid"]: r["n_targets"] for r in store.read_rows("models", ["model_uid", "n_targets"])}
    out: dict[tuple[str, str], CatalogEntry] = {}
    for r in store.read_rows("catalog", ["repo_id", "sha", "kind", "base_model", "last_modified",
                                         "gated", "private"]):
        uid = artifact_uid("hub", r["repo_id"], r["sha"])
        if uid in targets and done[uid] >= (targets[uid] or 0):
            out[(r["repo_id"], r["sha"])] = CatalogEntry(**r)
    return out


def _crawl_base(spec: CrawlSpec, base: str, options: HubOptions, executor: Executor,
                command: str, on_progress: Callable[[int, int, str], None] | None = None) -> BaseCrawl:
    from ..io.resolve import HubSpec, hub_spec

    store = ResultsStore(spec.out)
    store.repair()  # damaged units go to quarantine/ (recorded in _verify.json) and are recomputed
    run_id = new_run_id()
    where = hub_spec(base) or HubSpec(base)  # base_models may pin a revision: org/name@rev
    found = discover([where.repo_id], include_full=spec.include_full, limit=spec.limit, options=options,
                     on_progress=on_progress, known=analysed(store))
    report = BaseCrawl(base, run_id, discovered=found.n_listed, discovery_errors=len(found.errors))
    errors = list(found.errors)
    plan: Plan | None = Plan(bases=[], config=spec.analysis, units=[], models=[])

    def planned() -> Plan | None:
        try:
            report.base_sha = pin(where.repo_id, where.revision or "main", options=options)
            # One HEAD on the base's weights: a gated/unreadable base is one error row for the base,
            # not one per adapter when the planner first touches its header.
            base_source = HubFileSource(where.repo_id, report.base_sha, options)
            base_source.check_access(weights_file(base_source))
            # The options ride on every ref: planner and Ray workers read the Hub the same way.
            base_ref = hub_ref(where.repo_id, report.base_sha, options)
            return build_plan(base_ref, [hub_ref(e.repo_id, e.sha, options) for e in found.entries],
                              spec.analysis, batch_size=spec.batch_size, done_pairs=store.done_pairs(),
                              run_id=run_id)
        except (HubError, ZoospectraError) as err:  # the base itself is unreadable: nothing to plan
            errors.append(error_row("plan", err, model=pinned_ref(where.repo_id, report.base_sha),
                                    model_id=where.repo_id))
            return None

    if found.entries:  # something new: only then is the base pinned and its header read
        plan = _planned(planned, executor, spec.ray_address)
    return _finish(spec, store, run_id, plan, found, errors, report, executor, command)


def _crawl_sources(spec: CrawlSpec, options: HubOptions, executor: Executor, command: str,
                   on_progress: Callable[[int, int, str], None] | None = None) -> BaseCrawl:
    """Repos by author, search and list: each planned against the base its config names."""
    from ..io.resolve import BaseClaim, BaseResolver
    from .plan import plan_by_base

    store = ResultsStore(spec.out)
    store.repair()
    run_id = new_run_id()
    found = discover_sources(authors=spec.author, searches=spec.search, repos=spec.repos,
                             include_full=spec.include_full, limit=spec.limit, options=options,
                             on_progress=on_progress, known=analysed(store))
    label = " ".join([*(f"author:{a}" for a in spec.author), *(f"search:{t}" for t in spec.search),
                      *([f"repos:{len(spec.repos)}"] if spec.repos else [])])
    report = BaseCrawl(label, run_id, discovered=found.n_listed, discovery_errors=len(found.errors))
    claims = {hub_ref(e.repo_id, e.sha, options): BaseClaim(e.base_model, e.base_revision,
                                                           "adapter_config.json or model card")
              for e in found.entries}
    resolver = BaseResolver(options)

    def planned() -> Plan:
        return plan_by_base(claims, spec.analysis, lambda ref: resolver.resolve(claims[ref]),
                            batch_size=spec.batch_size, done_pairs=store.done_pairs(), run_id=run_id)

    plan = _planned(planned, executor, spec.ray_address) if found.entries else planned()
    return _finish(spec, store, run_id, plan, found, list(found.errors), report, executor, command)


def _planned(planned: Callable[[], T], executor: Executor, address: str | None) -> T:
    """Plan the repos discovery found new (Hub headers: a few requests each) while Ray starts, as
    `analyze` plans its files; only when there are some, so a no-op crawl starts no Ray."""
    return plan_while_ray_starts(planned, address) if executor == "ray" else planned()


def _finish(spec: CrawlSpec, store: ResultsStore, run_id: str, plan: Plan | None, found: Discovery,
            errors: list[dict], report: BaseCrawl, executor: Executor, command: str) -> BaseCrawl:
    """Execute the plan (or record a failed run), then write the catalog and discovery errors."""
    if plan is not None:
        if not plan.units:  # nothing new on the Hub: record the run, but start no Ray for it
            executor = "local"
        result = run_plan(plan, spec.out, run_id=run_id, executor=executor,
                          address=spec.ray_address, command=command, base_cache=spec.base_cache)
        report.units, report.units_done = result.n_units, result.n_done
        report.units_skipped, report.units_failed = result.n_skipped, result.n_failed
        report.error_rows = result.n_member_errors + len(plan.errors)
    else:  # still leave a run manifest, so the failure is visible in `runs`
        store.start_run(run_id, spec.analysis.to_json(), command)
        store.finish_run(run_id, "failed", n_units=0, n_done=0, n_skipped=0, n_failed=0)
    # every repo listed this run, the already-analysed ones included (their rows carried over)
    store.write_catalog(run_id, [e.row(run_id) for e in sorted(found.entries + found.known)])
    store.write_errors(run_id, "discover", [dict(r, run_id=run_id, unit_id="discover") for r in errors])
    report.error_rows += len(errors)
    log.info("crawl %s %s: %s", spec.name, report.base_model, asdict(report))
    return report
