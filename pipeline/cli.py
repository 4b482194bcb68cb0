"""The `zoospectra` command. Options are validated here, once, into typed config."""
from __future__ import annotations

import shlex
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING, cast

import typer

from .config import ALL, AnalysisConfig
from .console import console, esc, run_analysis
from .errors import ConfigError, ZoospectraError

if TYPE_CHECKING:
    from .config import Dtype, Mode
    from .study.sql import Format

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="What did fine-tuning do to these weights? Spectra and intruder dimensions of model zoos.",
    pretty_exceptions_enable=False,
)
_D = AnalysisConfig()  # every analysis option's default comes from the config, nowhere else


def _kstr(k: int) -> str:
    return "all" if k == ALL else str(k)


def _k(value: str, name: str) -> int:
    if value.lower() == "all":
        return ALL
    try:
        return int(value)
    except ValueError:
        raise typer.BadParameter(f"{name} must be an integer or 'all', got {value!r}") from None


DEVICES = ("auto", "cpu", "cuda")


def _check_positive(value: int | None, option: str) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{option} must be >= 1, got {value}", option=option)


def _check_device(device: str) -> None:
    """One of DEVICES, and a GPU present when cuda is asked for."""
    if device not in DEVICES:
        raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}", option="device")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA GPU is visible to torch on this machine; use "
                              "--device cpu or auto", option="device")


def parse_tuned(specs: list[str]) -> list[tuple[str | None, str]]:
    """(name or None, ref) per NAME=REF / REF argument (REF: a path or a Hub reference). An
    existing path is taken whole even when it contains '='; otherwise NAME is everything before
    the first '=' (paths may hold '=', names and Hub refs may not)."""
    import os

    out: list[tuple[str | None, str]] = []
    for spec in specs:
        if os.path.exists(spec) or "=" not in spec:
            out.append((None, spec))
            continue
        name, _, path = spec.partition("=")
        if not name or not path:
            raise ConfigError(f"{spec!r}: NAME=REF needs both a name and a path or Hub reference",
                              option="tuned")
        out.append((name, path))
    return out


def _check_unique(refs) -> None:
    seen: dict[str, str] = {}
    for ref in refs:
        if ref.model_id in seen and seen[ref.model_id] != ref.location:
            raise ConfigError(
                f"two artifacts have the name {ref.model_id!r} ({seen[ref.model_id]} and {ref.location}); "
                "give each its own NAME=REF", option="tuned", name=ref.model_id)
        seen[ref.model_id] = ref.location


def _config(k: int, eps: float, k_store: str, k_spec: str, sim_k: int, mode: str, dtype: str,
            pairs: bool, embeddings: bool, null_draws: int = _D.null_draws) -> AnalysisConfig:
    return AnalysisConfig(
        k=k, eps=eps, k_store=_k(k_store, "--k-store"), k_spec=_k(k_spec, "--k-spec"), sim_k=sim_k,
        # typer hands over plain strings; AnalysisConfig.__post_init__ refuses any other value
        mode=cast("Mode", mode), dtype=cast("Dtype", dtype), pairs=pairs, include_embeddings=embeddings,
        null_draws=null_draws,
    )


