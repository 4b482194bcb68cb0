"""Plan, then execute: frozen work units built from headers and configs only (no tensor data).

A unit is one base weight matrix with a batch of the artifacts that update it, so the base
matrix is read and decomposed once per batch. Plans are deterministic: the same inputs give the
same unit ids, which is what lets a rerun skip finished work and never duplicate rows.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from ..config import AnalysisConfig
from ..errors import ConfigError, error_row, redact
from ..io.refs import ModelRef

if TYPE_CHECKING:
    from ..adapters import Target
    from ..updates import Role


@dataclass(frozen=True)
class WorkUnit:
    unit_id: str
    base: ModelRef
    tensor: str                      # base checkpoint key
    shape: tuple[int, int]           # [out, in] after any transpose
    role: Role
    members: tuple[ModelRef, ...]    # artifacts whose update of `tensor` this unit analyses
    transpose_w0: bool = False       # GPT-2 Conv1D stores [in, out]


@dataclass
class Plan:
    bases: list[ModelRef]                    # every base a unit of this plan decomposes
    config: AnalysisConfig
    units: list[WorkUnit]
    models: list[dict]                       # rows for the `models` table
    errors: list[dict] = field(default_factory=list)   # plan-stage failures (rows for `errors`)
    skipped_pairs: int = 0                   # (model, tensor) pairs already in the results root

    @property
    def n_pairs(self) -> int:
        return sum(len(u.members) for u in self.units)


def base_key(unit: WorkUnit) -> tuple[str, str, bool]:
    """(base uid, tensor, transpose_w0): the base matrix a unit decomposes. The base uid is part
    of it because one plan may span several bases whose tensors share names."""
    return (unit.base.uid, unit.tensor, unit.transpose_w0)


def base_tensors(units: Sequence[WorkUnit]) -> list[tuple[str, str, bool]]:
    """base_key of every base matrix the units touch, in unit order: one base decomposition is
    scheduled per entry, ahead of that matrix's units."""
    return list(dict.fromkeys(base_key(u) for u in units))


def unit_id_for(base: ModelRef, tensor: str, members: Sequence[ModelRef], cfg: AnalysisConfig) -> str:
    key = json.dumps([base.uid, tensor, sorted(m.uid for m in members), cfg.fingerprint()])
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def build_plan(
    base: ModelRef,
    artifacts: Iterable[ModelRef],
    cfg: AnalysisConfig,
    *,
    batch_size: int = 32,
    done_pairs: set[tuple[str, str]] | frozenset = frozenset(),
    run_id: str = "",
) -> Plan:
    """Read the base's headers and every artifact's config/headers; group updates by base tensor.

    An artifact that cannot be planned (bad config, other base, corrupt header) becomes an error
    row and the rest of the plan goes on. Pairs in `done_pairs` are already in the results.
    """
    from ..adapters import open_artifact
    from ..io.quantized import open_base

    if not isinstance(batch_size, int) or batch_size < 1:  # range(0, n, 0) raises, negatives plan nothing
        raise ConfigError(f"--batch-size must be an integer >= 1, got {batch_size!r}", option="batch_size")
    base_ckpt = open_base(base.open_source())  # bitsandbytes / GGUF bases read dequantised
    by_tensor: dict[str, list[ModelRef]] = defaultdict(list)
    target_of: dict[str, Target] = {}
    # (hub helper fix) the pair counter had the same name as the per-model `skipped` list below
    models, errors, n_done_pairs = [], [], 0
    for ref in sorted(set(artifacts)):
        try:
            art = open_artifact(ref.open_source(), model_id=ref.model_id)
            targets = art.targets(base_ckpt)
            skipped = [f"{key}: {why}" for key, why in art.skipped]
            if not cfg.include_embeddings:  # reported, kept apart: the paper studies the linear layers
                skipped += [f"{t.tensor}: role {t.role} not analysed (pass --embeddings)"
                            for t in targets if t.role != "linear"]
                targets = [t for t in targets if t.role == "linear"]
            row = _model_row(ref, base, art, len(targets), run_id, skipped)
            row["base_quant"] = base_quantization(base_ckpt, targets)
        except Exception as err:  # noqa: BLE001 - any failure of one artifact is its own row
            errors.append(error_row("plan", err, model=ref))
            continue
        models.append(row)
        for t in targets:
            if (ref.uid, t.tensor) in done_pairs:
                n_done_pairs += 1
                continue
            by_tensor[t.tensor].append(ref)
            target_of.setdefault(t.tensor, t)

    units = []
    for tensor in sorted(by_tensor):
        t = target_of[tensor]
        refs = sorted(by_tensor[tensor], key=lambda r: r.uid)
        for i in range(0, len(refs), batch_size):
            batch = tuple(refs[i : i + batch_size])
            units.append(
                WorkUnit(
                    unit_id=unit_id_for(base, tensor, batch, cfg),
                    base=base,
                    tensor=tensor,
                    shape=(t.shape[0], t.shape[1]),
                    role=t.role,
                    members=batch,
                    transpose_w0=bool(getattr(t, "transpose", False)),
                )
            )
    return Plan(bases=[base], config=cfg, units=units, models=models, errors=errors, skipped_pairs=n_done_pairs)


