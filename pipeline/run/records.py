"""Analysis results -> Arrow tables of exactly the schemas in schemas/tables.py.

One call per unit of work (one base tensor with a batch of updates). Indices become 1-based
here, as the schemas say; undefined statistics (None) become nulls.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..config import AnalysisConfig
from ..schemas.tables import schema_for, to_table
from ..spectral.results import BatchAnalysis, MatrixAnalysis, NullDraws, SideVectors
from ..updates import MatrixUpdate

TABLE_NAMES = ("matrices", "vectors", "spectra", "similarity", "pairs", "null_vectors")


@dataclass(frozen=True)
class UnitContext:
    """Identity of the rows one unit writes; members[i] = (model_uid, model_id) of updates[i]."""

    run_id: str
    unit_id: str
    base_uid: str
    base_id: str
    tensor: str
    members: tuple[tuple[str, str], ...]
    component: str | None = None            # unet|transformer|text_encoder|... of an image-model base
    kernel_shape: tuple[int, ...] | None = None  # stored [out, in, kh, kw] of a convolution


def split_tensor_key(key: str) -> tuple[int | None, str]:
    """(layer, module) from a checkpoint key: the first all-digit path segment is the block index.

    "encoder.layer.3.attention.self.query.weight" -> (3, "attention.self.query");
    "lm_head.weight" -> (None, "lm_head").
    """
    path = key[: -len(".weight")] if key.endswith(".weight") else key
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit() and 0 < i < len(parts) - 1:
            return int(part), ".".join(parts[i + 1 :])
    return None, path


def _float(x: float | None) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def _matrix_row(ctx: UnitContext, member: tuple[str, str], update: MatrixUpdate,
                item: MatrixAnalysis, device: str) -> dict:
    layer, module = split_tensor_key(ctx.tensor)
    ratio = (update.norm_b / update.norm_a
             if update.norm_a is not None and update.norm_b is not None and update.norm_a > 0
             else None)
    return {
        "run_id": ctx.run_id, "unit_id": ctx.unit_id,
        "model_uid": member[0], "model_id": member[1], "base_uid": ctx.base_uid,
        "tensor": ctx.tensor, "module": module, "layer": layer,
        "role": update.role, "kind": update.kind, "m": item.shape[0], "n": item.shape[1],
        "rank": update.rank, "alpha": update.alpha, "scale": update.scale,
        "norm_w0": item.norm_w0, "norm_dw": item.norm_dw, "spec_norm_dw": item.spec_norm_dw,
        "stable_rank": _float(item.stable_rank), "rel_update": _float(item.rel_update),
        "eff_rank": _float(item.eff_rank),
        "norm_a": update.norm_a, "norm_b": update.norm_b, "ab_ratio": ratio,
        "intr_k": item.intr_k, "intr_eps": item.intr_eps,
        "intruders_u": item.intruders_u, "intruders_v": item.intruders_v,
        "amplification": _float(item.amplification), "amp_rank": item.amp_rank,
        "base_rewritten": update.base_rewritten, "warnings": list(update.warnings),
        "mode": item.mode, "device": device, "seconds": item.seconds,
        "component": ctx.component, "kernel_shape": None if ctx.kernel_shape is None else list(ctx.kernel_shape),
    }


def _columns(name: str, n: int, const: dict, cols: dict[str, np.ndarray]) -> pa.Table:
    """A table of `name`'s schema with n rows: per-row `cols`, `const` repeated, the rest null.

    Columnar on purpose: with k_store / sim_k = all, one matrix can give millions of rows.
    """
    schema = schema_for(name)
    arrays = []
    for field in schema:
        if field.name in cols:
            arrays.append(pa.array(cols[field.name], type=field.type))
        elif field.name in const:
            arrays.append(pa.repeat(pa.scalar(const[field.name], type=field.type), n))
        else:
            arrays.append(pa.nulls(n, field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _vectors(head: dict, side: str, vecs: SideVectors) -> pa.Table:
    n = len(vecs)
    return _columns("vectors", n, {**head, "side": side}, {
        "j": np.arange(1, n + 1), "sigma": vecs.sigma, "max_cos": vecs.max_cos,
        "argmax_i": vecs.argmax + 1, "base_sigma": vecs.base_sigma})


def _null_vectors(head: dict, null: NullDraws) -> list[pa.Table]:
    """Draw-major rows (draw, j) of each side: B x K per side."""
    draws, k = null.sigma.shape
    draw, j = np.meshgrid(np.arange(1, draws + 1), np.arange(1, k + 1), indexing="ij")
    const = {**head, "null_rank": null.rank}
    return [_columns("null_vectors", draws * k, {**const, "side": side}, {
        "draw": draw.ravel(), "j": j.ravel(), "sigma": null.sigma.ravel(), "max_cos": cos.ravel()})
        for side, cos in (("U", null.max_cos_u), ("V", null.max_cos_v))]


def _spectrum(head: dict, which: str, sigma: np.ndarray) -> pa.Table:
    return _columns("spectra", len(sigma), {**head, "which": which},
                    {"idx": np.arange(1, len(sigma) + 1), "sigma": sigma})


def _grid(name: str, head: dict, values: np.ndarray, value_column: str) -> pa.Table:
    """Row-major rows of a 2-D grid: (i, j, value) with 1-based i (rows) and j (columns)."""
    rows, cols = values.shape
    i, j = np.meshgrid(np.arange(1, rows + 1), np.arange(1, cols + 1), indexing="ij")
    return _columns(name, rows * cols, head,
                    {"i": i.ravel(), "j": j.ravel(), value_column: values.ravel()})


def _check_aligned(ctx: UnitContext, updates: Sequence[MatrixUpdate], analysis: BatchAnalysis) -> None:
    if not (len(ctx.members) == len(updates) == len(analysis.items)):
        raise ValueError(
            f"unit {ctx.unit_id}: {len(ctx.members)} members, {len(updates)} updates and "
            f"{len(analysis.items)} analysed items must align one to one")
    if updates and analysis.tensor != ctx.tensor:
        raise ValueError(f"unit {ctx.unit_id}: analysis is of {analysis.tensor!r}, "
                         f"context names {ctx.tensor!r}")


def unit_tables(ctx: UnitContext, updates: Sequence[MatrixUpdate], analysis: BatchAnalysis,
                cfg: AnalysisConfig) -> dict[str, pa.Table]:
    """Rows of one unit for every per-matrix table; `pairs` is an empty table when none.

    `cfg` is the configuration the analysis ran with; every number written comes from
    `analysis` itself (intr_k / intr_eps included), so rows stay true to what was computed.
    """
    _check_aligned(ctx, updates, analysis)
    unit = {"run_id": ctx.run_id, "unit_id": ctx.unit_id, "tensor": ctx.tensor}
    parts: dict[str, list[pa.Table]] = {name: [] for name in TABLE_NAMES if name != "matrices"}
    base_head = {**unit, "model_uid": ctx.base_uid, "model_id": ctx.base_id}
    parts["spectra"].append(_spectrum(base_head, "w0", analysis.spectrum_w0))
    for member, item in zip(ctx.members, analysis.items, strict=True):
        head = {**unit, "model_uid": member[0], "model_id": member[1]}
        parts["vectors"] += [_vectors(head, "U", item.u), _vectors(head, "V", item.v)]
        parts["spectra"] += [_spectrum(head, "wt", item.spectrum_wt),
                             _spectrum(head, "dw", item.spectrum_dw)]
        parts["similarity"].append(_grid("similarity", head, item.similarity, "value"))
        if item.null is not None:
            parts["null_vectors"] += _null_vectors(head, item.null)
    for pair in analysis.pairs:
        (uid_a, id_a), (uid_b, id_b) = ctx.members[pair.a], ctx.members[pair.b]
        head = {**unit, "model_uid_a": uid_a, "model_id_a": id_a,
                "model_uid_b": uid_b, "model_id_b": id_b}
        parts["pairs"].append(_grid("pairs", head, pair.phi, "phi"))
    matrices = [_matrix_row(ctx, member, update, item, analysis.device)
                for member, update, item in zip(ctx.members, updates, analysis.items, strict=True)]
    tables = {"matrices": to_table("matrices", matrices)}
    for name, tabs in parts.items():
        tables[name] = pa.concat_tables(tabs) if tabs else to_table(name, [])
    return tables
