"""Studies a reviewer asks for (issue 15): the random-direction null, norm-aware intruders, group
comparisons with bootstrap intervals and effect sizes, and layer x module maps.

The SQL side is in schemas/studies.sql (study_null, study_intruder_norms, study_groups,
study_layer_map); the Python side here adds what SQL does not do well (bootstrap over artifacts,
study/uncertainty.py) and draws the figures, every interval as an error bar.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ..errors import ConfigError
from .uncertainty import LEVEL, N_BOOT, SEED, effect, mean_ci

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Params = Mapping[str, Any]
BOOT_PARAMS = (("n_boot", N_BOOT), ("level", LEVEL), ("seed", SEED))
METRICS = ("intruders_per_matrix", "intruder_share_w0", "eff_rank_mean")
_METRIC_LABEL = {"intruders_per_matrix": "intruders per matrix",
                 "intruder_share_w0": "intruders' share of ||W0||_F^2",
                 "eff_rank_mean": "mean effective rank of dW"}


def boot_args(params: Params) -> dict[str, Any]:
    """n_boot, level, seed from a study's parameters, checked (ConfigError names the bad one)."""
    n_boot, level, seed = params.get("n_boot", N_BOOT), params.get("level", LEVEL), params.get("seed", SEED)
    if not isinstance(n_boot, int) or isinstance(n_boot, bool) or not 100 <= n_boot <= 200_000:
        raise ConfigError(f"n_boot must be an integer in 100..200000, got {n_boot!r}", option="param")
    if not isinstance(level, (int, float)) or isinstance(level, bool) or not 0.5 <= level < 1.0:
        raise ConfigError(f"level must lie in [0.5, 1), got {level!r}", option="param")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed must be an integer, got {seed!r}", option="param")
    return {"n_boot": n_boot, "level": float(level), "seed": seed}


# --- group comparisons ---------------------------------------------------------------------------
def _rank_key(row: Mapping[str, Any]) -> str | None:
    return f"r={row['r']}" if row.get("r") is not None and row.get("kind") != "full" else None


GROUPINGS: dict[str, Callable[[Mapping[str, Any]], str | None]] = {
    "kind": lambda row: row.get("kind"),
    "rank": _rank_key,
    "alpha rule": lambda row: row.get("alpha_rule"),
}

GROUPS_SCHEMA = pa.schema([
    ("grouping", pa.string()), ("grp", pa.string()), ("metric", pa.string()),
    ("n_artifacts", pa.int32()), ("mean", pa.float64()), ("lo", pa.float64()), ("hi", pa.float64()),
    ("reference", pa.string()), ("diff", pa.float64()), ("diff_lo", pa.float64()),
    ("diff_hi", pa.float64()), ("cohen_d", pa.float64()), ("d_lo", pa.float64()),
    ("d_hi", pa.float64()), ("level", pa.float64()), ("n_boot", pa.int32()), ("seed", pa.int64()),
])


def _order(grouping: str, label: str) -> tuple:
    if grouping == "rank":
        return (int(label.split("=")[1]), label)
    return (0, label)


def reference_group(grouping: str, groups: Mapping[str, list]) -> str:
    """What every other group is compared with: full fine-tunes for kinds (LoRA vs full), the
    smallest rank for ranks, alpha = 2r for alpha rules; else the largest group."""
    preferred = {"kind": "full", "alpha rule": "alpha = 2r"}.get(grouping)
    if preferred is not None and preferred in groups:
        return preferred
    if grouping == "rank":
        return min(groups, key=lambda g: _order(grouping, g))
    return max(sorted(groups), key=lambda g: len(groups[g]))


def groups_post(table: pa.Table, params: Params) -> pa.Table:
    """Per grouping, group and metric: the mean over artifacts with its bootstrap interval, and
    (other groups) the difference and Cohen's d against the reference group with theirs."""
    boot = boot_args(params)
    rows = table.to_pylist()
    out = []
    for grouping, key in GROUPINGS.items():
        groups: dict[str, list[dict]] = {}
        for row in rows:
            if (g := key(row)) is not None:
                groups.setdefault(g, []).append(row)
        if not groups:
            continue
        ref = reference_group(grouping, groups)
        for metric in METRICS:
            values = {g: [r[metric] for r in grows if r[metric] is not None] for g, grows in groups.items()}
            for g in sorted(groups, key=lambda g: _order(grouping, g)):
                if not values[g]:
                    continue
                label = f"{grouping}/{g}/{metric}"
                ci = mean_ci(values[g], label, **boot)
                row = {"grouping": grouping, "grp": g, "metric": metric, "n_artifacts": ci.n,
                       "mean": ci.mean, "lo": ci.lo, "hi": ci.hi, "reference": ref,
                       "level": boot["level"], "n_boot": boot["n_boot"], "seed": boot["seed"]}
                if g != ref and values[ref]:
                    e = effect(values[g], values[ref], f"{label} vs {ref}", **boot)
                    row.update(diff=e.diff, diff_lo=e.diff_lo, diff_hi=e.diff_hi, cohen_d=e.d,
                               d_lo=e.d_lo, d_hi=e.d_hi)
                out.append(row)
    return pa.Table.from_pylist(out, schema=GROUPS_SCHEMA)


