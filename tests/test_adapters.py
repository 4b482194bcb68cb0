"""Adapters and full fine-tunes -> exact dW, checked against PEFT's own merge (merge_and_unload).

Every adapter is real: trained a few steps by PEFT on the shipped MiniLM (tiny GPT-2 for
fan_in_fan_out, tiny sharded Llama for rank/alpha patterns and bf16), then saved.
"""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from fixtures_zoo import base_path_of, copy_adapter, full_reference, peft_reference

from zoospectra.adapters import PeftAdapter, match_base_key, open_artifact, read_base
from zoospectra.errors import (
    AdapterConfigError,
    BaseMismatchError,
    CheckpointNotFoundError,
    NonFiniteWeightsError,
    UnsafeCheckpointError,
    UnsupportedAdapterError,
    UnsupportedDtypeError,
)
from zoospectra.io.checkpoint import Checkpoint, LocalFileSource

TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small matmuls: on a busy 2-core box extra threads only spin; restored for other modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

PEFT_NAMES = ["lora", "rslora", "dora", "embedding_lora_mts", "adalora", "loha", "lokr", "vera",
              "vera_noproj", "ia3", "gpt2_lora", "gpt2_dora", "gpt2_ia3", "llama_patterns", "llama_bf16_lora"]
KIND = {"lora": "lora", "rslora": "lora", "dora": "dora", "embedding_lora_mts": "mixed",
        "adalora": "adalora", "loha": "loha", "lokr": "lokr", "vera": "vera", "vera_noproj": "vera", "ia3": "ia3",
        "gpt2_lora": "lora", "gpt2_dora": "dora", "gpt2_ia3": "ia3", "llama_patterns": "lora",
        "llama_bf16_lora": "lora"}