@app.command()
def analyze(
    tuned: list[str] = typer.Argument(..., help="Adapters / fine-tunes: local directories or Hub references "
                                                "(org/name, org/name@revision, hf://org/name@revision). "
                                                "NAME=REF sets the model id."),
    out: str = typer.Option(..., "--out", "-o", help="Results root (local path or filesystem URI)."),
    base: str | None = typer.Option(None, "--base", help="Base checkpoint for every artifact: a directory or a Hub "
                                                         "reference (default: the base each adapter_config.json "
                                                         "or model card names); bitsandbytes 4/8-bit and .gguf "
                                                         "bases are dequantised per tensor."),
    base_name: str | None = typer.Option(None, help="Id recorded for --base (default: directory name / repo id)."),
    k: int = typer.Option(_D.k, help="Intruder test: top-k singular vectors of the fine-tuned matrix."),
    eps: float = typer.Option(_D.eps, help="Intruder test: max |cos| threshold."),
    k_store: str = typer.Option(_kstr(_D.k_store), help="Per-vector records kept per side ('all' for every one)."),
    k_spec: str = typer.Option(_kstr(_D.k_spec), help="Singular values kept per spectrum ('all')."),
    sim_k: int = typer.Option(_D.sim_k, help="Size of the stored |U0^T Ut| similarity block."),
    mode: str = typer.Option(_D.mode, help="fast (structured solvers, default) or "
                                           "exact (the paper's full SVDs, the check)."),
    dtype: str = typer.Option(_D.dtype, help="float32 or float64 for every decomposition and every update."),
    pairs: bool = typer.Option(_D.pairs, "--pairs/--no-pairs", help="Adapter-vs-adapter subspace similarity."),
    embeddings: bool = typer.Option(_D.include_embeddings, "--embeddings/--no-embeddings",
                                    help="Also analyse embedding/head matrices."),
    null_draws: int = typer.Option(_D.null_draws, help="Random-direction null draws per matrix "
                                   "(0 = off; each costs about one more solve per matrix)."),
    batch_size: int = typer.Option(32, help="Artifacts per unit of work (sharing one base SVD)."),
    address: str | None = typer.Option(None, help="Ray cluster address (default: start a local Ray)."),
    local: bool = typer.Option(False, "--local", help="Run in-process without Ray (debugging)."),
    device: str = typer.Option("auto", help="With --local: auto, cpu or cuda (Ray picks per task from its GPUs)."),
    max_in_flight: int | None = typer.Option(None, help="Ray tasks in flight at once."),
    base_cache: str | None = typer.Option(None, help="Where base SVDs are stored and reused "
                                                     "(path or URI; default OUT/bases)."),
) -> None:
    """Analyse fine-tuned artifacts against their base, writing Parquet tables to --out."""
    from .io.resolve import resolve_ref
    from .outputs import claim_results_root
    from .run.execute import probe_address

    # everything checked before Ray starts or a header is read
    cfg = _config(k, eps, k_store, k_spec, sim_k, mode, dtype, pairs, embeddings, null_draws)
    _check_positive(batch_size, "--batch-size")
    _check_positive(max_in_flight, "--max-in-flight")
    _check_device(device)
    pairs_ = parse_tuned(tuned)
    if base_name and not base:
        raise ConfigError("--base-name names the --base: give --base too", option="base_name")
    base_ref = resolve_ref(base, base_name) if base else None  # Hub refs: pinned to their sha here
    refs = [resolve_ref(path, name) for name, path in pairs_]
    _check_unique(refs)
    locals_ = [r.location for r in (base_ref, *refs) if r is not None and r.source == "local"]
    claim_results_root(out, inputs=locals_)
    if address and not local:
        probe_address(address)
    summary = run_analysis(base_ref, refs, cfg, out, batch_size=batch_size, address=address,
                           executor="local" if local else "ray", max_in_flight=max_in_flight,
                           device=device, base_cache=base_cache)
    if summary.n_failed or summary.n_member_errors or summary.n_plan_errors:
        raise typer.Exit(code=3)  # the run completed, but some artifacts became errors rows


@app.command()
def sql(
    results: str = typer.Argument(..., help="Results root."),
    query: str = typer.Argument(..., help="SQL; views and macros such as intruders(eps, k) are loaded."),
    fmt: str = typer.Option("table", "--format", "-f", help="table, csv, json or parquet."),
    output: str | None = typer.Option(None, "--output", help="Write to this file (required for parquet)."),
) -> None:
    """Run one SQL query over the results with zoospectra's views and macros."""
    from .outputs import claim_file, require_results_root
    from .study.sql import format_table
    from .study.sql import query as run_query

    require_results_root(results)
    if output:
        claim_file(output, "sql", inputs=[results], option="--output")
    # a plain string from typer; format_table refuses unknown formats (ConfigError)
    text = format_table(run_query(results, query), cast("Format", fmt), output)
    if text:
        typer.echo(text)


