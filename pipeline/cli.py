"""The `zoospectra` command. Options are validated here, once, into typed config."""
from __future__ import annotations

import shlex
import sys
from typing import List, Optional

import typer
from rich.console import Console

from .config import ALL, AnalysisConfig
from .errors import ZoospectraError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="What did fine-tuning do to these weights? Spectra and intruder dimensions of model zoos.",
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def esc(x: object) -> str:
    """Untrusted text (model ids, messages) printed literally, never as rich markup."""
    from rich.markup import escape

    return escape(str(x))


def _k(value: str, name: str) -> int:
    if value.lower() == "all":
        return ALL
    try:
        return int(value)
    except ValueError:
        raise typer.BadParameter(f"{name} must be an integer or 'all', got {value!r}")


def _config(k: int, eps: float, k_store: str, k_spec: str, sim_k: int, mode: str, dtype: str,
            pairs: bool, embeddings: bool) -> AnalysisConfig:
    return AnalysisConfig(
        k=k, eps=eps, k_store=_k(k_store, "--k-store"), k_spec=_k(k_spec, "--k-spec"), sim_k=sim_k,
        mode=mode, dtype=dtype, pairs=pairs, include_embeddings=embeddings,
    )


@app.command()
def analyze(
    base: str = typer.Argument(..., help="Base checkpoint: a local directory (or a Hub id with the hub extra)."),
    tuned: List[str] = typer.Argument(..., help="Adapters / fine-tunes: local directories. NAME=PATH sets the model id."),
    out: str = typer.Option(..., "--out", "-o", help="Results root (local path or filesystem URI)."),
    base_name: Optional[str] = typer.Option(None, help="Id recorded for the base (default: directory name)."),
    k: int = typer.Option(10, help="Intruder test: top-k singular vectors of the fine-tuned matrix."),
    eps: float = typer.Option(0.5, help="Intruder test: max |cos| threshold."),
    k_store: str = typer.Option("32", help="Per-vector records kept per side ('all' for every one)."),
    k_spec: str = typer.Option("64", help="Singular values kept per spectrum ('all')."),
    sim_k: int = typer.Option(10, help="Size of the stored |U0^T Ut| similarity block."),
    mode: str = typer.Option("fast", help="fast (structured solvers, default) or exact (the paper's full SVDs, the check)."),
    dtype: str = typer.Option("float32", help="float32 or float64 for every decomposition."),
    pairs: bool = typer.Option(False, "--pairs/--no-pairs", help="Adapter-vs-adapter subspace similarity."),
    embeddings: bool = typer.Option(False, "--embeddings/--no-embeddings", help="Also analyse embedding/head matrices."),
    batch_size: int = typer.Option(32, help="Artifacts per unit of work (sharing one base SVD)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: start a local Ray)."),
    local: bool = typer.Option(False, "--local", help="Run in-process without Ray (debugging)."),
    device: str = typer.Option("auto", help="With --local: auto, cpu or cuda (Ray picks per task from its GPUs)."),
    max_in_flight: Optional[int] = typer.Option(None, help="Ray tasks in flight at once."),
    base_cache: Optional[str] = typer.Option(None, help="Where base SVDs are stored and reused (path or URI; default OUT/bases)."),
) -> None:
    """Analyse fine-tuned artifacts against their base, writing Parquet tables to --out."""
    from .io.refs import local_ref

    cfg = _config(k, eps, k_store, k_spec, sim_k, mode, dtype, pairs, embeddings)
    base_ref = local_ref(base, base_name)
    refs = []
    for spec in tuned:
        name, _, path = spec.rpartition("=") if "=" in spec else (None, "", spec)
        refs.append(local_ref(path, name or None))
    summary = run_analysis(base_ref, refs, cfg, out, batch_size=batch_size, address=address,
                           executor="local" if local else "ray", max_in_flight=max_in_flight,
                           device=device, base_cache=base_cache)
    if summary.n_failed or summary.n_member_errors or summary.n_plan_errors:
        raise typer.Exit(code=3)  # the run completed, but some artifacts became errors rows


