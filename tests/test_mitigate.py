"""Mitigation against PEFT's own reduce_intruder_dimension, and re-analysed with the engine.

The adapter (fixtures_studies.MIT_SPEC) is a real LoRA on MiniLM with rank_pattern and
alpha_pattern, trained hard enough to grow intruder dimensions.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_studies import StudyZoo, one_thread

from zoospectra.demo.zoo import minilm_dir
from zoospectra.errors import CheckpointNotFoundError, ConfigError, UnsupportedAdapterError
from zoospectra.mitigate import MitigationParams, mitigate_adapter

LAM, K, EPS = 0.75, 10, 0.5


def _deltas(adapter_dir: Path, adapter_name: str = "default", mitigate: bool = False) -> dict[str, torch.Tensor]:
    """{module: get_delta_weight} from a PeftModel on the base; optionally after PEFT's own
    reduce_intruder_dimension (whose result lands in the adapter 'intruder_reduced')."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.intruders import reduce_intruder_dimension
    from transformers import AutoModel

    model = PeftModel.from_pretrained(AutoModel.from_pretrained(str(minilm_dir())), str(adapter_dir))
    if mitigate:
        reduce_intruder_dimension(model, top_k=K, threshold_epsilon=EPS, mitigation_lambda=LAM,
                                  logging_sink=None)
        adapter_name = "intruder_reduced"
    return {name.removeprefix("base_model.model."): layer.get_delta_weight(adapter_name).detach().double()
            for name, layer in model.named_modules() if isinstance(layer, LoraLayer)}


@pytest.fixture(scope="module")
def mitigated(study_zoo: StudyZoo, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("mitigated") / "mit_r8_l075"
    with one_thread():
        result = mitigate_adapter(study_zoo.paths["mit_r8"], out, MitigationParams(lam=LAM, k=K, eps=EPS))
    return out, result


def test_matches_peft_reduce_intruder_dimension(study_zoo: StudyZoo, mitigated) -> None:
    out, result = mitigated
    assert result.n_intruders > 0, "the fixture adapter should have intruders"
    with one_thread():
        ours = _deltas(out)
        peft = _deltas(study_zoo.paths["mit_r8"], mitigate=True)
        original = _deltas(study_zoo.paths["mit_r8"])
    assert ours.keys() == peft.keys() and len(ours) == 6
    changed = {m.module for m in result.matrices if m.intruders}
    for module in ours:
        err = float((ours[module] - peft[module]).norm() / peft[module].norm())
        assert err < 1e-4, (module, err)
        moved = float((ours[module] - original[module]).norm() / original[module].norm())
        assert (moved > 1e-3) == (module in changed), (module, moved)
    assert changed, "no matrix was mitigated"


def test_output_is_a_peft_adapter_with_the_same_config(study_zoo: StudyZoo, mitigated) -> None:
    from safetensors import safe_open

    out, result = mitigated
    src = study_zoo.paths["mit_r8"]
    assert (out / "adapter_config.json").read_text() == (src / "adapter_config.json").read_text()
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as new, \
            safe_open(str(src / "adapter_model.safetensors"), "pt") as old:
        assert set(new.keys()) == set(old.keys())
        for key in old.keys():
            assert new.get_tensor(key).shape == old.get_tensor(key).shape, key
            assert new.get_tensor(key).dtype == old.get_tensor(key).dtype, key
    record = json.loads((out / "mitigation.json").read_text())
    assert record["params"] == {"lam": LAM, "k": K, "eps": EPS, "dtype": "float32"}
    assert sum(len(m["intruders"]) for m in record["matrices"]) == result.n_intruders


def test_reanalysis_shows_intruders_scaled_by_lambda(study_zoo: StudyZoo, mitigated) -> None:
    """The engine on the output: each intruder's singular value is lam times the old one (up to
    PEFT's rank-r truncation of the mitigated update), and it is still an intruder."""
    from zoospectra.adapters import open_artifact
    from zoospectra.config import AnalysisConfig
    from zoospectra.io.checkpoint import Checkpoint
    from zoospectra.spectral import analyze_batch

    out, result = mitigated
    base = Checkpoint.open(minilm_dir())
    before, after = open_artifact(study_zoo.paths["mit_r8"]), open_artifact(out)
    cfg = AnalysisConfig(k=K, eps=EPS, k_store=32)
    checked = 0
    with one_thread():
        for m in result.matrices:
            if not m.intruders:
                continue
            w0 = base.get(m.base_key)
            old, new = analyze_batch(w0, [before.load_update(m.base_key, base, w0=w0),
                                          after.load_update(m.base_key, base, w0=w0)], cfg).items
            np.testing.assert_allclose(old.u.sigma[m.intruders], m.sigma, rtol=1e-5)
            bulk = max(s for j, s in enumerate(old.u.sigma) if j not in m.intruders)  # largest non-intruder
            for j, sigma in zip(m.intruders, m.sigma, strict=True):
                target = LAM * sigma
                if target < 1.2 * bulk:
                    continue  # scaled into the bulk of the spectrum: no longer separable by value
                intruders = new.u.sigma[new.u.max_cos < EPS]   # still intruders after mitigation
                nearest = intruders[np.argmin(np.abs(intruders - target))]
                assert abs(nearest - target) < 0.03 * target, (m.module, j, nearest, target)
                checked += 1
            # the top intruder of each matrix is scaled (almost) exactly
            top = int(np.argmin(np.abs(new.u.sigma - LAM * m.sigma[0])))
            assert new.u.sigma[top] == pytest.approx(LAM * m.sigma[0], rel=1e-2)
    assert checked >= 5


def test_no_intruders_keeps_the_adapter_unchanged(study_zoo: StudyZoo, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "same"
    with one_thread():
        result = mitigate_adapter(study_zoo.paths["mit_r8"], out, MitigationParams(eps=0.01))
    assert result.n_intruders == 0
    old = load_file(str(study_zoo.paths["mit_r8"] / "adapter_model.safetensors"))
    new = load_file(str(out / "adapter_model.safetensors"))
    assert all(torch.equal(old[k], new[k]) for k in old)


def test_refuses_what_peft_cannot_mitigate(study_zoo: StudyZoo, tmp_path: Path) -> None:
    for flag in ("use_dora", "fan_in_fan_out"):
        adapter = tmp_path / flag
        shutil.copytree(study_zoo.paths["lora_r2_a4"], adapter)
        config = json.loads((adapter / "adapter_config.json").read_text())
        config[flag] = True
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        with pytest.raises(UnsupportedAdapterError, match=flag):
            mitigate_adapter(adapter, tmp_path / f"{flag}-out")
    with pytest.raises(ConfigError, match="is inside the input"):
        mitigate_adapter(study_zoo.paths["lora_r2_a4"], study_zoo.paths["lora_r2_a4"])
    with pytest.raises(CheckpointNotFoundError, match="adapter_config.json"):
        mitigate_adapter(study_zoo.paths["full_ft"], tmp_path / "full-out")  # a full fine-tune
    with pytest.raises(ConfigError, match="eps"):
        MitigationParams(eps=1.5)


def test_cli_mitigate(study_zoo: StudyZoo, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from zoospectra.cli import app

    out = tmp_path / "cli"
    with one_thread():
        res = CliRunner().invoke(app, ["mitigate", str(study_zoo.paths["mit_r8"]), "--out", str(out),
                                       "--lam", "0.5", "--base", str(minilm_dir())])
    assert res.exit_code == 0, res.output
    record = json.loads((out / "mitigation.json").read_text())
    assert record["params"]["lam"] == 0.5 and record["base"] == str(minilm_dir())