@app.command()
def shell(results: str = typer.Argument(..., help="Results root.")) -> None:
    """Interactive DuckDB session with the views and macros loaded."""
    from .outputs import require_results_root
    from .study.sql import shell as open_shell

    require_results_root(results)
    open_shell(results)


@app.command()
def status(results: str = typer.Argument(..., help="Results root.")) -> None:
    """Runs, units done/failed and error counts of a results root."""
    import json

    from .outputs import require_results_root
    from .run.store import ResultsStore

    require_results_root(results)
    typer.echo(json.dumps(ResultsStore(results).status(), indent=2, default=str))


VERIFY_DAMAGED = 4  # `verify` found damage (distinct from 1 runtime failure, 2 invalid input)


@app.command()
def verify(
    results: str = typer.Argument(..., help="Results root."),
    as_json: bool = typer.Option(False, "--json", help="Print the full record (as kept in _verify.json)."),
    rebuild_index: bool = typer.Option(False, "--rebuild-index",
                                       help="Rewrite done-index entries that disagree with their units."),
) -> None:
    """Check every committed unit: files present, sizes, sha256 checksums, row counts, unit ids;
    every compacted file (checksums, rows per unit) and the done index against the units.

    Exit 0: healthy. Exit 4: damage found (each unit is named with what is wrong).
    """
    import json

    from .run.store import ResultsStore

    record = ResultsStore(results).verify(rebuild_index=rebuild_index)
    if as_json:
        typer.echo(json.dumps(record, indent=1))
    else:
        typer.echo(_verify_text(record))
    if not record["healthy"]:
        raise typer.Exit(code=VERIFY_DAMAGED)


def _verify_text(record: dict) -> str:
    """One line per finding: the unit folder, what is wrong, and what to do."""
    from .run.integrity import REMEDY

    lines = [f"verify: {record['units_checked']} entries in units/, {record['units_ok']} committed units ok "
             f"({record['seconds']:.2f}s)"]
    for what in ("damaged", "stray"):
        for d in record[what]:
            lines.append(f"{what.upper()} units/{d['unit']}: " + "; ".join(d["problems"]))
    for name in record["in_flight"]:
        lines.append(f"IN FLIGHT units/{name}: no _SUCCESS yet; not read by the views")
    if record.get("generations"):
        lines.append(f"compacted: {record.get('units_compacted', 0)} units in "
                     f"{len(record['generations'])} generations ok")
    for gen, problems in record.get("generations_damaged", {}).items():
        lines.append(f"DAMAGED compacted/{gen}: " + "; ".join(problems))
    for problem in record.get("index_problems", []):
        lines.append(f"INDEX {problem} (fix: zoospectra verify --rebuild-index)")
    lines.append(f"-> {REMEDY}" if not record["healthy"] else "healthy")
    return "\n".join(lines)


