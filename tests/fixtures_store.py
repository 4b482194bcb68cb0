"""Synthetic results for the store and SQL tests: three models, three base matrices.

Rows are built with zoospectra.schemas.tables.to_table, so they follow the data contract. The
max |cos| values are rounded to 2 decimals on purpose: many land exactly on the eps grid
(0.1, ..., 0.9), which checks that the intruder test is strict (max_cos < eps).
"""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from zoospectra.schemas.tables import to_table

RUN_ID = "run-1"
# model_uid -> (model_id, kind, r, alpha); "c3" has no intruders at all (every max_cos 0.99).
MODELS = {
    "a1": ("org/lora-r8", "lora", 8, 16.0),
    "b2": ("org/full-ft", "full", None, None),
    "c3": ("org/clean", "lora", 4, 8.0),
}
# tensor -> (module, layer, m, n, vectors stored per side). t0 and t2 store all min(m, n)
# vectors; t1 stores 12 of 16, so k <= 12 is valid there and k = 13 must be refused.
TENSORS = {
    "enc.0.q.weight": ("q", 0, 12, 8, 8),
    "enc.0.ffn.weight": ("ffn", 0, 24, 16, 12),
    "enc.1.q.weight": ("q", 1, 20, 10, 10),
}


@dataclass
class Zoo:
    units: list[tuple[str, dict[str, pa.Table], list[tuple[str, str]]]] = field(default_factory=list)
    vectors: list[dict] = field(default_factory=list)
    matrices: list[dict] = field(default_factory=list)
    models: list[dict] = field(default_factory=list)


def unit_id_for(tensor: str) -> str:
    return "u-" + tensor.replace(".", "_")


def build_zoo(seed: int = 0) -> Zoo:
    rng = np.random.default_rng(seed)
    zoo = Zoo(models=[model_row(uid) for uid in MODELS])
    for tensor, (module, layer, m, n, stored) in TENSORS.items():
        unit_id = unit_id_for(tensor)
        vec, mat = [], []
        for uid, (model_id, kind, r, alpha) in MODELS.items():
            ident = dict(run_id=RUN_ID, unit_id=unit_id, model_uid=uid, model_id=model_id, tensor=tensor)
            for side in "UV":
                cos = np.full(stored, 0.99) if uid == "c3" else np.round(rng.uniform(0, 1, stored), 2)
                vec += [dict(ident, side=side, j=j, sigma=float(10 - j / 10), max_cos=float(c),
                             argmax_i=j, base_sigma=1.0) for j, c in enumerate(cos, 1)]
            mat.append(dict(
                ident, base_uid="base", module=module, layer=layer, role="linear", kind=kind,
                m=m, n=n, rank=r, alpha=alpha, eff_rank=float(rng.uniform(1, 8)),
                rel_update=float(rng.uniform(0, 0.2)), intr_k=10, intr_eps=0.5, intruders_u=0,
                intruders_v=0, mode="exact", device="cpu", seconds=0.01,
            ))
        spectra = [dict(run_id=RUN_ID, unit_id=unit_id, model_uid="a1", model_id="org/lora-r8",
                        tensor=tensor, which="dw", idx=i, sigma=1.0 / i) for i in range(1, 4)]
        zoo.vectors += vec
        zoo.matrices += mat
        tables = {
            "matrices": to_table("matrices", mat),
            "vectors": to_table("vectors", vec),
            "spectra": to_table("spectra", spectra),
            "similarity": to_table("similarity", []),  # empty tables are allowed (not written)
        }
        zoo.units.append((unit_id, tables, [(uid, tensor) for uid in MODELS]))
    return zoo


def model_row(uid: str) -> dict:
    model_id, kind, r, alpha = MODELS[uid]
    return dict(run_id=RUN_ID, model_uid=uid, model_id=model_id, kind=kind, source="local",
                base_uid="base", base_id="minilm", r=r, alpha=alpha,
                target_modules=["query", "value"], base_rewritten=False)


def one_unit(unit_id: str = "u1", model_uid: str = "a1", n_vectors: int = 4) -> dict[str, pa.Table]:
    """A small unit (matrices + vectors) for store tests."""
    ident = dict(run_id=RUN_ID, unit_id=unit_id, model_uid=model_uid, model_id="org/x", tensor="t")
    mat = [dict(ident, base_uid="base", role="linear", kind="lora", m=8, n=4, intr_k=2, intr_eps=0.5,
                intruders_u=1, intruders_v=0, mode="exact", device="cpu", seconds=0.1)]
    vec = [dict(ident, side="U", j=j, sigma=1.0, max_cos=0.2 * j, argmax_i=j, base_sigma=1.0)
           for j in range(1, n_vectors + 1)]
    return {"matrices": to_table("matrices", mat), "vectors": to_table("vectors", vec)}


@contextmanager
def memory_zoo_root() -> Iterator[tuple[str, str, object, Zoo]]:
    """(uri, name, fsspec memory filesystem, zoo): build_zoo's units committed under a fresh
    memory:// results root, removed afterwards."""
    import fsspec

    from zoospectra.run.store import ResultsStore

    name = f"zs-{uuid.uuid4().hex[:8]}"
    uri, mem = f"memory://{name}", fsspec.filesystem("memory")
    zoo = build_zoo()
    try:
        store = ResultsStore(uri)
        for unit_id, tables, done in zoo.units:
            store.commit_unit(unit_id, tables, done)
        yield uri, name, mem, zoo
    finally:
        mem.rm(f"/{name}", recursive=True)
