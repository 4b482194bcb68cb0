"""Cross-model studies: each paper figure is one table macro in schemas/studies.sql plus a plot.

    con = connect_scoped("results/", Scope(base="sentence-transformers/all-MiniLM-L6-v2"))
    table = run_study(con, STUDIES["intruders-eps"], {"k": 10})
    fig = STUDIES["intruders-eps"].plot(table, {"k": 10})      # a matplotlib Figure
    save_plot("results/", "intruders-eps", "fig5.png")          # the same, in one call

A Scope narrows the views (models, matrices, vectors, spectra, similarity, pairs) to the models
of one base and/or some kinds, so every macro answers for that subset unchanged. matplotlib is
imported only when a figure is drawn (a base dependency, imported lazily to keep start-up fast),
always with the Agg backend.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ..config import AnalysisConfig
from ..errors import ConfigError, ResultsError
from ..io.refs import ModelRef, local_ref
from .reviewer import BOOT_PARAMS, GROUPINGS, METRIC_LABEL, METRICS, groups_post, layer_map_post
from .uncertainty import LEVEL

if TYPE_CHECKING:
    from types import ModuleType

    import duckdb
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Params = Mapping[str, Any]
SCOPED_TABLES = ("models", "matrices", "vectors", "spectra", "similarity", "pairs", "null_vectors")
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
_PARAM_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


# --- checkpoints (paper Fig. 7) -------------------------------------------------------------
def checkpoint_refs(path: str | os.PathLike, name: str | None = None) -> list[ModelRef]:
    """A directory of `checkpoint-<N>` folders (the Hugging Face Trainer's layout) as one ModelRef
    per checkpoint, named "<name>@step<N>" and ordered by N; study_checkpoints parses the step
    back out of the id. `name` defaults to the directory's name."""
    root = Path(path)
    found = sorted((int(m[1]), p) for p in (root.iterdir() if root.is_dir() else [])
                   if p.is_dir() and (m := _CHECKPOINT_DIR.match(p.name)))
    if not found:
        raise ConfigError(f"{root} holds no checkpoint-<N> folders; pass a training output "
                          "directory (e.g. the Trainer's output_dir)", option="path")
    series = name or root.resolve().name
    return [local_ref(p, f"{series}@step{step}") for step, p in found]


# --- scope: which models a session sees ------------------------------------------------------
@dataclass(frozen=True)
class Scope:
    """Models of one base (base_id or base_uid) and/or of some kinds; empty = everything."""

    base: str | None = None
    kinds: tuple[str, ...] = ()

    @property
    def is_all(self) -> bool:
        return self.base is None and not self.kinds

    def describe(self) -> str:
        parts = ([f"base = {self.base}"] if self.base else []) + (
            [f"kinds = {', '.join(self.kinds)}"] if self.kinds else [])
        return "; ".join(parts) or "all models"


def connect_scoped(root: str | os.PathLike, scope: Scope = Scope()) -> duckdb.DuckDBPyConnection:
    """sql.connect(root), with the per-model views narrowed to `scope` (the originals renamed
    to _all_<table>): macros resolve view names when called, so they all see the subset."""
    from .sql import connect

    con = connect(root)
    if scope.is_all:
        return con
    try:
        conds, params = [], []
        if scope.base is not None:
            conds.append("(base_id = ? OR base_uid = ?)")
            params += [scope.base, scope.base]
        if scope.kinds:
            conds.append(f"kind IN ({', '.join('?' for _ in scope.kinds)})")
            params += list(scope.kinds)
        con.execute("CREATE TEMP TABLE _scope AS SELECT DISTINCT model_uid FROM models WHERE "
                    + " AND ".join(conds), params)
        for table in SCOPED_TABLES:
            con.execute(f"ALTER VIEW {table} RENAME TO _all_{table}")
        for table in ("models", "matrices", "vectors", "spectra", "similarity", "null_vectors"):
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM _all_{table} "
                        "WHERE model_uid IN (SELECT model_uid FROM _scope)")
        con.execute("CREATE VIEW pairs AS SELECT * FROM _all_pairs WHERE model_uid_a IN "
                    "(SELECT model_uid FROM _scope) AND model_uid_b IN (SELECT model_uid FROM _scope)")
    except Exception:
        con.close()
        raise
    return con


