"""A crawl: for each base model, discover its adapters (and full fine-tunes) on the Hub, pin
them, write the catalog, then plan and execute (on the cluster at `ray_address`, else a local Ray).

Incremental by construction: a (repo, sha) whose matrices are already in the results root plans
to nothing; a new commit is a new ModelRef and is analysed. Per-repo failures become `errors`
rows; the crawl still completes. Driven by `zoospectra.crawl` (api.py), which the CLI and the
Ray Jobs entrypoint (jobs/entrypoint.py) wrap.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from ..errors import HubError, ZoospectraError, error_row
from ..io.hub import HubFileSource, HubOptions, discover, pin, pinned_ref, weights_file
from ..io.refs import ModelRef, hub_ref
from .compact import maybe_compact
from .execute import Executor, new_run_id, run_plan
from .plan import build_plan
from .store import ResultsStore

if TYPE_CHECKING:
    from ..jobs.spec import CrawlSpec

log = logging.getLogger("zoospectra.crawl")


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
    """One crawl: discovery + catalog + plan + execute, one run per base model.
    on_progress(i, n, label) after each discovered repo is checked."""
    summary = CrawlSummary(spec.name)
    for base in spec.base_models:
        summary.bases.append(_crawl_base(spec, base, options or spec.hub, executor, command, on_progress))
    maybe_compact(spec.out, spec.compact_after_files)  # many small unit files -> a few large ones
    return summary


def _crawl_base(spec: CrawlSpec, base: str, options: HubOptions, executor: Executor,
                command: str, on_progress: Callable[[int, int, str], None] | None = None) -> BaseCrawl:
    store = ResultsStore(spec.out)
    store.repair()  # damaged units go to quarantine/ (recorded in _verify.json) and are recomputed
    run_id = new_run_id()
    found = discover([base], include_full=spec.include_full, limit=spec.limit, options=options,
                     on_progress=on_progress)
    report = BaseCrawl(base, run_id, discovered=len(found.entries), discovery_errors=len(found.errors))
    errors = list(found.errors)
    try:
        report.base_sha = pin(base, options=options)
        # One HEAD on the base's weights: a gated/unreadable base is one error row for the base,
        # not one per adapter when the planner first touches its header.
        base_source = HubFileSource(base, report.base_sha, options)
        base_source.check_access(weights_file(base_source))
        # The options ride on every ref: planner and Ray workers read the Hub the same way.
        base_ref = ModelRef(model_id=base, revision=report.base_sha, location=base, source="hub",
                            hub_options=options)
        plan = build_plan(base_ref, [hub_ref(e.repo_id, e.sha, options) for e in found.entries], spec.analysis,
                          batch_size=spec.batch_size, done_pairs=store.done_pairs(), run_id=run_id)
    except (HubError, ZoospectraError) as err:  # the base itself is unreadable: nothing to plan
        errors.append(error_row("plan", err, model=pinned_ref(base, report.base_sha), model_id=base))
        plan = None
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
    store.write_catalog(run_id, [e.row(run_id) for e in found.entries])
    store.write_errors(run_id, "discover", [dict(r, run_id=run_id, unit_id="discover") for r in errors])
    report.error_rows += len(errors)
    log.info("crawl %s base %s: %s", spec.name, base, asdict(report))
    return report