@app.command()
def compact(
    results: str = typer.Argument(..., help="Results root."),
    by_base: bool = typer.Option(False, "--by-base", help="One file per table and base model."),
    keep_units_for: float = typer.Option(0.0, "--keep-units-for", min=0.0,
                                         help="Seconds to keep compacted unit folders for readers "
                                              "that listed them (a later compact removes them)."),
) -> None:
    """Merge committed unit folders into large Parquet files per table (readers keep working)."""
    import json
    from dataclasses import asdict

    from .outputs import require_results_root
    from .run.compact import compact as run_compact

    require_results_root(results)
    result = run_compact(results, partition_by_base=by_base, grace_s=keep_units_for)
    typer.echo(json.dumps(asdict(result), indent=2))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(
    ctx: typer.Context,
    address: str = typer.Option(..., help="Ray dashboard/Jobs API address, e.g. http://head:8265."),
    ship_code: bool = typer.Option(False, "--ship-code", help="Ship this zoospectra package (only it) "
                                   "with the job; by default the cluster's image must have zoospectra."),
    working_dir: str | None = typer.Option(None, help="Also ship this directory as the job's working_dir "
                                            "(.git, .venv and results excluded)."),
    wait: bool = typer.Option(False, "--wait/--no-wait", help="Follow the job's logs until it ends."),
    timeout: float = typer.Option(3600.0, help="With --wait: stop waiting after this many seconds "
                                  "(the job keeps running)."),
    status: str | None = typer.Option(None, "--status", help="Show a submitted job's status and log tail "
                                      "instead of submitting."),
) -> None:
    """Submit `zoospectra ARGS...` to a running Ray cluster through the Ray Jobs API."""
    from .run import submit as ray_jobs

    if timeout <= 0:
        raise typer.BadParameter(f"--timeout must be > 0 seconds, got {timeout}")
    args = list(ctx.args)
    if args and args[0] == "--":
        args = args[1:]
    if not args and status is None:
        raise typer.BadParameter("give the zoospectra command to run after --, e.g. -- analyze A --base BASE --out R")
    client = ray_jobs.connect(address)
    if status is not None:
        info = ray_jobs.info(client, status)
        typer.echo(ray_jobs.describe(info))
        tail = ray_jobs.log_tail(client, status)
        if tail:
            typer.echo(tail)
        raise typer.Exit(code=ray_jobs.exit_code(info))
    job_id = ray_jobs.submit(client, args, ship_code=ship_code, working_dir=working_dir)
    typer.echo(job_id)
    if wait:
        info = ray_jobs.follow(client, job_id, timeout, sys.stderr.write)
        typer.echo(ray_jobs.describe(info))
        raise typer.Exit(code=ray_jobs.exit_code(info))


@app.command("jobs")
def list_jobs(
    address: str = typer.Option(..., help="Ray dashboard/Jobs API address, e.g. http://head:8265."),
) -> None:
    """List the jobs of a Ray cluster (newest last): id, status, exit code, entrypoint."""
    from .run import submit as ray_jobs

    client = ray_jobs.connect(address)
    for info in ray_jobs.listing(client):
        typer.echo(ray_jobs.describe(info))


@app.command()
def crawl(
    base_model: list[str] = typer.Option([], "--base-model", help="Hub id of a base model, org/name[@rev] "
                                                                  "(repeatable): its adapters."),
    author: list[str] = typer.Option([], "--author", help="Hub user or organisation (repeatable): every "
                                                          "adapter it publishes, each against the base it names."),
    search: list[str] = typer.Option([], "--search", help="Hub search text (repeatable): every adapter "
                                                          "whose id matches."),
    repos: str | None = typer.Option(None, "--repos", help="File of Hub references, one a line "
                                                          "(org/name[@rev]; '#' comments)."),
    out: str = typer.Option(..., "--out", "-o", help="Results root."),
    limit: int | None = typer.Option(None, help="At most N repos per base model and kind, author, "
                                                "search, or from --repos."),
    include: list[str] = typer.Option([], "--include", help="'full': also full fine-tunes with safetensors weights."),
    name: str = typer.Option("adhoc-crawl", help="Crawl name (recorded in logs and manifests)."),
    mode: str = typer.Option(_D.mode, help="fast (default) or exact (the paper's full SVDs)."),
    k_store: str = typer.Option(_kstr(_D.k_store), help="Per-vector records kept per side ('all')."),
    batch_size: int = typer.Option(32, help="Artifacts per unit of work."),
    address: str | None = typer.Option(None, help="Ray cluster address (default: local Ray)."),
    local: bool = typer.Option(False, "--local", help="Run in-process without Ray (debugging)."),
    spec: str | None = typer.Option(None, help="A YAML job spec instead of the flags above."),
) -> None:
    """Discover adapters / fine-tunes on the Hub (by base model, author, search or a list) and
    analyse what is new."""
    import json
    from dataclasses import asdict

    from .api import crawl as run_crawl
    from .jobs.spec import CrawlSpec
    from .outputs import claim_results_root
    from .run.execute import probe_address

    bad = [i for i in include if i != "full"]
    if bad:
        raise typer.BadParameter(f"--include takes only 'full', got {bad}")
    _check_positive(batch_size, "--batch-size")
    _check_positive(limit, "--limit")
    if spec:
        crawl_spec = CrawlSpec.load(spec)
    else:
        crawl_spec = CrawlSpec.from_dict({
            "name": name, "base_models": list(base_model), "author": list(author), "search": list(search),
            "repos": repos, "out": out, "limit": limit,
            "include_full": "full" in include, "batch_size": batch_size, "ray_address": address,
            "analysis": {"mode": mode, "k_store": _k(k_store, "--k-store")},
        })
    claim_results_root(crawl_spec.out)
    if crawl_spec.ray_address and not local:
        probe_address(crawl_spec.ray_address)
    with _steps("discover") as tick:
        summary = run_crawl(crawl_spec, executor="local" if local else "ray", command=shlex.join(sys.argv),
                            on_progress=tick)
    typer.echo(json.dumps({"name": summary.name, "bases": [asdict(b) for b in summary.bases]}, indent=2))
    if any(b.error_rows or b.units_failed for b in summary.bases):
        raise typer.Exit(code=3)  # the crawl completed, but some repos became errors rows