# --- the registry ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Study:
    name: str                                  # CLI name
    title: str
    figure: str                                # what it reproduces
    macro: str                                 # table macro in schemas/studies.sql
    defaults: tuple[tuple[str, Any], ...]      # macro parameters and their defaults
    plot: Callable[[pa.Table, Params], Figure]
    needs: str                                 # what the results must hold for rows to exist
    description: str = ""
    # Python after the SQL (bootstrap intervals, effect sizes: study/uncertainty.py) and its own
    # parameters, which the macro does not take.
    post: Callable[[pa.Table, Params], pa.Table] | None = None
    extra: tuple[tuple[str, Any], ...] = ()

    def params(self, overrides: Params | None = None) -> dict[str, Any]:
        """Defaults updated with `overrides`; unknown names are a ConfigError."""
        out = dict(self.defaults) | dict(self.extra)
        for key, value in (overrides or {}).items():
            if key not in out:
                raise ConfigError(f"study {self.name!r} has no parameter {key!r}; its parameters "
                                  f"are {sorted(out) or 'none'}", option="param")
            out[key] = value
        return out

    def sql(self, overrides: Params | None = None) -> str:
        """The one SELECT behind the figure, with every parameter spelled out."""
        macro_args = {k: v for k, v in self.params(overrides).items() if k in dict(self.defaults)}
        args = ", ".join(f"{k} := {sql_literal(v)}" for k, v in macro_args.items())
        return f"SELECT * FROM {self.macro}({args})"


def sql_literal(value: Any) -> str:
    """A parameter as a DuckDB literal: NULL, numbers, 'strings', [lists]."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"parameter value {value} is not finite", option="param")
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(sql_literal(v) for v in value) + "]"
    raise ConfigError(f"parameter value {value!r} is not a number, string or list", option="param")


def parse_param(text: str) -> tuple[str, Any]:
    """NAME=VALUE from the command line: VALUE as int, float, null, a comma list, or a string."""
    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep or not _PARAM_NAME.match(name):
        raise ConfigError(f"--param takes NAME=VALUE, got {text!r}", option="param")
    return name, _parse_value(raw.strip())


def _parse_value(raw: str) -> Any:
    if raw.lower() in ("null", "none", ""):
        return None
    if "," in raw:
        return [_parse_value(part.strip()) for part in raw.split(",")]
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def run_study(con: duckdb.DuckDBPyConnection, study: Study, overrides: Params | None = None) -> pa.Table:
    """The study's rows, or a ResultsError naming the study when its query fails."""
    import duckdb

    try:
        table = con.sql(study.sql(overrides)).to_arrow_table()
    except duckdb.Error as err:
        raise ResultsError(f"study {study.name!r} failed: {err}", study=study.name) from err
    return study.post(table, study.params(overrides)) if study.post else table


def get_study(name: str) -> Study:
    if name not in STUDIES:
        raise ConfigError(f"unknown study {name!r}; studies: {', '.join(STUDIES)}", option="study")
    return STUDIES[name]


def save_plot(root: str | os.PathLike, name: str, out: str | os.PathLike,
              overrides: Params | None = None, scope: Scope = Scope()) -> Path:
    """Draw one study over `root` into `out` (.png or .svg); ResultsError when it has no rows."""
    from ..outputs import claim_file, figure_is_ours

    study = get_study(name)
    out = Path(out)
    if out.suffix.lower() not in (".png", ".svg"):
        raise ConfigError(f"plot output must end in .png or .svg, got {out.name!r}", option="out")
    # a figure zoospectra drew (its creator tag) is redrawn; any other existing file is refused
    claim_file(out, "plot", inputs=[root], ours=out.is_file() and figure_is_ours(out))
    con = connect_scoped(root, scope)
    try:
        table = run_study(con, study, overrides)
    finally:
        con.close()
    if table.num_rows == 0:
        raise ResultsError(f"study {name!r} has no rows for {scope.describe()} in {root}: "
                           f"{study.needs}", study=name, root=str(root))
    fig = study.plot(table, study.params(overrides))
    write_figure(fig, out)
    return out


def write_figure(fig: Figure, out: str | os.PathLike) -> None:
    import matplotlib
    import matplotlib.pyplot as plt

    from ..outputs import figure_metadata

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    fmt = out.suffix.lower().lstrip(".")
    try:
        with matplotlib.rc_context({"svg.fonttype": "none"}):  # SVG text stays text
            fig.savefig(tmp, format=fmt, dpi=110, bbox_inches="tight", metadata=figure_metadata(fmt))
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()


def svg_text(fig: Figure, salt: str) -> str:
    """The figure as an inline <svg> element (no XML prolog); `salt` keeps ids unique per page."""
    import io

    import matplotlib
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": salt, "svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return _prefix_ids(text[text.index("<svg"):], re.sub(r"[^A-Za-z0-9_-]", "_", salt))


def _prefix_ids(svg: str, prefix: str) -> str:
    """Every id and in-document reference (url(#x), href="#x") prefixed: several figures inline
    in one page would otherwise share ids such as "figure_1" and clip each other's paths."""
    svg = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}-{m[1]}"', svg)
    svg = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{prefix}-{m[1]})", svg)
    return re.sub(r'href="#([^"]+)"', lambda m: f'href="#{prefix}-{m[1]}"', svg)


# --- plotting helpers ------------------------------------------------------------------------
def _pyplot() -> ModuleType:
    try:
        import matplotlib
    except ImportError as e:  # the `plot` extra
        raise ConfigError("plots need matplotlib, a dependency of zoospectra: reinstall it "
                          "(pip install --force-reinstall zoospectra)") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _rows(table: pa.Table) -> list[dict]:
    return table.to_pylist()


