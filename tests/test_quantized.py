"""Quantised bases: bitsandbytes NF4 / FP4 / LLM.int8 and GGUF, dequantised per tensor.

Oracles (independent of pipeline/io/quantized.py):
- bitsandbytes' own `functional.dequantize_4bit` / `int8_vectorwise_dequant`, which run on the CPU in
  the installed bitsandbytes (>= 0.49; its default torch backend), on checkpoints written by
  transformers' own `save_pretrained` of a model it quantised with BitsAndBytesConfig;
- transformers' own GGUF loader (`from_pretrained(gguf_file=...)`: gguf.quants.dequantize and its
  llama q/k un-permutation) on a GGUF written with gguf's GGUFWriter and quantize functions;
- PEFT's own merge (float64) on a float model holding bitsandbytes' dequantised base, for dW.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import torch
from fixtures_quant import (
    GGUF_BLOCK,
    bnb_base,
    bnb_reference,
    gguf_base,
    gguf_qwen2_base,
    gguf_reference,
    peft_delta,
    qlora_adapter,
    tiny_llama,
)

from zoospectra.errors import QuantizedBaseError, UnsupportedDtypeError
from zoospectra.io.checkpoint import Checkpoint, LocalFileSource
from zoospectra.io.quantized import BnbCheckpoint, GgufCheckpoint, open_base

pytest.importorskip("bitsandbytes")
pytest.importorskip("gguf")

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
DESCRIBED = {
    "nf4": "bnb-nf4 (double quant, blocksize 64, float32)",
    "fp4": "bnb-fp4 (blocksize 64, float32)",
    "nf4_bf16": "bnb-nf4 (double quant, blocksize 64, bfloat16)",
    "int8": "bnb-int8 (LLM.int8, row-wise absmax)",
}


@pytest.fixture(scope="session")
def quant_zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant")
    fp = tiny_llama(root / "fp32")
    out = {"fp32": fp, "gguf": gguf_base(fp, root / "gguf")}
    for kind in DESCRIBED:
        out[kind] = bnb_base(fp, root / kind, kind)
    return out


def fp_weights(fp_dir: Path) -> dict[str, torch.Tensor]:
    return {k: Checkpoint.open(fp_dir).get(k) for k in Checkpoint.open(fp_dir).keys()}


# --- bitsandbytes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(DESCRIBED))
def test_bnb_tensors_equal_bitsandbytes_dequantisation(quant_zoo, kind):
    base = open_base(LocalFileSource(quant_zoo[kind]))
    assert isinstance(base, BnbCheckpoint)
    ref = bnb_reference(quant_zoo[kind])
    fp = fp_weights(quant_zoo["fp32"])
    assert set(base.keys()) == set(fp)            # state tensors hidden, every weight under its HF name
    assert len(ref) == 14                         # 7 linear layers x 2 blocks are quantised
    for key in base.keys():
        w = base.get(key)
        assert w.dtype == torch.float32 and tuple(base.info(key).shape) == tuple(fp[key].shape)
        if key in ref:
            assert torch.equal(w, ref[key]), key
            assert base.quantization_of(key) == DESCRIBED[kind]
            # the dequantised weight is the model's, up to the quantisation error
            err = (w - fp[key].to(w.dtype)).norm() / fp[key].norm()
            assert 0 < err < (0.02 if kind == "int8" else 0.2), (key, float(err))
        else:  # norms, embeddings, lm_head stay in their float dtype
            assert base.quantization_of(key) == ""
            stored = torch.bfloat16 if kind == "nf4_bf16" else torch.float32   # the model was loaded in it
            assert torch.equal(w, fp[key].to(stored).float()), key


@pytest.mark.parametrize("kind", ["nf4", "int8", "gguf"])
def test_chunked_dequantisation_gives_the_same_bits(quant_zoo, monkeypatch, kind):
    """Large weights are dequantised a chunk at a time (bounded memory): tiny chunks, same result."""
    from zoospectra.io import quantized

    whole = open_base(LocalFileSource(quant_zoo[kind]))
    monkeypatch.setattr(quantized, "CHUNK", 300)   # not a multiple of any block: steps round to blocks / rows
    chunked = open_base(LocalFileSource(quant_zoo[kind]))
    for key in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
        a = chunked.get(key)
        monkeypatch.setattr(quantized, "CHUNK", 1 << 20)
        assert torch.equal(a, whole.get(key)), key
        monkeypatch.setattr(quantized, "CHUNK", 300)


def test_bnb_reads_only_the_tensors_byte_ranges(quant_zoo):
    """One dequantised weight costs its packed bytes plus its own state tensors, nothing else."""
    base = open_base(LocalFileSource(quant_zoo["nf4"]))
    raw = Checkpoint.open(quant_zoo["nf4"])
    own = [k for k in raw.keys() if k == Q_PROJ or k.startswith(Q_PROJ + ".")]
    assert len(own) == 6  # weight, absmax, quant_map, nested_absmax, nested_quant_map, quant_state
    before = base.bytes_read
    base.get(Q_PROJ)
    assert base.bytes_read - before == sum(raw.info(k).nbytes for k in own)
    assert base.bytes_read - before < os.path.getsize(quant_zoo["nf4"] / "model.safetensors") / 20


def test_bnb_base_on_the_loopback_hub_is_read_by_byte_ranges(quant_zoo, fake_hub, hub_options):
    """A QLoRA base repo (the real huggingface_hub client, loopback Hub): one weight costs its own
    ranges, and equals bitsandbytes' dequantisation."""
    from fixtures_hub import publish_dir

    from zoospectra.io.resolve import resolve_ref

    publish_dir(fake_hub, "org/tiny-llama-bnb-4bit", quant_zoo["nf4"])
    base = open_base(resolve_ref("org/tiny-llama-bnb-4bit", options=hub_options).open_source())
    assert isinstance(base, BnbCheckpoint)
    key = "model.layers.1.mlp.down_proj.weight"
    before = base.bytes_read
    assert torch.equal(base.get(key), bnb_reference(quant_zoo["nf4"])[key])
    raw = Checkpoint.open(quant_zoo["nf4"])
    assert base.bytes_read - before == sum(raw.info(k).nbytes for k in raw.keys() if k.startswith(key))


