"""Studies a reviewer asks for (issue 15): the random-direction null, norm-aware intruders, group
comparisons with bootstrap intervals and effect sizes, and layer x module maps.

The SQL side is in schemas/studies.sql (study_null, study_intruder_norms, study_groups,
study_layer_map); the Python side here adds what SQL does not do well (bootstrap over artifacts,
study/uncertainty.py); their figures (every interval an error bar) are in studies.py.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pyarrow as pa

from ..errors import ConfigError
from .uncertainty import LEVEL, N_BOOT, SEED, effect, mean_ci

Params = Mapping[str, Any]
BOOT_PARAMS = (("n_boot", N_BOOT), ("level", LEVEL), ("seed", SEED))
METRICS = ("intruders_per_matrix", "intruder_share_w0", "eff_rank_mean")
METRIC_LABEL = {"intruders_per_matrix": "intruders per matrix",
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