def _label(row: Mapping[str, Any]) -> str:
    return str(row["model_id"])


def _group_key(row: Mapping[str, Any]) -> str:
    kind, r = row.get("kind") or "?", row.get("r")
    return f"{kind} r={r}" if r is not None else str(kind)


def _by(rows: Sequence[dict], key: str) -> dict[Any, list[dict]]:
    out: dict[Any, list[dict]] = {}
    for row in rows:
        out.setdefault(row[key], []).append(row)
    return out


LEGEND_FONTSIZE = 9   # ~12 px in the report at 1400 px wide (7 pt rendered about 6 px)
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_LINESTYLES = ("-", "--", ":", "-.")


def _styles(keys: Sequence[Any]) -> dict[Any, dict[str, Any]]:
    """One distinct (colour, marker, line style) per key, fixed for the whole figure.

    Ten tab10 colours; past ten, each further block of ten reuses them with another marker and
    line style, so no two series share a look (tab20's pairs are two shades of one hue, and a
    colour cycle restarted per panel gave unrelated models the same blue)."""
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    return {key: {"color": cmap(i % 10), "marker": _MARKERS[(i // 10) % len(_MARKERS)],
                  "ls": _LINESTYLES[(i // 10) % len(_LINESTYLES)]}
            for i, key in enumerate(keys)}


def _colors(n: int) -> list:
    return [s["color"] for s in _styles(range(max(n, 1))).values()]


def _legend(ax: Axes, n: int) -> None:
    """Beside the axes, not over the data; two columns once it gets long."""
    if n:
        ax.legend(fontsize=LEGEND_FONTSIZE, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False,
                  ncol=1 if n <= 12 else 2, borderaxespad=0.0)


def _fig_legend(fig: Figure, axes: Iterable[Axes]) -> None:
    """One legend for every panel of a figure, each label once, outside on the right."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    if handles:
        handles = dict(sorted(handles.items()))
        fig.legend(list(handles.values()), list(handles), loc="outside right upper",
                   fontsize=LEGEND_FONTSIZE, frameon=False, ncol=1 if len(handles) <= 16 else 2)


def _log_ticks(axis: Any) -> None:
    """Readable log-axis labels: plain numbers, denser steps on short ranges, no minor labels
    (matplotlib labels minor ticks on short ranges, and those overlapped). Call after plotting."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = sorted(axis.get_view_interval())
    decades = math.log10(hi / lo) if lo > 0 and hi > lo else 1.0
    subs = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if decades < 1.2 else (1.0, 2.0, 5.0) if decades < 3 else (1.0,)
    axis.set_major_locator(LogLocator(base=10.0, subs=subs, numticks=12))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    axis.set_minor_formatter(NullFormatter())


# --- the figures -----------------------------------------------------------------------------
def plot_intruders_eps(table: pa.Table, params: Params) -> Figure:
    """Fig. 5: one panel per kind; one line per model (colour by rank)."""
    plt = _pyplot()
    rows = _rows(table)
    kinds = sorted(_by(rows, "kind").items(), key=lambda kv: str(kv[0]))
    ncols = min(3, max(1, len(kinds)))     # wrapped, so the page never shrinks a wide figure
    nrows = max(1, math.ceil(len(kinds) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.8 * ncols + 2.6, 3.2 * nrows), squeeze=False,
                             sharey=True, layout="constrained")
    style = _styles(sorted({(r["kind"] or "", r["r"] or 0, r["model_id"], r["model_uid"]) for r in rows}))
    for ax, (kind, krows) in zip(axes.flat, kinds, strict=False):  # the grid may have spare panels
        for _, mrows in sorted(_by(krows, "model_uid").items(), key=lambda kv: _label(kv[1][0])):
            mrows = sorted(mrows, key=lambda r: r["eps"])
            first = mrows[0]
            ax.plot([r["eps"] for r in mrows], [r["n_intruders"] for r in mrows], ms=4,
                    **style[(first["kind"] or "", first["r"] or 0, first["model_id"], first["model_uid"])],
                    label=f"{_label(first)} (r={first['r']})" if first["r"] is not None else _label(first))
        ax.set_title(f"{kind}")
        ax.set_xlabel("eps (max |cos| threshold)")
    for ax in list(axes.flat)[len(kinds):]:
        ax.axis("off")
    for row in axes:
        row[0].set_ylabel(f"intruders in top {params.get('k')}\n(sum over matrices)")
    _fig_legend(fig, axes.flat)
    fig.suptitle("Intruder dimensions vs eps (Shuttleworth et al. Fig. 5)")
    return fig


def plot_intruders_fraction(table: pa.Table, params: Params) -> Figure:
    """Fig. 11: share of the examined singular vectors that are intruders, vs the fraction examined."""
    plt = _pyplot()
    rows = _rows(table)
    models = _by(rows, "model_uid")
    fig, ax = plt.subplots(figsize=(8.4, 4.2), layout="constrained")
    ordered = sorted(models.items(), key=lambda kv: _label(kv[1][0]))
    style = _styles([uid for uid, _ in ordered])
    for uid, mrows in ordered:
        mrows = sorted(mrows, key=lambda r: r["fraction"])
        ax.plot([r["fraction"] for r in mrows], [r["n_intruders"] for r in mrows], ms=4,
                **style[uid], label=f"{_label(mrows[0])} ({_group_key(mrows[0])})")
    ax.set_xscale("log")
    fractions = sorted({r["fraction"] for r in rows})
    ax.set_xticks(fractions, [f"{f:g}" for f in fractions], rotation=45, fontsize=9)
    ax.minorticks_off()
    ax.set_xlabel("fraction of singular vectors examined (k / min(m, n))")
    ax.set_ylabel(f"intruders at eps = {params.get('eps')} (sum over matrices)")
    ax.set_title("Intruders vs fraction examined (Fig. 11)")
    _legend(ax, len(models))
    return fig


def plot_effective_rank(table: pa.Table, params: Params) -> Figure:
    """Fig. 6: effective rank of dW by layer, one panel per module, one line per model."""
    plt = _pyplot()
    rows = [r for r in _rows(table) if r["eff_rank"] is not None and r["layer"] is not None]
    modules = sorted({r["module"] for r in rows})
    ncols = min(3, max(1, len(modules)))
    nrows = max(1, math.ceil(len(modules) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols + 1.8, 3.2 * nrows), squeeze=False,
                             layout="constrained")
    model_ids = sorted({(r["model_id"], r["model_uid"]) for r in rows})
    style = _styles(model_ids)
    for ax, module in zip(axes.flat, modules, strict=False):  # the grid may have spare panels
        mrows = [r for r in rows if r["module"] == module]
        for key, lrows in sorted(_by(mrows, "model_uid").items()):
            lrows = sorted(lrows, key=lambda r: r["layer"])
            ax.plot([r["layer"] for r in lrows], [r["eff_rank"] for r in lrows], ms=4,
                    **style[(lrows[0]["model_id"], key)], label=_label(lrows[0]))
        ax.set_title(module, fontsize=10)
        ax.set_xlabel("layer")
        ax.set_yscale("log")
        _log_ticks(ax.yaxis)
    for ax in list(axes.flat)[len(modules):]:
        ax.axis("off")
    axes[0][0].set_ylabel("effective rank of dW")
    _fig_legend(fig, axes.flat)
    fig.suptitle("Effective rank of the update by layer and module (Fig. 6)")
    return fig


def plot_similarity(table: pa.Table, params: Params) -> Figure:
    """Figs 1 and 3: |U0^T Ut| for the top vectors; columns that are intruders are marked."""
    import numpy as np

    plt = _pyplot()
    rows = _rows(table)
    n_i, n_j = max(r["i"] for r in rows), max(r["j"] for r in rows)
    grid = np.full((n_i, n_j), np.nan)
    for r in rows:
        grid[r["i"] - 1, r["j"] - 1] = r["value"]
    eps = params.get("eps")
    intruder_cols = sorted({r["j"] for r in rows if r["intruder_j"]})
    fig, ax = plt.subplots(figsize=(5.2, 4.6), layout="constrained")
    image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, origin="upper",
                      extent=(0.5, n_j + 0.5, n_i + 0.5, 0.5))
    for j in intruder_cols:
        ax.axvline(j, color="red", lw=1.0, ls="--", alpha=0.8)
    fig.colorbar(image, ax=ax, label="|<u0_i, ut_j>|")
    ax.set_xlabel(f"fine-tuned singular vector j (red: intruder, max |cos| < {eps})", fontsize=8)
    ax.set_ylabel("pre-trained singular vector i")
    ax.set_title(f"{rows[0]['model_id']}\n{rows[0]['tensor']}", fontsize=8)
    return fig


def plot_checkpoints(table: pa.Table, params: Params) -> Figure:
    """Fig. 7: intruders (and effective rank) over training steps, one line per series."""
    plt = _pyplot()
    series = _by(_rows(table), "series")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.0, 3.6), layout="constrained")
    # strict=False: _colors(0) still returns one colour
    for color, (name, srows) in zip(_colors(len(series)), sorted(series.items()), strict=False):
        srows = sorted(srows, key=lambda r: r["step"])
        steps = [r["step"] for r in srows]
        ax1.plot(steps, [r["n_intruders"] for r in srows], marker="o", color=color, label=name)
        ax2.plot(steps, [r["eff_rank_mean"] for r in srows], marker="o", color=color, label=name)
    ax1.set_xlabel("training step")
    ax1.set_ylabel(f"intruders (k = {params.get('k')}, eps = {params.get('eps')})")
    ax2.set_xlabel("training step")
    ax2.set_ylabel("mean effective rank of dW")
    _fig_legend(fig, [ax1])
    fig.suptitle("Evolution over checkpoints (Fig. 7)")
    return fig


def plot_alpha(table: pa.Table, params: Params) -> Figure:
    """alpha = 2r vs fixed alpha: intruders and relative update against the rank."""
    plt = _pyplot()
    rules = _by(_rows(table), "alpha_rule")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.0, 3.6), layout="constrained")
    # strict=False: _colors(0) still returns one colour
    for color, (rule, rrows) in zip(_colors(len(rules)), sorted(rules.items()), strict=False):
        rrows = sorted(rrows, key=lambda r: (r["r"], r["model_id"]))
        ax1.plot([r["r"] for r in rrows], [r["n_intruders"] for r in rrows], marker="o",
                 color=color, label=rule)
        ax2.plot([r["r"] for r in rrows], [r["rel_update_mean"] for r in rrows], marker="o",
                 color=color, label=rule)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("LoRA rank r")
    ax1.set_ylabel(f"intruders (k = {params.get('k')}, eps = {params.get('eps')})")
    ax2.set_ylabel("mean ||dW||_F / ||W0||_F")
    _fig_legend(fig, [ax1])
    fig.suptitle("alpha = 2r versus fixed alpha")
    return fig