# --- layer maps ----------------------------------------------------------------------------------
LAYER_SCHEMA = pa.schema([
    ("level", pa.string()), ("kind", pa.string()), ("r", pa.int32()), ("model_uid", pa.string()),
    ("model_id", pa.string()), ("layer", pa.int32()), ("module", pa.string()),
    ("n_models", pa.int32()), ("intruders", pa.float64()), ("intruders_lo", pa.float64()),
    ("intruders_hi", pa.float64()), ("eff_rank", pa.float64()), ("eff_rank_lo", pa.float64()),
    ("eff_rank_hi", pa.float64()), ("eps", pa.float64()), ("k", pa.int32()),
])


def layer_map_post(table: pa.Table, params: Params) -> pa.Table:
    """The model rows of study_layer_map, then one row per (kind, layer, module): the mean over
    the kind's artifacts that update that matrix, with bootstrap intervals over them."""
    boot = boot_args(params)
    rows = table.to_pylist()
    out = [{"level": "model", "kind": r["kind"], "r": r["r"], "model_uid": r["model_uid"],
            "model_id": r["model_id"], "layer": r["layer"], "module": r["module"], "n_models": 1,
            "intruders": float(r["n_intruders"]), "eff_rank": r["eff_rank"], "eps": r["eps"],
            "k": r["k"]} for r in rows]
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["kind"], r["layer"], r["module"]), []).append(r)
    for (kind, layer, module), crows in sorted(cells.items(), key=lambda kv: tuple(map(str, kv[0]))):
        label = f"layer-map/{kind}/{layer}/{module}"
        intr = mean_ci([float(r["n_intruders"]) for r in crows], label + "/intruders", **boot)
        ranks = [r["eff_rank"] for r in crows if r["eff_rank"] is not None]
        er = mean_ci(ranks, label + "/eff_rank", **boot) if ranks else None
        out.append({"level": "group", "kind": kind, "model_id": f"{kind} (mean of {intr.n})",
                    "layer": layer, "module": module, "n_models": intr.n, "intruders": intr.mean,
                    "intruders_lo": intr.lo, "intruders_hi": intr.hi,
                    "eff_rank": er.mean if er else None, "eff_rank_lo": er.lo if er else None,
                    "eff_rank_hi": er.hi if er else None, "eps": crows[0]["eps"], "k": crows[0]["k"]})
    return pa.Table.from_pylist(out, schema=LAYER_SCHEMA)


# --- figures ---------------------------------------------------------------------------------------
def _plt():
    from .studies import _pyplot

    return _pyplot()


def _err(mean: float, lo: float | None, hi: float | None) -> tuple[float, float]:
    """Error-bar lengths below and above; none (0) where there is no interval."""
    return (mean - lo if lo is not None else 0.0, hi - mean if hi is not None else 0.0)


def plot_null(table: pa.Table, params: Params) -> Figure:
    """Per model: the observed intruders (red) against the null's mean and central 95% (grey)."""
    plt = _plt()
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
    ax.set_xticks(x, [f"{r['model_id']}\n({r['kind']})" for r in rows], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(f"intruders (k = {params.get('k')}, eps = {params.get('eps')}),\nsum over matrices")
    ax.set_title(f"Observed intruders vs a random-direction null ({rows[0]['n_draws']} draws)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def plot_intruder_norms(table: pa.Table, params: Params) -> Figure:
    """max |cos| against the share of ||W0||_F^2 of every top-k vector; intruders left of eps."""
    from .studies import _by, _legend, _styles

    plt = _plt()
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
    plt = _plt()
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
                ax.set_ylabel(_METRIC_LABEL[metric], fontsize=8)
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
    plt = _plt()
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
        im_i = ax_i.imshow(_grid(cells, "intruders", layers, modules), cmap="Reds", vmin=0, vmax=vmax_i,
                           aspect="auto")
        im_r = ax_r.imshow(_grid(cells, "eff_rank", layers, modules), cmap="viridis", aspect="auto")
        for ax, im in ((ax_i, im_i), (ax_r, im_r)):
            ax.set_yticks(range(len(modules)), modules, fontsize=6)
            ax.set_xticks(range(len(layers)), [str(layer) for layer in layers], fontsize=6)
            fig.colorbar(im, ax=ax, shrink=0.8)
        ax_i.set_title(f"{name}: intruders", fontsize=8)
        ax_r.set_title(f"{name}: effective rank", fontsize=8)
    axes[-1][0].set_xlabel("layer")
    axes[-1][1].set_xlabel("layer")
    fig.suptitle(f"Layer x module maps (k = {params.get('k')}, eps = {params.get('eps')}); "
                 "group rows: mean over the kind's artifacts (intervals in the rows)")
    return fig
