"""--dtype float64 is float64 end to end, and float32 runs keep the real singular values of
full-rank updates (the effective-rank zero tolerance, spectral.stats.zero_tolerance)."""
from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from zoospectra.adapters import open_artifact, read_base
from zoospectra.config import ALL, AnalysisConfig
from zoospectra.demo.zoo import ZooSpec, build_zoo, load_model, lora
from zoospectra.io.checkpoint import Checkpoint
from zoospectra.io.refs import local_ref
from zoospectra.run.execute import run_plan
from zoospectra.run.plan import build_plan
from zoospectra.spectral import analyze_batch

LOHA_R = 4  # (w1a @ w1b) * (w2a @ w2b): a Hadamard product of two rank-4 matrices has rank <= 16


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    specs = [ZooSpec("loha", {"peft_type": "LOHA", "r": LOHA_R, "alpha": 8, "target_modules": ["query"]}),
             lora("dora", 4, 8, targets=("query", "value"), use_dora=True)]
    paths = build_zoo(tmp_path_factory.mktemp("zoo"), specs, steps=4)
    return {s.name: p for s, p in zip(specs, paths, strict=True)}


def _peft_merge_delta(minilm_dir: Path, adapter: Path) -> dict[str, np.ndarray]:
    """Independent reference: PEFT's own merge of the adapter into a float64 model, minus W0."""
    from peft import PeftModel

    model = load_model("minilm", minilm_dir).double()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().state_dict()
    return {k: (merged[k] - before[k]).numpy() for k in merged if "query.weight" in k}


def test_float64_loha_spectrum_is_exactly_rank_16(minilm_dir, adapters, tmp_path) -> None:
    """Through a real run: formed in float32, the tail was ~1e-8 s1 noise (effective rank inflated)."""
    out = tmp_path / "results"
    cfg = AnalysisConfig(dtype="float64", k_spec=ALL, k_store=10, sim_k=1)
    plan = build_plan(local_ref(str(minilm_dir), "minilm"), [local_ref(str(adapters["loha"]), "loha")], cfg)
    assert run_plan(plan, str(out), executor="local").n_done == 6
    spectra = duckdb.sql(f"""SELECT tensor, list(sigma ORDER BY idx) FROM read_parquet(
                             '{out}/units/*/spectra.parquet') WHERE which = 'dw' GROUP BY tensor""").fetchall()
    reference = _peft_merge_delta(minilm_dir, adapters["loha"])
    assert len(spectra) == 6
    for tensor, sigma in spectra:
        sigma = np.asarray(sigma)
        assert sigma.size == 384
        assert np.all(sigma[LOHA_R**2:] <= 1e-12 * sigma[0]), (tensor, sigma[LOHA_R**2] / sigma[0])
        want = np.linalg.svd(reference[tensor], compute_uv=False)[: LOHA_R**2]
        np.testing.assert_allclose(sigma[: LOHA_R**2], want, rtol=1e-9)
        assert sigma[LOHA_R**2 - 1] > 1e-6 * sigma[0]                  # the true rank is really 16


def test_float64_updates_are_formed_in_float64(minilm_dir, adapters) -> None:
    """The loader keeps the run's precision for every kind: dense (LoHa, DoRA) and factored."""
    base = Checkpoint.open(minilm_dir)
    for name in ("loha", "dora"):
        art = open_artifact(adapters[name])
        t = art.targets(base)[0]
        upd = art.load_update(t, base, dtype=torch.float64)
        assert upd.dense is not None and upd.dense.dtype == torch.float64, name
        assert art.load_update(t, base).dense.dtype == torch.float32, name  # float32 stays compact


def test_dora_float32_effective_rank_matches_float64(minilm_dir, adapters) -> None:
    """DoRA's dense dW is full rank with values down to ~10 eps32 * s1: the float32 run must keep
    them. With the old max(m, n) * eps tolerance these four matrices differed by 7e-5..1.6e-4."""
    base = Checkpoint.open(minilm_dir)
    art = open_artifact(adapters["dora"])
    targets = [t for t in art.targets(base) if ".layer.0." in t.tensor or ".layer.3." in t.tensor]
    assert len(targets) == 4
    for t in targets:
        w0 = read_base(base, t)
        got = {}
        for dtype in ("float32", "float64"):
            cfg = AnalysisConfig(dtype=dtype, k_store=10, k_spec=ALL, sim_k=1)
            upd = art.load_update(t, base, w0=w0, dtype=getattr(torch, dtype))
            got[dtype] = analyze_batch(w0, [upd], cfg).items[0]
        assert got["float64"].dw_rank == 384                       # full rank: nothing is noise
        assert got["float32"].eff_rank == pytest.approx(got["float64"].eff_rank, rel=1e-5), t.tensor
        assert got["float32"].dw_rank >= 380, t.tensor