def _edit_base(src: Path, dst: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    sd = load_file(str(src / "model.safetensors"))
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"))
    return dst


def _state_json(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


QS = Q_PROJ + ".quant_state.bitsandbytes__nf4"
BAD_STATES = {
    "unknown quant type": (lambda sd: sd.__setitem__(Q_PROJ + ".quant_state.bitsandbytes__int4", sd.pop(QS)),
                           "unknown quant type 'int4'"),
    "missing quant state": (lambda sd: sd.pop(QS), "missing quant state tensor"),
    "missing absmax": (lambda sd: sd.pop(Q_PROJ + ".absmax"), "missing state tensor"),
    "state not JSON": (lambda sd: sd.__setitem__(QS, _state_json("{not json")), "is not UTF-8 JSON"),
    "state shape wrong": (lambda sd: sd.__setitem__(QS, _state_json(json.dumps(
        {**json.loads(bytes(sd[QS].tolist())), "shape": [256, 300]}))), "values, expected 1200"),
    "packed weight truncated": (lambda sd: sd.__setitem__(Q_PROJ, sd[Q_PROJ][:-1].clone()), "packed weight holds"),
    "absmax truncated": (lambda sd: sd.__setitem__(Q_PROJ + ".absmax", sd[Q_PROJ + ".absmax"][:-1].clone()),
                         "values, expected"),
    "quant_map damaged": (lambda sd: sd[Q_PROJ + ".quant_map"].mul_(2), "code table"),
}


@pytest.mark.parametrize("case", list(BAD_STATES))
def test_bnb_bad_state_is_a_typed_error_naming_tensor_and_file(quant_zoo, tmp_path, case):
    edit, says = BAD_STATES[case]
    bad = _edit_base(quant_zoo["nf4"], tmp_path / "bad", edit)
    base = open_base(LocalFileSource(bad))
    with pytest.raises(QuantizedBaseError) as err:
        base.get(Q_PROJ)
    assert says in err.value.message
    assert err.value.context["tensor"] == Q_PROJ and str(bad) in err.value.context["file"]
    # every other weight still reads
    assert torch.equal(base.get("model.layers.1.self_attn.q_proj.weight"),
                       bnb_reference(quant_zoo["nf4"])["model.layers.1.self_attn.q_proj.weight"])


def test_bnb_int8_without_row_scales_is_refused(quant_zoo, tmp_path):
    key = "model.layers.0.mlp.up_proj."
    bad = _edit_base(quant_zoo["int8"], tmp_path / "bad", lambda sd: sd.pop(key + "SCB"))
    base = open_base(LocalFileSource(bad))  # weight_format alone still marks it int8
    with pytest.raises(QuantizedBaseError, match="no row scales"):
        base.get(key + "weight")


def test_uint8_weight_without_any_state_stays_refused(quant_zoo, tmp_path):
    """Packed bytes with every state tensor gone are not guessed at: the plain reader refuses U8."""
    bad = _edit_base(quant_zoo["nf4"], tmp_path / "bad", lambda sd: [
        sd.pop(k) for k in list(sd) if k.startswith(Q_PROJ + ".")])
    base = open_base(LocalFileSource(bad))
    with pytest.raises(UnsupportedDtypeError):
        base.get(Q_PROJ)


# --- GGUF ------------------------------------------------------------------------------------------
def test_gguf_tensors_equal_transformers_gguf_loading(quant_zoo):
    base = open_base(LocalFileSource(quant_zoo["gguf"]))
    assert isinstance(base, GgufCheckpoint) and base.arch == "llama"
    ref = gguf_reference(quant_zoo["gguf"])
    assert set(base.keys()) == set(ref)
    for key in base.keys():
        w = base.get(key)
        assert tuple(base.info(key).shape) == tuple(ref[key].shape)
        assert torch.equal(w, ref[key]), (key, base.quantization_of(key))
    for name, (module, qtype) in GGUF_BLOCK.items():
        assert base.quantization_of(f"model.layers.1.{module}.weight") == f"gguf {qtype}", name
    assert base.quantization_of("model.embed_tokens.weight") == "gguf F16"


def test_gguf_qwen2_with_biases_equals_transformers_gguf_loading(tmp_path):
    """qwen2: the same name map with q/k/v biases, and no q/k permutation (llama.cpp does none)."""
    out = gguf_qwen2_base(tmp_path)
    base = open_base(LocalFileSource(out))
    assert isinstance(base, GgufCheckpoint) and base.arch == "qwen2"
    ref = gguf_reference(out)
    assert set(base.keys()) == set(ref) and "model.layers.1.self_attn.k_proj.bias" in ref
    for key in base.keys():
        assert torch.equal(base.get(key), ref[key]), key


def test_gguf_q_k_rows_are_unpermuted(quant_zoo):
    """k_proj is quantised from the real weights (Q8_0): read back, it is the model's k_proj up to
    Q8_0's error, which only holds once llama.cpp's rotary permutation is undone."""
    base = open_base(LocalFileSource(quant_zoo["gguf"]))
    fp = fp_weights(quant_zoo["fp32"])
    key = "model.layers.0.self_attn.k_proj.weight"
    assert (base.get(key) - fp[key]).norm() / fp[key].norm() < 0.01


def test_gguf_bad_files_are_typed_errors(quant_zoo, tmp_path):
    src = quant_zoo["gguf"] / "tiny-llama.gguf"
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    (trunc / "m.gguf").write_bytes(src.read_bytes()[:4096])
    with pytest.raises(QuantizedBaseError) as err:
        open_base(LocalFileSource(trunc))
    assert "m.gguf" in err.value.context["file"]
    two = tmp_path / "two"
    two.mkdir()
    for n in ("a.gguf", "b.gguf"):
        (two / n).write_bytes(src.read_bytes())
    with pytest.raises(QuantizedBaseError, match="2 GGUF files"):
        open_base(LocalFileSource(two))


def test_gguf_unknown_architecture_is_refused(tmp_path):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "mamba")
    w.add_tensor("blk.0.ssm_in.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(QuantizedBaseError, match="'mamba' has no Hugging Face name map"):
        open_base(LocalFileSource(tmp_path))


# --- end to end: a QLoRA adapter through the CLI ---------------------------------------------------
def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zoospectra.cli", *args], capture_output=True, text=True,
                          timeout=900, env={**os.environ})


def _rows(root: Path, sql: str) -> list[tuple]:
    return duckdb.sql(sql.replace("MATRICES", f"read_parquet('{root}/units/*/matrices.parquet')")
                      .replace("SPECTRA", f"read_parquet('{root}/units/*/spectra.parquet')")
                      .replace("MODELS", f"read_parquet('{root}/models/*.parquet')")).fetchall()


def _check_against_peft(root: Path, delta: dict[str, torch.Tensor], w0: dict[str, torch.Tensor]) -> None:
    rows = _rows(root, "SELECT tensor, norm_w0, norm_dw FROM MATRICES ORDER BY tensor")
    assert [r[0] for r in rows] == sorted(delta)   # every LoRA-wrapped module, nothing else
    for tensor, norm_w0, norm_dw in rows:
        assert norm_w0 == pytest.approx(float(w0[tensor].double().norm()), rel=1e-6), tensor
        assert norm_dw == pytest.approx(float(delta[tensor].norm()), rel=1e-5), tensor
        sigmas = [s for (s,) in _rows(root, f"SELECT sigma FROM SPECTRA WHERE which = 'dw' AND tensor = '{tensor}' "
                                            "ORDER BY idx")]
        assert len(sigmas) >= 2, tensor
        want = torch.linalg.svdvals(delta[tensor])[: len(sigmas)]
        assert torch.allclose(torch.tensor(sigmas, dtype=torch.float64), want, rtol=1e-4, atol=1e-6 * float(want[0]))


@pytest.mark.slow
def test_qlora_adapter_on_nf4_base_end_to_end(quant_zoo, tmp_path):
    """A LoRA trained on the NF4 model itself, analysed with real local Ray against the saved NF4
    base: rows record the quantisation, W0 is bitsandbytes' dequantisation, dW is PEFT's."""
    adapter = qlora_adapter(quant_zoo["fp32"], tmp_path / "qlora", "nf4")
    out = tmp_path / "results"
    proc = cli("analyze", "--base", str(quant_zoo["nf4"]), f"qlora={adapter}", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    [(quant, n_targets)] = _rows(out, "SELECT base_quant, n_targets FROM MODELS")
    assert (quant, n_targets) == (DESCRIBED["nf4"], 14)
    w0 = bnb_reference(quant_zoo["nf4"])
    _check_against_peft(out, peft_delta(adapter, quant_zoo["fp32"], w0), w0)
    # the stored base SVDs are keyed by how their W0 was dequantised
    keys = [json.loads(_meta(p)["zoospectra.key"]) for p in sorted((out / "bases").glob("*.safetensors"))]
    assert len(keys) == 14 and {k["dequant"] for k in keys} == {DESCRIBED["nf4"]}


def _meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_lora_on_gguf_file_end_to_end(quant_zoo, tmp_path):
    """--base names the .gguf file itself; every matrix's quant type is on the models row."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(quant_zoo["fp32"])
    pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                          target_modules=["q_proj", "k_proj", "up_proj", "gate_proj"]))
    pm.save_pretrained(tmp_path / "lora")
    out = tmp_path / "results"
    gguf_file = quant_zoo["gguf"] / "tiny-llama.gguf"
    proc = cli("analyze", "--base", str(gguf_file), f"lora={tmp_path / 'lora'}", "--out", str(out), "--local")
    assert proc.returncode == 0, proc.stderr
    [(quant, base_id)] = _rows(out, "SELECT base_quant, base_id FROM MODELS")
    assert (quant, base_id) == ("gguf Q4_1; gguf Q4_K; gguf Q6_K; gguf Q8_0", "tiny-llama")
    w0 = gguf_reference(quant_zoo["gguf"])
    _check_against_peft(out, peft_delta(tmp_path / "lora", quant_zoo["fp32"], w0), w0)


def test_cli_damaged_quantised_base_is_an_error_row_and_exit_3(quant_zoo, tmp_path):
    """A base whose quant state names an unknown type: no traceback, the artifact's `errors` row
    names the tensor and file, exit status 3 (run completed with error rows)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(quant_zoo["fp32"])
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    bad = _edit_base(quant_zoo["nf4"], tmp_path / "bad", BAD_STATES["unknown quant type"][0])
    out = tmp_path / "results"
    proc = cli("analyze", "--base", str(bad), f"lora={tmp_path / 'lora'}", "--out", str(out), "--local")
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    [(stage, kind, message, context)] = duckdb.sql(
        f"SELECT stage, error_type, message, context_json FROM read_parquet('{out}/errors/*/*.parquet')").fetchall()
    assert (stage, kind) == ("plan", "QuantizedBaseError") and "unknown quant type 'int4'" in message
    assert json.loads(context)["tensor"] == Q_PROJ and str(bad) in json.loads(context)["file"]


def test_base_svd_cache_key_includes_the_dequantisation(quant_zoo):
    """Two dequantisations of one base tensor never share a stored SVD; a float base's key (and so
    every entry stored before quantised bases existed) is unchanged."""
    from zoospectra.io.refs import local_ref
    from zoospectra.run.basecache import BaseKey

    ref = local_ref(quant_zoo["nf4"])
    plain = BaseKey.of(ref, Q_PROJ, False, (256, 256), "float32")
    nf4 = BaseKey.of(ref, Q_PROJ, False, (256, 256), "float32", DESCRIBED["nf4"])
    other = BaseKey.of(ref, Q_PROJ, False, (256, 256), "float32", "gguf Q4_K")
    assert "dequant" not in plain.fields() and nf4.fields()["dequant"] == DESCRIBED["nf4"]
    assert len({plain.file_name, nf4.file_name, other.file_name}) == 3


def test_gguf_file_as_base_is_pinned_by_content(quant_zoo, tmp_path):
    """`--base FILE.gguf`: a local ref to the file itself, whose revision changes with its bytes."""
    import shutil

    from zoospectra.io.refs import local_ref

    copy = tmp_path / "m.gguf"
    shutil.copy(quant_zoo["gguf"] / "tiny-llama.gguf", copy)
    ref = local_ref(copy)
    assert (ref.model_id, ref.location) == ("m", str(copy))
    assert isinstance(open_base(ref.open_source()), GgufCheckpoint)
    with open(copy, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)[0]
        f.seek(-1, 2)
        f.write(bytes([last ^ 0xFF]))
    assert local_ref(copy).revision != ref.revision
