"""The public Python API: the one driver behind the CLI, the demo, the Ray Jobs entrypoint and
notebooks.

    import zoospectra
    run = zoospectra.analyze({"lora": "path/to/adapter", "dora": "org/dora@main"}, out="results/")
    con = zoospectra.connect("results/")
    con.sql("SELECT model_id, sum(n_intruders) FROM intruders(0.5, 10) GROUP BY ALL").df()

Heavy modules (torch, Ray, DuckDB) are imported inside the functions, so `import zoospectra`
stays cheap.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Literal, Union

from .config import AnalysisConfig

if TYPE_CHECKING:
    import duckdb

    from .io.hub import HubOptions
    from .io.refs import ModelRef
    from .jobs.spec import CrawlSpec
    from .run.crawl import CrawlSummary
    from .run.execute import RunSummary
    from .run.plan import Plan
    from .run.unit import UnitOutcome

PathLike = Union[str, "os.PathLike[str]"]
ArtifactArg = Union[PathLike, "ModelRef"]


def _ref(item: ArtifactArg, name: str | None = None, hub: HubOptions | None = None) -> ModelRef:
    """A ModelRef as given, a local directory, or a Hub reference (org/name[@rev], hf://...)
    pinned to its commit sha now."""
    from .io.refs import ModelRef
    from .io.resolve import resolve_ref

    if isinstance(item, ModelRef):
        return item
    return resolve_ref(os.fspath(item), name, hub)


def _refs(tuned: Mapping[str, ArtifactArg] | Sequence[ArtifactArg],
          hub: HubOptions | None = None) -> list[ModelRef]:
    """Artifacts as ModelRefs: a mapping gives {recorded model id: path or Hub ref}; else the
    folder name / repo id."""
    if isinstance(tuned, Mapping):
        return [_ref(path, name, hub) for name, path in tuned.items()]
    if isinstance(tuned, (str, os.PathLike)):
        return [_ref(tuned, None, hub)]
    return [_ref(item, None, hub) for item in tuned]


def analyze(
    tuned: Mapping[str, ArtifactArg] | Sequence[ArtifactArg],
    *,
    base: ArtifactArg | None = None,
    out: PathLike,
    config: AnalysisConfig | None = None,
    base_name: str | None = None,
    batch_size: int = 32,
    executor: Literal["ray", "local"] = "ray",
    address: str | None = None,
    max_in_flight: int | None = None,
    device: str = "auto",
    base_cache: str | None = None,
    command: str = "",
    on_plan: Callable[[Plan], None] | None = None,
    on_progress: Callable[[int, int, UnitOutcome], None] | None = None,
    on_quarantine: Callable[[dict], None] | None = None,
    hub: HubOptions | None = None,
) -> RunSummary:
    """Analyse fine-tuned artifacts against `base` and commit the tables under `out`.

    Artifacts and base are local directories, Hub references (`org/name`, `org/name@rev`,
    `hf://org/name@rev`, pinned to their commit sha here) or ModelRefs. Without `base`, each
    artifact's base is the one its adapter_config.json (or model card) names; artifacts are
    grouped by base in one plan, and one whose base cannot be resolved or does not fit is an
    `errors` row. `hub` sets how the Hub is reached (default: HF_ENDPOINT, the HF cache).

    Plans from headers and configs only, then runs every unit not yet committed (a rerun
    resumes and never duplicates rows). Base decompositions are stored in `base_cache`
    (default `out/bases/`) and reused by every later run. Damaged committed units (see `zoospectra verify`) are
    first moved to `out/quarantine/` and planned again; `on_quarantine` sees each move.
    `on_plan` sees the plan before execution starts; `on_progress(i, n, outcome)` is called
    after each unit.
    """
    from .io.resolve import BaseResolver
    from .run.execute import new_run_id, plan_while_ray_starts, run_plan
    from .run.plan import plan_by_base
    from .run.store import ResultsStore

    cfg = config or AnalysisConfig()
    refs = _refs(tuned, hub)
    fixed = _ref(base, base_name, hub) if base is not None else None
    root = os.fspath(out)
    store = ResultsStore(root)
    for moved in store.repair():
        if on_quarantine:
            on_quarantine(moved)
    run_id = new_run_id()
    resolver = BaseResolver(hub)
    done = store.done_pairs()

    def planned() -> Plan:
        return plan_by_base(refs, cfg, (lambda _: fixed) if fixed is not None else resolver,
                            batch_size=batch_size, done_pairs=done, run_id=run_id)

    if executor == "ray" and {r.uid for r in refs} - {uid for uid, _ in done}:
        # an artifact with nothing committed yet: units will run, so Ray starts (and its workers
        # import torch) while the plan reads headers; a rerun of finished work starts no Ray
        plan = plan_while_ray_starts(planned, address)
    else:
        plan = planned()
    if on_plan:
        on_plan(plan)
    return run_plan(plan, root, run_id=run_id, executor=executor, address=address,
                    max_in_flight=max_in_flight, command=command, on_progress=on_progress,
                    device=device, base_cache=base_cache)


def crawl(spec: CrawlSpec | Mapping | PathLike, *, options: HubOptions | None = None,
          executor: Literal["ray", "local"] = "ray", command: str = "",
          on_progress: Callable[[int, int, str], None] | None = None) -> CrawlSummary:
    """One Hub crawl: discovery, catalog, plan and execute, one run per base model.

    `spec` is a CrawlSpec, a mapping of its keys, or the path of a YAML job spec;
    `on_progress(i, n, repo)` is called as discovery checks each repo.
    """
    from .jobs.spec import CrawlSpec
    from .run.crawl import run_crawl

    if isinstance(spec, Mapping):
        spec = CrawlSpec.from_dict(dict(spec))
    elif not isinstance(spec, CrawlSpec):
        spec = CrawlSpec.load(os.fspath(spec))
    return run_crawl(spec, options=options, executor=executor, command=command, on_progress=on_progress)


def connect(root: PathLike) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection over a results root with every view and macro loaded
    (`intruders(eps, k)`, `intruder_curve(k)`, ...); use `.df()` / `.pl()` / `.arrow()` on results."""
    from .study.sql import connect as sql_connect

    return sql_connect(root)