def run_analysis(base_ref, refs, cfg: AnalysisConfig, out: str, *, batch_size: int = 32,
                 address: Optional[str] = None, executor: str = "ray",
                 max_in_flight: Optional[int] = None, quiet: bool = False, device: str = "auto",
                 base_cache: Optional[str] = None):
    """Plan + execute with a progress bar; shared by analyze, demo and crawl."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .run.execute import new_run_id, run_plan
    from .run.plan import build_plan
    from .run.store import ResultsStore

    store = ResultsStore(out)
    run_id = new_run_id()
    plan = build_plan(base_ref, refs, cfg, batch_size=batch_size, done_pairs=store.done_pairs(), run_id=run_id)
    if not quiet:
        console.print(
            f"[bold]plan[/]: {len(plan.models)} artifacts, {len(plan.units)} units, "
            f"{plan.n_pairs} (artifact, matrix) pairs to analyse, {plan.skipped_pairs} already done, "
            f"{len(plan.errors)} planning errors"
        )
        for e in plan.errors:
            console.print(f"  [red]{esc(e['error_type'])}[/] {esc(e['model_id'])}: {esc(e['message'])}")
    progress = Progress(
        TextColumn("[bold blue]analyse"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), console=console, disable=quiet, transient=False,
    )
    with progress:
        bar = progress.add_task("units", total=len(plan.units))
        progress.update(bar, completed=0)

        def tick(i: int, n: int, outcome) -> None:
            progress.update(bar, total=n, completed=i)
            for e in outcome.errors:
                progress.console.print(f"  [red]{esc(e['error_type'])}[/] {esc(e.get('model_id'))} "
                                       f"{esc(e.get('tensor'))}: {esc(e['message'])}")

        summary = run_plan(plan, out, run_id=run_id, executor=executor, address=address,
                           max_in_flight=max_in_flight, command=shlex.join(sys.argv), on_progress=tick,
                           device=device, base_cache=base_cache)
    if not quiet:
        console.print(
            f"[bold]run {summary.run_id}[/]: {summary.n_done} units done, {summary.n_skipped} skipped, "
            f"{summary.n_failed} failed, {summary.n_member_errors + len(plan.errors)} error rows "
            f"in {summary.seconds:.1f}s on {summary.devices or 'nothing'} "
            f"(worker peak RSS {summary.peak_rss_mb:.0f} MiB; base SVDs {summary.base_svd_computed} "
            f"computed, {summary.base_svd_reused} reused) -> {esc(out)}"
        )
    return summary


@app.command()
def sql(
    results: str = typer.Argument(..., help="Results root."),
    query: str = typer.Argument(..., help="SQL; views and macros such as intruders(eps, k) are loaded."),
    fmt: str = typer.Option("table", "--format", "-f", help="table, csv, json or parquet."),
    output: Optional[str] = typer.Option(None, "--output", help="Write to this file (required for parquet)."),
) -> None:
    """Run one SQL query over the results with zoospectra's views and macros."""
    from .study.sql import format_table, query as run_query

    text = format_table(run_query(results, query), fmt, output)
    if text:
        typer.echo(text)


@app.command()
def shell(results: str = typer.Argument(..., help="Results root.")) -> None:
    """Interactive DuckDB session with the views and macros loaded."""
    from .study.sql import shell as open_shell

    open_shell(results)