def plot_ab_balance(table: pa.Table, params: Params) -> Figure:
    """LoRA+: ||B||_F against ||A||_F per matrix; B under-trained sits below the diagonal."""
    plt = _pyplot()
    models = _by(_rows(table), "model_uid")
    fig, ax = plt.subplots(figsize=(7.6, 4.8), layout="constrained")
    lo, hi = math.inf, 0.0
    ordered = sorted(models.items(), key=lambda kv: _label(kv[1][0]))
    style = _styles([uid for uid, _ in ordered])
    for uid, mrows in ordered:
        a = [r["norm_a"] for r in mrows]
        b = [r["norm_b"] for r in mrows]
        ax.scatter(a, b, s=18, color=style[uid]["color"], marker=style[uid]["marker"], label=_label(mrows[0]))
        positive = [v for v in a + b if v > 0]
        if positive:
            lo, hi = min(lo, min(positive)), max(hi, max(positive))
    if hi > 0:
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls=":", label="||B|| = ||A||")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _log_ticks(ax.xaxis)
    _log_ticks(ax.yaxis)
    ax.set_xlabel("||A||_F")
    ax.set_ylabel("||B||_F")
    ax.set_title("LoRA A/B norm balance (LoRA+)")
    _legend(ax, len(models) + 1)
    return fig


