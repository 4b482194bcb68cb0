"""What the terminal shows: untrusted text printed literally, and a run with its plan summary,
progress bar and run summary (used by the CLI and the demo)."""
from __future__ import annotations

import shlex
import sys
from typing import TYPE_CHECKING

from rich.console import Console

from .api import analyze as run
from .config import AnalysisConfig

if TYPE_CHECKING:
    from .io.refs import ModelRef
    from .run.execute import Executor, RunSummary
    from .run.plan import Plan
    from .run.unit import UnitOutcome

console = Console(stderr=True)


def esc(x: object) -> str:
    """Untrusted text (model ids, messages) printed literally, never as rich markup."""
    from rich.markup import escape

    return escape(str(x))


def run_analysis(base_ref: ModelRef | None, refs: list[ModelRef], cfg: AnalysisConfig, out: str, *,
                 batch_size: int = 32,
                 address: str | None = None, executor: Executor = "ray",
                 max_in_flight: int | None = None, quiet: bool = False, device: str = "auto",
                 base_cache: str | None = None) -> RunSummary:
    """zoospectra.analyze with the CLI's plan summary, progress bar and run summary. Without
    `base_ref`, each artifact's base is the one its config names (grouped by base)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("[bold blue]analyse"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), console=console, disable=quiet, transient=False,
    )
    with progress:
        bar = progress.add_task("units", total=None)

        def show_plan(plan: Plan) -> None:
            progress.update(bar, total=len(plan.units), completed=0)
            if quiet:
                return
            progress.console.print(
                f"[bold]plan[/]: {len(plan.models)} artifacts on {len(plan.bases)} base(s), {len(plan.units)} units, "
                f"{plan.n_pairs} (artifact, matrix) pairs to analyse, {plan.skipped_pairs} already done, "
                f"{len(plan.errors)} planning errors"
            )
            for e in plan.errors:
                progress.console.print(f"  [red]{esc(e['error_type'])}[/] {esc(e['model_id'])}: {esc(e['message'])}")
            for m in plan.models:  # recorded in models.warnings too
                for w in m.get("warnings") or ():
                    progress.console.print(f"  [yellow]warning[/] {esc(m['model_id'])}: {esc(w)}")

        def quarantined(moved: dict) -> None:
            progress.console.print(f"[yellow]quarantined[/] {esc(moved['unit'])} -> {esc(moved['to'])}: "
                                   f"{esc('; '.join(moved['problems']))}")

        def tick(i: int, n: int, outcome: UnitOutcome) -> None:
            progress.update(bar, total=n, completed=i)
            for e in outcome.errors:
                progress.console.print(f"  [red]{esc(e['error_type'])}[/] {esc(e.get('model_id'))} "
                                       f"{esc(e.get('tensor'))}: {esc(e['message'])}")

        summary = run(refs, base=base_ref, out=out, config=cfg, batch_size=batch_size,
                      executor=executor, address=address, max_in_flight=max_in_flight,
                      command=shlex.join(sys.argv), on_plan=show_plan, on_progress=tick, on_quarantine=quarantined,
                      device=device, base_cache=base_cache)
    if not quiet:
        console.print(
            f"[bold]run {summary.run_id}[/]: {summary.n_done} units done, {summary.n_skipped} skipped, "
            f"{summary.n_failed} failed, {summary.n_member_errors + summary.n_plan_errors} error rows "
            f"in {summary.seconds:.1f}s on {summary.devices or 'nothing'} "
            f"(worker peak RSS {summary.peak_rss_mb:.0f} MiB; base SVDs {summary.base_svd_computed} "
            f"computed, {summary.base_svd_reused} reused) -> {esc(out)}"
        )
        if summary.cluster:
            console.print(f"  ran on {esc(summary.cluster)}; units ran on {summary.n_nodes} node(s)")
        if summary.n_solver_fallbacks:  # once per run, not a line per unit
            console.print(f"  note: {summary.n_solver_fallbacks} fast-engine solves fell back to a dense "
                          "SVD (results exact, only slower); counted in runs.n_solver_fallbacks")
    return summary