def compare(art, base: Checkpoint, ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative Frobenius error of zoospectra's dW against the reference, per base tensor.

    Reference keys are the merged model's (e.g. "transformer.h.0..."); they are mapped onto the
    base checkpoint's keys, and Conv1D references ([in, out]) are transposed to [out, in].
    """
    base_keys = set(base.keys())
    ref = {match_base_key(k, base_keys, artifact="ref", base_name="base"): v for k, v in ref.items()}
    targets = {t.tensor: t for t in art.targets(base)}
    assert set(targets) == set(ref), f"missing {set(ref) - set(targets)}, extra {set(targets) - set(ref)}"
    errors = {}
    for key, t in targets.items():
        want = ref[key].T if t.transpose else ref[key]
        got = art.load_update(t, base).materialize(torch.float64)
        assert got.shape == want.shape == t.shape
        errors[key] = float((got - want).norm() / want.norm()) if want.norm() > 0 else float(got.norm())
    return errors


@pytest.mark.parametrize("name", PEFT_NAMES)
def test_dw_equals_peft_merge(zoo, name: str) -> None:
    base = Checkpoint.open(base_path_of(zoo, name))
    art = open_artifact(zoo[name])
    assert art.kind == KIND[name]
    ref = peft_reference(zoo, name)
    nonzero = [k for k, v in ref.items() if v.norm() > 0]
    assert len(nonzero) >= max(1, len(ref) // 2), "training did not move the adapter"
    errors = compare(art, base, ref)
    assert max(errors.values()) < TOL, {k: e for k, e in errors.items() if e >= TOL}


def test_lora_factors_are_trained_and_scaled(zoo) -> None:
    base = Checkpoint.open(base_path_of(zoo, "rslora"))
    art = open_artifact(zoo["rslora"])
    for t in art.targets(base):
        upd = art.load_update(t, base)
        assert upd.is_low_rank and upd.rank == 4 and upd.alpha == 8
        assert upd.scale == pytest.approx(8 / 2.0)  # rsLoRA: alpha / sqrt(r)
        assert upd.norm_a > 0 and upd.norm_b > 0   # both factors left their init (B starts at 0)
        key = f"base_model.model.{t.source}.lora_B.weight"
        assert torch.allclose(upd.B, art.ckpt.get(key) * upd.scale)


def test_rank_and_alpha_patterns_follow_peft(zoo) -> None:
    base = Checkpoint.open(base_path_of(zoo, "llama_patterns"))
    art = open_artifact(zoo["llama_patterns"])
    got = {t.tensor: art.load_update(t, base) for t in art.targets(base)}
    q0, gate1, gate0 = (got[f"model.layers.{i}.{m}.weight"] for i, m in
                        ((0, "self_attn.q_proj"), (1, "mlp.gate_proj"), (0, "mlp.gate_proj")))
    assert (q0.rank, q0.scale) == (2, 8 / 2)
    assert (gate1.rank, gate0.rank) == (8, 4)          # regex on the full module path
    assert got["model.layers.0.self_attn.v_proj.weight"].scale == 3 / 4
    assert got["model.layers.1.mlp.up_proj.weight"].scale == 32 / 4
    assert gate1.shape == (176, 64)                      # m > n


def test_wrong_scale_is_caught(zoo, tmp_path, monkeypatch) -> None:
    base = Checkpoint.open(base_path_of(zoo, "llama_patterns"))
    ref = peft_reference(zoo, "llama_patterns")
    # a variant alpha in the config: the comparison must fail
    wrong = copy_adapter(zoo["llama_patterns"], tmp_path / "wrong", config=lambda c: c.update(lora_alpha=9))
    assert max(compare(open_artifact(wrong), base, ref).values()) > 1e-2
    # ignoring alpha_pattern (scale alpha/r everywhere) must fail too
    true_rank_alpha = PeftAdapter.rank_alpha
    monkeypatch.setattr(PeftAdapter, "rank_alpha", lambda self, path: (true_rank_alpha(self, path)[0], 8.0))
    assert max(compare(open_artifact(zoo["llama_patterns"]), base, ref).values()) > 1e-2


def test_fan_in_fan_out_layout(zoo) -> None:
    base = Checkpoint.open(base_path_of(zoo, "gpt2_lora"))
    art = open_artifact(zoo["gpt2_lora"])
    targets = {t.tensor: t for t in art.targets(base)}
    t = targets["h.0.attn.c_attn.weight"]             # adapter path "transformer.h.0.attn.c_attn"
    assert t.transpose and t.shape == (192, 64) and t.source == "transformer.h.0.attn.c_attn"
    assert base.info(t.tensor).shape == (64, 192)     # Conv1D stores [in, out]
    assert read_base(base, t).shape == (192, 64)
    upd = art.load_update(t, base, w0=read_base(base, t))
    assert upd.B.shape == (192, 4) and upd.A.shape == (4, 64)


def test_embedding_lora_role_and_layout(zoo) -> None:
    base = Checkpoint.open(base_path_of(zoo, "embedding_lora_mts"))
    art = open_artifact(zoo["embedding_lora_mts"])
    emb = next(t for t in art.targets(base) if t.tensor == "embeddings.word_embeddings.weight")
    assert emb.role == "embedding" and emb.shape == (30522, 384) and not emb.transpose
    upd = art.load_update(emb, base)
    assert upd.B.shape == (30522, 4) and upd.A.shape == (4, 384)


def test_adalora_rank_pattern_and_scale(zoo) -> None:
    art = open_artifact(zoo["adalora"])
    assert art.config["rank_pattern"], "budget allocation ran, so PEFT saved a rank_pattern"
    base = Checkpoint.open(base_path_of(zoo, "adalora"))
    ranks = {art.load_update(t, base).rank for t in art.targets(base)}
    assert ranks != {6}  # pruned below init_r somewhere
    upd = next(u for u in (art.load_update(t, base) for t in art.targets(base)) if u.rank)
    assert upd.scale == pytest.approx(8 / (6 + 1e-5))  # alpha / (ranknum + 1e-5), ranknum = init_r


def test_dense_kinds_reuse_w0_without_reading_it(zoo) -> None:
    base = Checkpoint.open(base_path_of(zoo, "dora"))
    art = open_artifact(zoo["dora"])
    t = art.targets(base)[0]
    w0 = read_base(base, t)
    before = base.bytes_read
    with_w0 = art.load_update(t, base, w0=w0)
    assert base.bytes_read == before                  # W0 was not read again
    assert torch.equal(with_w0.dense, art.load_update(t, base).dense)
    assert with_w0.kind == "dora" and with_w0.dense is not None and with_w0.norm_b > 0


def test_planning_reads_headers_only(zoo) -> None:
    base = Checkpoint.open(base_path_of(zoo, "lora"))
    art = open_artifact(LocalFileSource(zoo["lora"]), model_id="me/lora")
    targets = art.targets(base)
    assert base.bytes_read == 0 and art.ckpt.bytes_read == 0
    assert len(targets) == 36 and {t.role for t in targets} == {"linear"}
    art.load_update(targets[0].tensor, base)
    info = [art.ckpt.info(k) for k in art.ckpt.keys() if f".{targets[0].source}.lora_" in "." + k]
    assert art.ckpt.bytes_read == sum(i.end - i.start for i in info)   # only that module's factors
    d = art.describe()
    assert (d["peft_type"], d["r"], d["alpha"], d["base_rewritten"]) == ("LORA", 4, 8.0, False)
    assert art.model_id == "me/lora" and json.loads(d["config_json"])["r"] == 4


def test_modules_to_save_is_a_dense_replacement(zoo) -> None:
    base = Checkpoint.open(base_path_of(zoo, "embedding_lora_mts"))
    art = open_artifact(zoo["embedding_lora_mts"])
    t = next(t for t in art.targets(base) if t.kind == "modules_to_save")
    assert t.tensor == "encoder.layer.5.output.dense.weight"
    assert art.load_update(t, base).dense is not None
    assert any("bias" in k for k, _ in art.skipped)


@pytest.mark.parametrize("name", ["full_ft", "llama_full"])
def test_full_finetune(zoo, name: str) -> None:
    base = Checkpoint.open(base_path_of(zoo, name))
    art = open_artifact(zoo[name])
    assert art.kind == "full" and art.describe()["peft_type"] is None
    targets = {t.tensor: t for t in art.targets(base)}
    ref = {k: v for k, v in full_reference(zoo, name).items()}
    ref = {match_base_key(k, set(base.keys()), artifact="ref", base_name="b"): v for k, v in ref.items()}
    assert set(targets) <= set(ref) and len(targets) >= len(ref) - 1  # tied lm_head may be absent
    for key, t in targets.items():
        got = art.load_update(t, base).materialize(torch.float64)
        assert torch.allclose(got, ref[key], rtol=0, atol=1e-7), key
    roles = {t.role for t in targets.values()}
    assert "embedding" in roles and "linear" in roles


def test_bert_prefix_maps_onto_bare_base(zoo, tmp_path) -> None:
    """An adapter trained on BertForSequenceClassification ("bert.encoder...") vs a BertModel base."""
    def rename(sd: dict) -> None:
        for k in list(sd):
            sd[k.replace("base_model.model.", "base_model.model.bert.")] = sd.pop(k)

    moved = copy_adapter(zoo["lora"], tmp_path / "bert", tensors=rename)
    base = Checkpoint.open(base_path_of(zoo, "lora"))
    orig, art = open_artifact(zoo["lora"]), open_artifact(moved)
    assert [t.tensor for t in art.targets(base)] == [t.tensor for t in orig.targets(base)]
    t = art.targets(base)[0]
    assert torch.equal(art.load_update(t, base).B, orig.load_update(t.tensor, base).B)


def test_pissa_init_is_reported(zoo, tmp_path) -> None:
    p = copy_adapter(zoo["lora"], tmp_path / "pissa", config=lambda c: c.update(init_lora_weights="pissa_niter_4"))
    art, base = open_artifact(p), Checkpoint.open(base_path_of(zoo, "lora"))
    assert art.describe()["base_rewritten"] is True and art.describe()["init"] == "pissa_niter_4"
    upd = art.load_update(art.targets(base)[0], base)
    assert upd.base_rewritten is True and any("modified base" in w for w in upd.warnings)


# --- bad inputs: typed errors that name the file and the tensor -----------------------------
def _assert_names(err: Exception, *parts: str) -> None:
    for part in parts:
        assert part in str(err), f"{part!r} not in {err}"


@pytest.mark.parametrize("edit, field", [
    (lambda c: c.pop("r"), "'r'"),
    (lambda c: c.pop("lora_alpha"), "lora_alpha"),
    (lambda c: c.pop("peft_type"), "peft_type"),
    (lambda c: c.update(r=0), "r must be a positive"),
    (lambda c: c.update(r=-4), "r must be a positive"),
])
def test_bad_config_fields(zoo, tmp_path, edit, field: str) -> None:
    p = copy_adapter(zoo["lora"], tmp_path / "bad", config=edit)
    with pytest.raises(AdapterConfigError) as exc:
        open_artifact(p)
    _assert_names(exc.value, str(p / "adapter_config.json"), field)


def test_unknown_peft_type(zoo, tmp_path) -> None:
    p = copy_adapter(zoo["lora"], tmp_path / "bad", config=lambda c: c.update(peft_type="FOURIERFT"))
    with pytest.raises(UnsupportedAdapterError) as exc:
        open_artifact(p)
    _assert_names(exc.value, "adapter_config.json", "FOURIERFT")


def test_config_rank_disagreeing_with_weights(zoo, tmp_path) -> None:
    p = copy_adapter(zoo["lora"], tmp_path / "bad", config=lambda c: c.update(r=8))
    art, base = open_artifact(p), Checkpoint.open(base_path_of(zoo, "lora"))
    target = art.targets(base)[0]
    with pytest.raises(AdapterConfigError) as exc:
        art.load_update(target, base)
    _assert_names(exc.value, "adapter_model.safetensors", f"{target.source}.lora_A.weight", "r=8")


def test_nan_in_lora_b(zoo, tmp_path) -> None:
    key = "base_model.model.encoder.layer.1.attention.self.value.lora_B.weight"
    p = copy_adapter(zoo["lora"], tmp_path / "nan", tensors=lambda sd: sd[key].__setitem__((0, 0), float("nan")))
    art, base = open_artifact(p), Checkpoint.open(base_path_of(zoo, "lora"))
    with pytest.raises(NonFiniteWeightsError) as exc:
        art.load_update("encoder.layer.1.attention.self.value.weight", base)
    _assert_names(exc.value, "adapter_model.safetensors", key)


def test_adapter_for_another_base_key_mismatch(zoo) -> None:
    art = open_artifact(zoo["llama_patterns"])
    with pytest.raises(BaseMismatchError) as exc:
        art.targets(Checkpoint.open(base_path_of(zoo, "lora")))
    _assert_names(exc.value, "adapter_model.safetensors", "model.layers.0", "nearest base keys", "base=")


def test_adapter_for_another_base_shape_mismatch(zoo, tmp_path) -> None:
    key = "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"
    p = copy_adapter(zoo["lora"], tmp_path / "shape", tensors=lambda sd: sd.__setitem__(key, torch.randn(4, 100)))
    with pytest.raises(BaseMismatchError) as exc:
        open_artifact(p).targets(Checkpoint.open(base_path_of(zoo, "lora")))
    _assert_names(exc.value, "adapter_model.safetensors", key, "encoder.layer.0.attention.self.query.weight",
                  "(384, 384)")


def test_ambiguous_key_names_candidates(tmp_path) -> None:
    keys = {"encoder.block.attn.weight", "decoder.block.attn.weight"}
    with pytest.raises(BaseMismatchError) as exc:
        match_base_key("block.attn.weight", keys, artifact="a/adapter_model.safetensors", base_name="b")
    _assert_names(exc.value, "encoder.block.attn.weight", "decoder.block.attn.weight", "a/adapter_model.safetensors")


def test_pickle_only_adapter_is_refused_unopened(zoo, tmp_path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # would run on unpickling
            return (open, (str(marker), "w"))

    d = tmp_path / "pickled"
    d.mkdir()
    (d / "adapter_config.json").write_text((zoo["lora"] / "adapter_config.json").read_text())
    (d / "adapter_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UnsafeCheckpointError) as exc:
        open_artifact(d)
    _assert_names(exc.value, str(d / "adapter_model.bin"))
    assert not marker.exists()


def test_quantised_dtype_refused_at_planning(zoo, tmp_path) -> None:
    key = "base_model.model.encoder.layer.0.attention.self.key.lora_A.weight"
    p = copy_adapter(zoo["lora"], tmp_path / "q", tensors=lambda sd: sd.__setitem__(key, sd[key].to(torch.int8)))
    with pytest.raises(UnsupportedDtypeError) as exc:
        open_artifact(p).targets(Checkpoint.open(base_path_of(zoo, "lora")))
    _assert_names(exc.value, "adapter_model.safetensors", key, "I8")


def test_bf16_adapter_is_upcast(zoo, tmp_path) -> None:
    p = copy_adapter(zoo["lora"], tmp_path / "bf16", tensors=lambda sd: sd.update(
        {k: v.to(torch.bfloat16) for k, v in sd.items()}))
    base = Checkpoint.open(base_path_of(zoo, "lora"))
    art, orig = open_artifact(p), open_artifact(zoo["lora"])
    t = art.targets(base)[3]
    got, want = art.load_update(t, base), orig.load_update(t, base)
    assert got.B.dtype == torch.float32
    assert torch.allclose(got.A, want.A.to(torch.bfloat16).float())


def test_missing_and_unknown_files(tmp_path) -> None:
    with pytest.raises(CheckpointNotFoundError) as exc:
        open_artifact(tmp_path)
    _assert_names(exc.value, str(tmp_path))
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointNotFoundError) as exc:
        open_artifact(tmp_path)
    _assert_names(exc.value, "adapter_model.safetensors")


def test_unknown_tensor_in_adapter_is_refused(zoo, tmp_path) -> None:
    key = "base_model.model.encoder.layer.0.attention.self.query.lora_C.weight"
    p = copy_adapter(zoo["lora"], tmp_path / "c", tensors=lambda sd: sd.__setitem__(key, torch.ones(2, 2)))
    with pytest.raises(UnsupportedAdapterError) as exc:
        open_artifact(p)
    _assert_names(exc.value, "adapter_model.safetensors", key)


def test_zoo_build_is_cached(zoo) -> None:
    from fixtures_zoo import spec_of

    from zoospectra.demo.zoo import build_zoo

    done = zoo["gpt2_ia3"] / ".zoo_done"
    stamp = done.stat().st_mtime_ns
    assert build_zoo(zoo["_root"], [spec_of("gpt2_ia3")], steps=3) == [zoo["gpt2_ia3"]]
    assert done.stat().st_mtime_ns == stamp