@app.command()
def status(results: str = typer.Argument(..., help="Results root.")) -> None:
    """Runs, units done/failed and error counts of a results root."""
    import json

    from .run.store import ResultsStore

    typer.echo(json.dumps(ResultsStore(results).status(), indent=2, default=str))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(
    ctx: typer.Context,
    address: str = typer.Option(..., help="Ray dashboard/Jobs API address, e.g. http://head:8265."),
    working_dir: str = typer.Option(".", help="Shipped to the cluster as the job's runtime_env working_dir."),
    wait: bool = typer.Option(False, "--wait/--no-wait", help="Follow the job's logs until it ends."),
) -> None:
    """Submit `zoospectra ARGS...` to a running Ray cluster through the Ray Jobs API."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    args = list(ctx.args)
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        raise typer.BadParameter("give the zoospectra command to run after --, e.g. -- analyze BASE A --out R")
    client = JobSubmissionClient(address)
    job_id = client.submit_job(
        entrypoint=shlex.join(["python", "-m", "zoospectra.cli", *args]),
        runtime_env={"working_dir": working_dir, "excludes": [".venv", ".git", "results"]},
    )
    typer.echo(job_id)
    if wait:
        import asyncio

        async def follow() -> None:
            async for lines in client.tail_job_logs(job_id):
                sys.stderr.write(lines)

        asyncio.run(follow())
        if client.get_job_status(job_id) != JobStatus.SUCCEEDED:
            raise typer.Exit(code=1)


@app.command()
def crawl(
    base_model: List[str] = typer.Option(..., "--base-model", help="Hub id of a base model (repeatable)."),
    out: str = typer.Option(..., "--out", "-o", help="Results root."),
    limit: Optional[int] = typer.Option(None, help="At most N repos per base model and kind."),
    include: List[str] = typer.Option([], "--include", help="'full': also full fine-tunes with safetensors weights."),
    name: str = typer.Option("adhoc-crawl", help="Crawl name (recorded in logs and manifests)."),
    mode: str = typer.Option("fast", help="fast (default) or exact (the paper's full SVDs)."),
    k_store: str = typer.Option("32", help="Per-vector records kept per side ('all')."),
    batch_size: int = typer.Option(32, help="Artifacts per unit of work."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: local Ray)."),
    local: bool = typer.Option(False, "--local", help="Run in-process without Ray (debugging)."),
    spec: Optional[str] = typer.Option(None, help="A YAML job spec instead of the flags above."),
) -> None:
    """Discover adapters / fine-tunes of base models on the Hub and analyse what is new."""
    import json
    from dataclasses import asdict

    from .jobs.entrypoint import run_crawl
    from .jobs.spec import CrawlSpec

    bad = [i for i in include if i != "full"]
    if bad:
        raise typer.BadParameter(f"--include takes only 'full', got {bad}")
    if spec:
        crawl_spec = CrawlSpec.load(spec)
    else:
        crawl_spec = CrawlSpec.from_dict({
            "name": name, "base_models": list(base_model), "out": out, "limit": limit,
            "include_full": "full" in include, "batch_size": batch_size, "ray_address": address,
            "analysis": {"mode": mode, "k_store": _k(k_store, "--k-store")},
        })
    summary = run_crawl(crawl_spec, executor="local" if local else "ray", command=shlex.join(sys.argv))
    typer.echo(json.dumps({"name": summary.name, "bases": [asdict(b) for b in summary.bases]}, indent=2))


@app.command()
def demo(
    out: str = typer.Option("results/demo", help="Results root for the demo."),
    cache: str = typer.Option(".zoospectra-cache/zoo", help="Where the sample zoo is built and cached."),
    steps: int = typer.Option(0, help="Training steps per artifact (0: the demo's default)."),
) -> None:
    """Offline demo: build a sample zoo on all-MiniLM-L6-v2, analyse it on local Ray, summarise."""
    from .demo.run import run_demo

    run_demo(out=out, cache=cache, steps=steps or None)


# --- studies, report, mitigation (pipeline/studies.py, report.py, mitigate.py) ---------------
def _scope(base_model: Optional[str], kinds: Optional[List[str]]):
    from .study.studies import Scope

    return Scope(base=base_model, kinds=tuple(kinds or ()))


@app.command()
def report(
    results: str = typer.Argument(..., help="Results root."),
    out: str = typer.Option(..., "--out", "-o", help="Directory for index.html (self-contained)."),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="Only models of this base (id or uid)."),
    kinds: Optional[List[str]] = typer.Option(None, "--kind", help="Only these kinds (repeat: --kind lora --kind full)."),
) -> None:
    """Every study as one offline HTML page: figures, summary tables and the SQL behind each."""
    from .study.report import build_report

    typer.echo(str(build_report(results, out, _scope(base_model, kinds))))


@app.command()
def plot(
    results: str = typer.Argument(..., help="Results root."),
    study: str = typer.Argument(..., help="Study name (zoospectra plot RESULTS list: all of them)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output .png or .svg (default: STUDY.png)."),
    param: Optional[List[str]] = typer.Option(None, "--param", "-p", help="Study parameter NAME=VALUE (repeatable)."),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="Only models of this base (id or uid)."),
    kinds: Optional[List[str]] = typer.Option(None, "--kind", help="Only these kinds (repeatable)."),
) -> None:
    """One study's figure as PNG or SVG."""
    from .study.studies import STUDIES, parse_param, save_plot

    if study == "list":
        for s in STUDIES.values():
            typer.echo(f"{s.name:20s} {s.title} ({s.figure}); params: "
                       + (", ".join(f"{k}={v}" for k, v in s.defaults) or "none"))
        return
    overrides = dict(parse_param(p) for p in param or [])
    typer.echo(str(save_plot(results, study, out or f"{study}.png", overrides, _scope(base_model, kinds))))


@app.command()
def mitigate(
    adapter: str = typer.Argument(..., help="PEFT LoRA adapter directory."),
    out: str = typer.Option(..., "--out", "-o", help="Directory for the mitigated adapter."),
    lam: float = typer.Option(0.75, "--lam", help="Factor for the intruder singular values (PEFT's mitigation_lambda)."),
    k: int = typer.Option(10, help="Top-k singular vectors tested (PEFT's top_k)."),
    eps: float = typer.Option(0.5, help="Intruder threshold on max |cos| (PEFT's threshold_epsilon)."),
    base: Optional[str] = typer.Option(None, help="Base checkpoint directory (default: the adapter's base_model_name_or_path)."),
    dtype: str = typer.Option("float32", help="float32 (as PEFT) or float64 for the decompositions."),
) -> None:
    """Scale intruder dimensions by --lam and write a new PEFT adapter (PEFT's reduce_intruder_dimension)."""
    from .mitigate import MitigationParams, mitigate_adapter

    result = mitigate_adapter(adapter, out, MitigationParams(lam=lam, k=k, eps=eps, dtype=dtype), base=base)
    hit = sum(1 for m in result.matrices if m.intruders)
    console.print(f"[bold]mitigate[/]: {result.n_intruders} intruders in {hit} of "
                  f"{len(result.matrices)} matrices scaled by {lam} -> {esc(out)}")


def main() -> None:
    try:
        app()
    except ZoospectraError as err:
        console.print(f"[red]error[/] ({err.kind}): {esc(err)}")
        sys.exit(2)


if __name__ == "__main__":
    main()