@app.command()
def demo(
    out: str = typer.Option("results/demo", help="Results root for the demo."),
    cache: str = typer.Option(".zoospectra-cache/zoo", help="Where the sample zoo is built and cached."),
    steps: int = typer.Option(0, help="Training steps per artifact (0: the demo's default)."),
) -> None:
    """Offline demo: build a sample zoo on all-MiniLM-L6-v2, analyse it on local Ray, summarise."""
    from .demo.run import run_demo

    run_demo(out=out, cache=cache, steps=steps or None)


# --- studies, report, mitigation (pipeline/study/studies.py, report.py, mitigate.py) ---------------
def _scope(base_model: str | None, kinds: list[str] | None):
    from .study.studies import Scope

    return Scope(base=base_model, kinds=tuple(kinds or ()))


@app.command()
def report(
    results: str = typer.Argument(..., help="Results root."),
    out: str = typer.Option(..., "--out", "-o", help="Directory for index.html (self-contained)."),
    base_model: str | None = typer.Option(None, "--base-model", help="Only models of this base (id or uid)."),
    kinds: list[str] | None = typer.Option(None, "--kind", help="Only these kinds (repeat: --kind lora --kind full)."),
    force: bool = typer.Option(False, "--force", help="Replace a previous report in --out (never other files)."),
) -> None:
    """Every study as one offline HTML page: figures, summary tables and the SQL behind each."""
    from .outputs import require_results_root
    from .study.report import build_report

    require_results_root(results)
    with _steps("report") as tick:
        path = build_report(results, out, _scope(base_model, kinds), force=force, on_progress=tick)
    typer.echo(str(path))


@app.command()
def plot(
    results: str = typer.Argument(..., help="Results root."),
    study: str = typer.Argument(..., help="Study name (zoospectra plot RESULTS list: all of them)."),
    out: str | None = typer.Option(None, "--out", "-o", help="Output .png or .svg (default: STUDY.png)."),
    param: list[str] | None = typer.Option(None, "--param", "-p", help="Study parameter NAME=VALUE (repeatable)."),
    base_model: str | None = typer.Option(None, "--base-model", help="Only models of this base (id or uid)."),
    kinds: list[str] | None = typer.Option(None, "--kind", help="Only these kinds (repeatable)."),
) -> None:
    """One study's figure as PNG or SVG."""
    from .study.studies import STUDIES, parse_param, save_plot

    if study == "list":
        for s in STUDIES.values():
            typer.echo(f"{s.name:20s} {s.title} ({s.figure}); params: "
                       + (", ".join(f"{k}={v}" for k, v in s.defaults) or "none"))
        return
    from .outputs import require_results_root

    require_results_root(results)
    overrides = dict(parse_param(p) for p in param or [])
    typer.echo(str(save_plot(results, study, out or f"{study}.png", overrides, _scope(base_model, kinds))))


