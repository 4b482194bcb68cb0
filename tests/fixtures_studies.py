"""Session fixtures for the studies, report and mitigation tests: a small real zoo on the shipped
MiniLM base, analysed by the real pipeline (plan + execute, in-process), and the engine's own
numbers for the same matrices (spectral.analyze_batch, bypassing records, store and SQL).

Zoo (LoRA on query/value of layers 0-2, so every analysis stays small):
  lora_r2_a4, lora_r8_a16   alpha = 2r
  lora_r2_a8, lora_r8_a8    alpha fixed at 8
  full_ft                   a full fine-tune (every linear layer)
  lora_ckpt@step4/8/16      three checkpoints of one training run (checkpoint-N folders)
  mit_r8                    LoRA with rank_pattern / alpha_pattern and intruders, for mitigation

Set ZOOSPECTRA_STUDIES_CACHE=DIR to keep the trained zoo between sessions (development only).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest

from zoospectra.config import AnalysisConfig
from zoospectra.demo.zoo import ZooSpec, build_zoo, minilm_dir
from zoospectra.io.refs import ModelRef, local_ref

BASE_ID = "sentence-transformers/all-MiniLM-L6-v2"
LAYERS = [0, 1, 2]
CFG = AnalysisConfig(pairs=True, null_draws=5)   # a few null draws: the null study has rows
CKPT_STEPS = (4, 8, 16)


def _lora(name: str, r: int, alpha: float, lr: float = 2e-2, steps: int = 16, **extra) -> ZooSpec:
    return ZooSpec(name, {"peft_type": "LORA", "r": r, "lora_alpha": alpha,
                          "target_modules": ["query", "value"], "layers_to_transform": LAYERS,
                          **extra}, steps=steps, lr=lr)


ZOO_SPECS = [
    _lora("lora_r2_a4", 2, 4), _lora("lora_r8_a16", 8, 16),
    _lora("lora_r2_a8", 2, 8), _lora("lora_r8_a8", 8, 8),
    ZooSpec("full_ft", steps=6),
]
CKPT_SPEC = _lora("lora_ckpt", 4, 8)
MIT_SPEC = _lora("mit_r8", 8, 16, lr=3e-2, steps=20,
                 rank_pattern={"value": 4}, alpha_pattern={"query": 4})


@dataclass
class StudyZoo:
    root: Path                               # results root
    zoo_dir: Path
    base: ModelRef
    paths: dict[str, Path]                   # model_id -> artifact directory
    refs: dict[str, ModelRef] = field(default_factory=dict)


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread while the fixtures decompose: on a shared 2-core machine a second
    OpenMP thread competing with other processes made LAPACK's SVDs 25-50x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("ZOOSPECTRA_STUDIES_CACHE")
    if env:
        Path(env).mkdir(parents=True, exist_ok=True)
        return Path(env)
    return tmp_path_factory.mktemp("studies_zoo")


def build_study_zoo(zoo_dir: Path) -> dict[str, Path]:
    """Artifacts by model id; the checkpoints as lora_ckpt/checkpoint-<N> folders."""
    paths = dict(zip([s.name for s in ZOO_SPECS], build_zoo(zoo_dir, ZOO_SPECS), strict=True))
    ckpt_specs = [replace(CKPT_SPEC, name=f"checkpoint-{n}", steps=n) for n in CKPT_STEPS]
    build_zoo(zoo_dir / "lora_ckpt", ckpt_specs)  # same seed: one trajectory, cut at each step
    paths["lora_ckpt"] = zoo_dir / "lora_ckpt"
    paths["mit_r8"] = build_zoo(zoo_dir, [MIT_SPEC])[0]
    return paths


# Test modules import these fixtures, and pytest makes one fixture per importing module, so a
# "session" fixture would be built once per module: memoise here to build it once per session.
_SESSION: dict[str, object] = {}


@pytest.fixture(scope="session")
def study_zoo(tmp_path_factory: pytest.TempPathFactory) -> StudyZoo:
    if "zoo" not in _SESSION:
        with one_thread():
            _SESSION["zoo"] = _analysed_zoo(_cache_dir(tmp_path_factory), tmp_path_factory)
    return _SESSION["zoo"]  # type: ignore[return-value]


def _analysed_zoo(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> StudyZoo:
    import torch

    from zoospectra.run.execute import run_plan
    from zoospectra.run.plan import build_plan
    from zoospectra.run.store import ResultsStore
    from zoospectra.study.studies import checkpoint_refs

    paths = build_study_zoo(zoo_dir)
    torch.set_num_threads(1)  # build_zoo sets its own thread count
    base = local_ref(minilm_dir(), BASE_ID)
    refs = {s.name: local_ref(paths[s.name], s.name) for s in ZOO_SPECS}
    refs.update({r.model_id: r for r in checkpoint_refs(paths["lora_ckpt"])})
    root = tmp_path_factory.mktemp("studies_results")
    plan = build_plan(base, list(refs.values()), CFG, done_pairs=ResultsStore(root).done_pairs())
    assert not plan.errors, plan.errors
    summary = run_plan(plan, str(root), executor="local")
    assert summary.n_failed == 0 and summary.n_member_errors == 0
    return StudyZoo(root=root, zoo_dir=zoo_dir, base=base, paths=paths, refs=refs)


@dataclass
class EngineNumbers:
    """The engine's analysis of every (model_id, tensor) of the zoo, and the phi grids of pairs."""

    items: dict[tuple[str, str], object]                         # -> MatrixAnalysis
    pairs: dict[tuple[str, str, str], np.ndarray]                 # (id_a, id_b, tensor) -> phi
    norms: dict[tuple[str, str], tuple[float, float]]            # -> (||A||_F, ||B||_F)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)

    def models(self) -> list[str]:
        return sorted({m for m, _ in self.items})

    def of(self, model_id: str) -> dict[str, object]:
        return {t: it for (m, t), it in self.items.items() if m == model_id}