def plot_pairs(table: pa.Table, params: Params, max_pairs: int = 4) -> Figure:
    """Hu et al. Fig. 3 style: phi(i, j) heatmaps for the pairs with the largest grids."""
    import numpy as np

    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    pairs = _by(_rows(table), "model_uid_a")
    grids = []
    for rows_a in pairs.values():
        for _, rows in _by(rows_a, "model_uid_b").items():
            grids.append(rows)
    # prefer adapter-vs-adapter of different ranks, then the largest grids
    grids.sort(key=lambda g: (g[0]["kind_a"] != g[0]["kind_b"], -len(g), g[0]["model_id_a"],
                              g[0]["model_id_b"]))
    grids = grids[:max_pairs]
    fig, axes = plt.subplots(1, len(grids), figsize=(3.6 * len(grids) + 1.0, 3.6), squeeze=False,
                             layout="constrained")
    for ax, rows in zip(axes[0], grids, strict=True):
        n_i, n_j = max(r["i"] for r in rows), max(r["j"] for r in rows)
        phi = np.full((n_i, n_j), np.nan)
        for r in rows:
            phi[r["i"] - 1, r["j"] - 1] = r["phi"]
        image = ax.imshow(phi, cmap="magma", vmin=0.0, vmax=1.0, origin="upper", aspect="auto",
                          extent=(0.5, n_j + 0.5, n_i + 0.5, 0.5))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(f"j ({rows[0]['model_id_b']})", fontsize=8)
        ax.set_ylabel(f"i ({rows[0]['model_id_a']})", fontsize=8)
    fig.colorbar(image, ax=list(axes[0]), label="phi(i, j)")
    fig.suptitle("Adapter vs adapter subspace similarity (Hu et al. 7.2)")
    return fig


# --- figures of the reviewer studies (issue 15; tables from reviewer.py) ------------------------
def _err(mean: float, lo: float | None, hi: float | None) -> tuple[float, float]:
    """Error-bar lengths below and above; none (0) where there is no interval."""
    return (mean - lo if lo is not None else 0.0, hi - mean if hi is not None else 0.0)