def base_quantization(base_ckpt, targets: Sequence[Target]) -> str | None:
    """How the base matrices these targets update were dequantised ("gguf Q4_K; gguf Q6_K"), None
    when the base is stored in a float dtype: the numbers are then against the dequantised base."""
    found = sorted({q for t in targets if (q := base_ckpt.quantization_of(t.tensor))})
    return "; ".join(found) or None


def plan_by_base(
    artifacts: Iterable[ModelRef],
    cfg: AnalysisConfig,
    base_of: Callable[[ModelRef], ModelRef],
    *,
    batch_size: int = 32,
    done_pairs: set[tuple[str, str]] | frozenset = frozenset(),
    run_id: str = "",
) -> Plan:
    """One plan over several bases: artifacts grouped by `base_of(artifact)` (the --base given,
    or what each artifact's config names), one build_plan per group, merged.

    An artifact whose base cannot be resolved, and every artifact of a base that cannot be
    opened, becomes an `errors` row naming what to pass; the other groups are planned."""
    from ..errors import ZoospectraError

    groups: dict[str, tuple[ModelRef, list[ModelRef]]] = {}
    errors: list[dict] = []
    for ref in sorted(set(artifacts)):
        try:
            base = base_of(ref)
        except ZoospectraError as err:
            errors.append(error_row("plan", err, model=ref))
            continue
        groups.setdefault(base.uid, (base, []))[1].append(ref)
    plans = []
    for base, refs in groups.values():
        try:
            plans.append(build_plan(base, refs, cfg, batch_size=batch_size, done_pairs=done_pairs,
                                    run_id=run_id))
        except ZoospectraError as err:  # the base itself is unreadable: a row per artifact on it
            if isinstance(err, ConfigError):
                raise  # a bad option, not a bad base
            errors += [error_row("plan", err, model=ref) for ref in refs]
    return Plan(bases=[p.bases[0] for p in plans], config=cfg,
                units=[u for p in plans for u in p.units], models=[m for p in plans for m in p.models],
                errors=errors + [e for p in plans for e in p.errors],
                skipped_pairs=sum(p.skipped_pairs for p in plans))


def _model_row(ref: ModelRef, base: ModelRef, art, n_targets: int, run_id: str,
               skipped: list[str]) -> dict:
    row = dict(art.describe())
    if row.get("config_json"):  # a config is the author's text: never let it carry a token
        row["config_json"] = redact(row["config_json"])
    row.update(
        run_id=run_id,
        model_uid=ref.uid,
        model_id=ref.model_id,
        revision=ref.revision,
        kind=art.kind,
        source=ref.source,
        location=ref.location,
        base_uid=base.uid,
        base_id=base.model_id,
        base_revision=base.revision,
        n_targets=n_targets,
        skipped=skipped,
        warnings=base_warnings(getattr(art, "config", None), base),
        created_at=datetime.now(timezone.utc),
    )
    _check_model_row(row, ref)
    return row


def _same_base(named: str, base: ModelRef) -> bool:
    """Whether an adapter's base_model_name_or_path names `base`: the same id (case-insensitive,
    as the Hub treats ids), the same last id component, or the same local directory."""
    want = named.strip().rstrip("/").lower()
    ids = {base.model_id.lower(), base.location.rstrip("/").lower()}
    if want in ids or want.rsplit("/", 1)[-1] in {i.rsplit("/", 1)[-1] for i in ids}:
        return True
    try:
        return base.source == "local" and os.path.isdir(named) and \
            os.path.samefile(named, base.location)
    except OSError:
        return False


def base_warnings(config: object, base: ModelRef) -> list[str]:
    """A warning when the adapter's config names another base than the one it is analysed
    against: the numbers are then a delta against a model it was not trained on."""
    named = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(named, str) or not named.strip() or _same_base(named, base):
        return []
    return [redact(f"adapter_config.json names base {named!r}, but it is analysed against "
                   f"{base.model_id!r} ({base.location}); pass the base it was trained on, or "
                   "--base-name if that directory holds the same model")]


def _check_model_row(row: dict, ref: ModelRef) -> None:
    """A config field that cannot be stored (r beyond int32, target_modules of numbers, ...) is
    this artifact's plan error: written later with every other model row, it would sink the run."""
    import pyarrow as pa

    from ..errors import AdapterConfigError
    from ..schemas.tables import schema_for, to_table

    try:
        to_table("models", [row]).cast(schema_for("models"))
    except (pa.ArrowException, TypeError, ValueError, OverflowError) as err:
        raise AdapterConfigError(f"adapter_config.json holds values the models table cannot store "
                                 f"({type(err).__name__}: {err}); fix the config", file=ref.location) from None