@app.command()
def mitigate(
    adapter: str = typer.Argument(..., help="PEFT LoRA adapter: a directory or a Hub reference (org/name[@rev])."),
    out: str = typer.Option(..., "--out", "-o", help="Directory for the mitigated adapter."),
    lam: float = typer.Option(0.75, "--lam", help="Factor for the intruder singular values "
                                                  "(PEFT's mitigation_lambda)."),
    k: int = typer.Option(_D.k, help="Top-k singular vectors tested (PEFT's top_k)."),
    eps: float = typer.Option(_D.eps, help="Intruder threshold on max |cos| (PEFT's threshold_epsilon)."),
    base: str | None = typer.Option(None, help="Base checkpoint: a directory or a Hub reference "
                                               "(default: the adapter's base_model_name_or_path)."),
    dtype: str = typer.Option("float32", help="float32 (as PEFT) or float64 for the decompositions."),
    force: bool = typer.Option(False, "--force", help="Replace a previous mitigate output in --out "
                                                      "(never other files)."),
) -> None:
    """Scale intruder dimensions by --lam and write a new PEFT adapter (PEFT's reduce_intruder_dimension)."""
    from .mitigate import MitigationParams, mitigate_adapter

    params = MitigationParams(lam=lam, k=k, eps=eps, dtype=dtype)  # validated before any file is read
    with _steps("mitigate") as tick:
        result = mitigate_adapter(adapter, out, params, base=base, force=force, on_progress=tick)
    hit = sum(1 for m in result.matrices if m.intruders)
    console.print(f"[bold]mitigate[/]: {result.n_intruders} intruders in {hit} of "
                  f"{len(result.matrices)} matrices scaled by {lam} -> {esc(out)}")


@contextmanager
def _steps(what: str):
    """A progress bar for a multi-step command; yields tick(i, n, label). The bar starts at the
    first tick, so a command refused up front prints its one error line and nothing else."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn(f"[bold blue]{what}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("{task.description}"), console=console)
    bar: list = []

    def tick(i: int, n: int, label: str) -> None:
        if not bar:
            progress.start()
            bar.append(progress.add_task("", total=n))
        progress.update(bar[0], total=n, completed=i, description=esc(label))

    try:
        yield tick
    finally:
        if bar:
            progress.stop()


def one_line(text: object) -> str:
    """A message on one line: DuckDB's multi-line errors lose their 'LINE n:' echo and caret."""
    lines = [ln.strip() for ln in str(text).splitlines()]
    keep = [ln for ln in lines if ln and not ln.startswith("LINE ") and set(ln) != {"^"}]
    return " ".join(keep)


def _fail(kind: str, message: object, code: int) -> int:
    sys.stderr.write(f"error ({kind}): {one_line(message)}\n")
    return code