def plot_null(table: pa.Table, params: Params) -> Figure:
    """Per model: the observed intruders (red) against the null's mean and central 95% (grey)."""
    plt = _pyplot()
    rows = table.to_pylist()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(rows) + 2.5), 4.2), layout="constrained")
    x = np.arange(len(rows))
    means = [r["null_mean"] for r in rows]
    err = np.array([_err(r["null_mean"], r["null_lo"], r["null_hi"]) for r in rows]).T
    ax.errorbar(x, means, yerr=err, fmt="s", color="grey", capsize=4, label="null: mean, central 95%")
    ax.scatter(x, [r["n_intruders"] for r in rows], color="red", zorder=3, label="observed")
    for xi, r in zip(x, rows, strict=True):
        ax.annotate(f"p={r['p_tail']:.2g}", (xi, max(r["n_intruders"], r["null_hi"] or 0)),
                    textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    # one line each, upright: two-line labels at 45 degrees overlapped their neighbours
    ax.set_xticks(x, [f"{r['model_id']} ({r['kind']})" for r in rows], rotation=90, fontsize=8)
    ax.set_ylabel(f"intruders (k = {params.get('k')}, eps = {params.get('eps')}),\nsum over matrices")
    ax.set_title(f"Observed intruders vs a random-direction null ({rows[0]['n_draws']} draws)")
    ax.legend(fontsize=LEGEND_FONTSIZE, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def plot_intruder_norms(table: pa.Table, params: Params) -> Figure:
    """max |cos| against the share of ||W0||_F^2 of every top-k vector; intruders left of eps."""
    plt = _pyplot()
    rows = [r for r in table.to_pylist() if r["share_w0"] is not None and r["share_w0"] > 0]
    models = sorted(_by(rows, "model_uid").items(), key=lambda kv: str(kv[1][0]["model_id"]))
    style = _styles([uid for uid, _ in models])
    fig, ax = plt.subplots(figsize=(8.4, 4.4), layout="constrained")
    for uid, mrows in models:
        ax.scatter([r["max_cos"] for r in mrows], [r["share_w0"] for r in mrows], s=10,
                   color=style[uid]["color"], marker=style[uid]["marker"], alpha=0.7,
                   label=str(mrows[0]["model_id"]))
    ax.axvline(float(params.get("eps", 0.5)), color="red", ls="--", lw=1, label="eps")
    ax.set_yscale("log")
    ax.set_xlabel("max |cos| with the base's singular vectors (intruders: left of eps)")
    ax.set_ylabel("s_j(Wt)^2 / ||W0||_F^2")
    ax.set_title(f"Size of the top-{params.get('k')} singular vectors, intruders or not")
    _legend(ax, len(models) + 1)
    return fig


def plot_groups(table: pa.Table, params: Params) -> Figure:
    """One panel per (metric, grouping): group means with their bootstrap intervals; each
    non-reference group labelled with Cohen's d against the reference and its interval."""
    plt = _pyplot()
    rows = table.to_pylist()
    groupings = [g for g in GROUPINGS if any(r["grouping"] == g for r in rows)]
    fig, axes = plt.subplots(len(METRICS), len(groupings), squeeze=False, layout="constrained",
                             figsize=(3.6 * len(groupings) + 1.0, 2.7 * len(METRICS)))
    for col, grouping in enumerate(groupings):
        for row_i, metric in enumerate(METRICS):
            ax = axes[row_i][col]
            cell = [r for r in rows if r["grouping"] == grouping and r["metric"] == metric]
            x = np.arange(len(cell))
            err = np.array([_err(r["mean"], r["lo"], r["hi"]) for r in cell]).T.reshape(2, -1)
            ax.errorbar(x, [r["mean"] for r in cell], yerr=err, fmt="o", capsize=4)
            for xi, r in zip(x, cell, strict=True):
                if r["cohen_d"] is not None:
                    ci = (f" [{r['d_lo']:.2g}, {r['d_hi']:.2g}]" if r["d_lo"] is not None else "")
                    ax.annotate(f"d={r['cohen_d']:.2g}{ci}", (xi, r["mean"]), textcoords="offset points",
                                xytext=(4, 4), fontsize=6)
            ax.set_xticks(x, [f"{r['grp']}\n(n={r['n_artifacts']})" for r in cell], fontsize=7,
                          rotation=30 if len(cell) > 3 else 0)
            if col == 0:
                ax.set_ylabel(METRIC_LABEL[metric], fontsize=8)
            if row_i == 0:
                ref = cell[0]["reference"] if cell else ""
                ax.set_title(f"by {grouping} (d vs {ref})", fontsize=9)
    level = rows[0]["level"] if rows else LEVEL
    fig.suptitle(f"Groups of artifacts: means with {100 * level:g}% bootstrap intervals "
                 f"(k = {params.get('k')}, eps = {params.get('eps')})")
    return fig


def _grid(cells: list[dict], value: str, layers: list[int], modules: list[str]) -> np.ndarray:
    grid = np.full((len(modules), len(layers)), np.nan)
    for c in cells:
        if c[value] is not None:
            grid[modules.index(c["module"]), layers.index(c["layer"])] = c[value]
    return grid


MAX_MODEL_MAPS = 12


def plot_layer_map(table: pa.Table, params: Params) -> Figure:
    """Layer x module heatmaps of intruders (left) and effective rank (right): first one row per
    group (kind, mean over its artifacts), then one per model (the first MAX_MODEL_MAPS)."""
    plt = _pyplot()
    rows = table.to_pylist()
    layers = sorted({r["layer"] for r in rows})
    modules = sorted({r["module"] for r in rows})
    entities: list[tuple[str, list[dict]]] = []
    for level in ("group", "model"):
        keyed: dict[str, list[dict]] = {}
        for r in rows:
            if r["level"] == level:
                keyed.setdefault(str(r["model_id"]), []).append(r)
        items = sorted(keyed.items())
        entities += items[:MAX_MODEL_MAPS] if level == "model" else items
    vmax_i = max([r["intruders"] for r in rows] + [1.0])
    width = 5.0 + 0.9 * len(layers)
    height = 0.9 + (0.22 * len(modules) + 0.6) * len(entities)
    fig, axes = plt.subplots(len(entities), 2, squeeze=False, layout="constrained", figsize=(width, height))
    for (name, cells), (ax_i, ax_r) in zip(entities, axes, strict=True):
        # pcolormesh, not imshow: identical maps (e.g. two models without intruders) would embed
        # identical images, which the SVG backend gives the same element id
        im_i = ax_i.pcolormesh(_grid(cells, "intruders", layers, modules), cmap="Reds", vmin=0, vmax=vmax_i)
        im_r = ax_r.pcolormesh(_grid(cells, "eff_rank", layers, modules), cmap="viridis")
        for ax, im in ((ax_i, im_i), (ax_r, im_r)):
            ax.set_yticks(np.arange(len(modules)) + 0.5, modules, fontsize=6)
            ax.set_xticks(np.arange(len(layers)) + 0.5, [str(layer) for layer in layers], fontsize=6)
            ax.invert_yaxis()
            fig.colorbar(im, ax=ax, shrink=0.8)
        ax_i.set_title(f"{name}: intruders", fontsize=8)
        ax_r.set_title(f"{name}: effective rank", fontsize=8)
    axes[-1][0].set_xlabel("layer")
    axes[-1][1].set_xlabel("layer")
    fig.suptitle(f"Layer x module maps (k = {params.get('k')}, eps = {params.get('eps')})\n"
                 "first rows: mean over each kind's artifacts (intervals in the table)", fontsize=9)
    return fig


def plot_components(table: pa.Table, params: Params) -> Figure:
    """Intruders per matrix (left) and mean effective rank (right) per component and layer kind,
    one bar per model."""
    plt = _pyplot()
    rows = table.to_pylist()
    cells = sorted({(r["component"], r["layer_kind"]) for r in rows})
    models = sorted(_by(rows, "model_uid").items(), key=lambda kv: str(kv[1][0]["model_id"]))
    style = _styles([uid for uid, _ in models])
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.1 * len(cells) + 4), 4.2), layout="constrained")
    width = 0.8 / max(1, len(models))
    x = np.arange(len(cells))
    for i, (uid, mrows) in enumerate(models):
        by_cell = {(r["component"], r["layer_kind"]): r for r in mrows}
        for ax, value in zip(axes, ("intruders_per_matrix", "eff_rank_mean"), strict=True):
            ys = [by_cell[c][value] if c in by_cell and by_cell[c][value] is not None else np.nan for c in cells]
            ax.bar(x + i * width - 0.4 + width / 2, ys, width, color=style[uid]["color"],
                   label=str(mrows[0]["model_id"]))
    for ax, label in zip(axes, ("intruders per matrix (U side)", "mean effective rank of dW"), strict=True):
        ax.set_xticks(x, [f"{c}\n{kind}" for c, kind in cells], fontsize=7, rotation=30 if len(cells) > 4 else 0)
        ax.set_ylabel(label)
    _legend(axes[0], len(models))
    fig.suptitle(f"By component and layer kind (k = {params.get('k')}, eps = {params.get('eps')})")
    return fig