@pytest.fixture(scope="session")
def engine(study_zoo: StudyZoo) -> EngineNumbers:
    """spectral.analyze_batch on W0 and each artifact's exact update, one batch per base tensor."""
    if "engine" not in _SESSION:
        with one_thread():
            _SESSION["engine"] = _engine_numbers(study_zoo)
    return _SESSION["engine"]  # type: ignore[return-value]


def _engine_numbers(study_zoo: StudyZoo) -> EngineNumbers:
    from collections import defaultdict

    from zoospectra.adapters import open_artifact
    from zoospectra.io.checkpoint import Checkpoint
    from zoospectra.spectral import analyze_batch

    base = Checkpoint.open(study_zoo.base.location)
    arts = {mid: open_artifact(ref.location) for mid, ref in study_zoo.refs.items()}
    by_tensor: dict[str, list[str]] = defaultdict(list)
    for mid, art in arts.items():
        for t in art.targets(base):
            if t.role == "linear":
                by_tensor[t.tensor].append(mid)
    out = EngineNumbers({}, {}, {})
    for tensor, mids in sorted(by_tensor.items()):
        w0 = base.get(tensor)
        updates = [arts[m].load_update(tensor, base, w0=w0) for m in mids]
        for m, upd in zip(mids, updates, strict=True):
            upd.null_key = study_zoo.refs[m].uid      # the run's seeds (run/unit.py)
        batch = analyze_batch(w0, updates, CFG)
        out.shapes[tensor] = tuple(w0.shape)
        for mid, upd, item in zip(mids, updates, batch.items, strict=True):
            out.items[(mid, tensor)] = item
            if upd.norm_a is not None:
                out.norms[(mid, tensor)] = (upd.norm_a, upd.norm_b)
        for pair in batch.pairs:
            a, b = mids[pair.a], mids[pair.b]
            out.pairs[(a, b, tensor)] = pair.phi
            out.pairs[(b, a, tensor)] = pair.phi.T
    return out