def _run(args: list[str] | None = None, keep_local_ray: bool = False) -> int:
    """The command's exit status. Exit codes: 0 done; 3 the run completed with error rows;
    2 invalid input (options, paths, files, configs, SQL: ZoospectraError by default, DuckDB
    errors, usage errors); 1 a runtime failure (ZoospectraError kinds with exit_code 1, OSError,
    anything unexpected); 130 interrupted. ZOOSPECTRA_DEBUG=1 re-raises for a traceback."""
    import os

    import click
    from typer.core import _click  # typer ships its own copy of click: catch both families

    usage_errors = (click.ClickException, _click.exceptions.ClickException)
    debug = os.environ.get("ZOOSPECTRA_DEBUG") == "1"
    sys.unraisablehook = _redeliver_interrupts(sys.unraisablehook)
    try:
        rv = app(args=args, standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
        if code == 130:  # typer turns KeyboardInterrupt into Exit(130), silently
            sys.stderr.write("interrupted\n")
            return 130
        if not (keep_local_ray and _local_ray_started_here()):
            _shutdown_ray()  # inside the try: an interrupt during shutdown is still one line
        return code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except (click.exceptions.Abort, typer.Abort):
        sys.stderr.write("interrupted\n")
        return 130
    except usage_errors as err:  # usage errors: bad option, missing argument, BadParameter
        if debug:
            raise
        return _fail("usage", err.format_message(), err.exit_code)
    except ZoospectraError as err:
        if debug:
            raise
        return _fail(err.kind, err, err.exit_code)
    except Exception as err:  # noqa: BLE001 - the last line of defence: no traceback for users
        if debug:
            raise
        return _fail_other(err)


def _redeliver_interrupts(default):
    """An unraisable-exception hook that keeps a Ctrl-C which landed where Python cannot raise
    (a fork handler run while Ray spawns a process, a finaliser): instead of printing "Exception
    ignored in ... KeyboardInterrupt" and losing it, deliver it to the main thread again a moment
    later, where it ends the command with one line. Everything else goes to `default`."""
    import _thread
    import threading

    def hook(unraisable) -> None:
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            timer = threading.Timer(0.05, _thread.interrupt_main)
            timer.daemon = True
            timer.start()
            return
        default(unraisable)

    return hook


def _fail_other(err: Exception) -> int:
    import duckdb

    if isinstance(err, duckdb.Error):  # DuckDB's own message: a typo, an unknown column, a macro's refusal
        return _fail("sql", err, 2)
    if isinstance(err, OSError):
        where = " ".join(str(f) for f in (err.filename, err.filename2) if f)
        return _fail(type(err).__name__, f"{err.strerror or err}{': ' + where if where else ''}", 1)
    return _fail(type(err).__name__, f"{err} (ZOOSPECTRA_DEBUG=1 shows the traceback)", 1)


def _local_ray_started_here() -> bool:
    """Whether this process started a private local Ray (not a joined cluster) that is still up."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    from .run import execute

    return execute.started_local_ray()


def _shutdown_ray() -> None:
    """Stop a Ray this process started now, not in an atexit hook where an interrupt would
    print a traceback."""
    import signal

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        signal.signal(signal.SIGINT, _late_interrupt)
        ray.shutdown()


def _kill_descendants() -> None:
    """SIGKILL every process below this one (Linux /proc; elsewhere nothing): after a Ctrl-C,
    the processes of a local Ray this run started, which must not outlive it."""
    import os
    import signal

    children: dict[int, list[int]] = {}
    try:
        names = [n for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return
    for name in names:
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])   # "pid (comm) state ppid ..."
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    todo, found = [os.getpid()], []
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _late_interrupt(signum, frame) -> None:
    """SIGINT once the command is over (Ray or interpreter teardown): one line, exit 130."""
    import os

    os.write(2, b"interrupted\n")
    os._exit(130)


def main() -> None:
    import os
    import signal

    code = _run(keep_local_ray=True)
    sys.stdout.flush()
    sys.stderr.flush()
    if code == 130:
        # Interrupted: leave now. Ray's teardown would run unprotected from a second Ctrl-C (its
        # core worker takes SIGINT back at the C level); the run manifest is already closed. A
        # local Ray's GCS and raylet die with this process (Ray starts them fate-sharing), but
        # not the raylet's agents and workers: stop everything this process started.
        if "ray" in sys.modules:
            _kill_descendants()
        os._exit(130)
    signal.signal(signal.SIGINT, _late_interrupt)
    if "ray" in sys.modules:
        # A run is over: its results are committed (fsynced) and its manifest closed. Stop Ray
        # now (a joined cluster was already left in _run unless the command failed), then leave
        # without the interpreter's teardown of the torch and Ray modules (1-2 s of nothing).
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        if _local_ray_started_here():
            # The private local Ray dies with this process: SIGKILL its processes (what its
            # fate-sharing does to the GCS and raylet anyway) rather than ray.shutdown()'s
            # graceful stop, which waits on them one by one (about 1.5 s). Everything the run
            # wrote is committed; stderr goes quiet first, so a Ray thread that sees its raylet
            # die in the microseconds before the exit prints nothing after the summary.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            _kill_descendants()
        else:
            _shutdown_ray()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