_EPS_K = (("eps", AnalysisConfig.eps), ("k", AnalysisConfig.k))


STUDIES: dict[str, Study] = {s.name: s for s in [
    Study("intruders-eps", "Intruder dimensions vs eps", "Shuttleworth et al. 2024, Fig. 5",
          "study_intruders_eps", (("k", AnalysisConfig.k),), plot_intruders_eps,
          "any analysed model",
          "Per model, intruders among the top k singular vectors of every fine-tuned matrix, "
          "summed over matrices, for eps = 0.1 .. 0.9; grouped by kind, coloured by rank."),
    Study("intruders-fraction", "Intruders vs fraction of singular vectors examined",
          "Shuttleworth et al. 2024, Fig. 11", "study_intruders_fraction",
          (("eps", AnalysisConfig.eps), ("fractions", [0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.1, 0.2, 0.5, 1.0])),
          plot_intruders_fraction,
          "any analysed model (fractions above K_store / min(m, n) need --k-store all)",
          "k as a fraction of each matrix; only fractions every matrix of a model stored "
          "enough vectors for are shown."),
    Study("effective-rank", "Effective rank of dW by layer and module",
          "Shuttleworth et al. 2024, Fig. 6", "study_effective_rank", (), plot_effective_rank,
          "any analysed model", "Roy-Vetterli effective rank of the update, per layer and module."),
    Study("similarity", "Similarity of singular vectors, one matrix",
          "Shuttleworth et al. 2024, Figs 1 and 3", "study_similarity",
          (("model_name", None), ("tensor_name", None), ("eps", AnalysisConfig.eps)), plot_similarity,
          "a similarity block (analysed with sim_k >= 1)",
          "|<u0_i, ut_j>| for the top singular vectors of the pre-trained and fine-tuned matrix; "
          "by default the matrix with the most intruders."),
    Study("checkpoints", "Evolution over checkpoints", "Shuttleworth et al. 2024, Fig. 7",
          "study_checkpoints", _EPS_K, plot_checkpoints,
          "models named <series>@step<N> (analyse a checkpoint-* directory with checkpoint_refs)",
          "Intruders and effective rank of one adapter's checkpoints, ordered by step."),
    Study("alpha", "alpha = 2r versus fixed alpha", "LoRA rank/alpha sweeps", "study_alpha",
          _EPS_K, plot_alpha, "LoRA models with r and alpha",
          "Intruders and relative update size against rank, for alpha scaled with r or fixed."),
    Study("ab-balance", "LoRA A/B norm balance", "Hayou et al. 2024 (LoRA+)", "study_ab_balance",
          (), plot_ab_balance, "LoRA-family matrices (norm_a / norm_b recorded)",
          "||A||_F and ||B||_F of every LoRA matrix: with one learning rate B tends to stay small."),
    Study("pairs", "Adapter vs adapter subspace similarity", "Hu et al. 2021, sec. 7.2",
          "study_pairs", (("model_a", None), ("model_b", None)), plot_pairs,
          "pairs (analyse with --pairs)",
          "phi(i, j) = ||U_a[:, :i]^T U_b[:, :j]||_F^2 / min(i, j) of the updates' left singular "
          "vectors, averaged over the matrices both update."),
    Study("null", "Observed intruders vs a random-direction null", "null baseline (issue 15)",
          "study_null", _EPS_K, plot_null, "null draws (analyse with --null-draws B)",
          "Per model, intruders summed over matrices against B draws of updates with the same "
          "singular values and random directions: the null's mean, central 95% and the Monte Carlo "
          "tail probability p = (1 + #{draws >= observed}) / (1 + B) (docs/science.md#null)."),
    Study("intruder-norms", "Intruders weighted by size", "norm-aware measures (issue 15)",
          "study_intruder_norms", _EPS_K, plot_intruder_norms, "any analysed model",
          "Every top-k singular vector of Wt (U side): its max |cos| with the base and its share "
          "s_j(Wt)^2 / ||W0||_F^2 (share_dw: over ||dW||_F^2), so intruders can be weighed by size."),
    Study("groups", "Groups of artifacts with bootstrap intervals and effect sizes",
          "uncertainty over artifacts (issue 15)", "study_groups", _EPS_K, plot_groups,
          "at least one analysed model (intervals need two per group)",
          "Per kind, rank and alpha rule: mean intruders per matrix, intruders' share of ||W0||^2 "
          "and effective rank over artifacts, with seeded percentile bootstrap intervals; each "
          "group against the reference group (full fine-tunes, the smallest rank, alpha = 2r) as "
          "a difference of means and Cohen's d with intervals (docs/science.md#uncertainty).",
          post=groups_post, extra=BOOT_PARAMS),
    Study("layer-map", "Layer x module maps of intruders and effective rank",
          "layer maps (issue 15)", "study_layer_map", _EPS_K, plot_layer_map,
          "matrices with a block index (layer)",
          "Intruders and effective rank of dW per layer and module, per kind (mean over its "
          "artifacts, with bootstrap intervals in the rows) and per model.",
          post=layer_map_post, extra=BOOT_PARAMS),
    Study("components", "By component and layer kind", "image-model components (issue 16)",
          "study_components", _EPS_K, plot_components, "any analysed model (component: schema >= 1.3 rows)",
          "Per model, component (unet, transformer, text encoders; 'model' for one-model checkpoints) "
          "and layer kind (attention, convolution, feed-forward, other: the layer_kind macro): "
          "intruders per matrix, mean effective rank and relative update."),
]}
