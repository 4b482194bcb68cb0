"""Image-model LoRAs: diffusers-layout bases read per component, and every LoRA format's dW
checked against an independent loader (fixtures in tests/fixtures_image.py).

Oracles: diffusers' own `lora_state_dict` (kohya conversion, sgm -> diffusers block mapping for
SDXL) + `load_lora_into_unet` / `load_lora_into_text_encoder` + merging the PEFT layers it built
(what `fuse_lora` does), read back as fused minus original weights. LyCORIS LoHa/LoKr for SD have
no diffusers loader: PEFT's LoHa/LoKr layers, given the same tensors, are the oracle (see there).
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
from fixtures_image import LYCORIS_LEAVES, fused_delta, targeted
from rows import unit_files
from safetensors.torch import load_file, save_file

from zoospectra.adapters import ImageLora, open_artifact
from zoospectra.errors import AdapterWeightsError, BaseMismatchError, CheckpointNotFoundError
from zoospectra.io.checkpoint import Checkpoint
from zoospectra.io.components import ComponentCheckpoint, component_of

pytest.importorskip("diffusers")

TOL = 1e-5


def tool_deltas(pipe_dir: Path, lora_dir: Path) -> tuple[dict[str, torch.Tensor], ImageLora, Checkpoint]:
    """{base key: dW [out, in*kh*kw]} as zoospectra computes it (float64)."""
    base = Checkpoint.open(pipe_dir)
    art = open_artifact(lora_dir)
    assert isinstance(art, ImageLora)
    out = {t.tensor: art.load_update(t, base, dtype=torch.float64).materialize(torch.float64)
           for t in art.targets(base)}
    return out, art, base


def diffusers_deltas(pipe_cls, pipe_dir: Path, lora_file: Path, encoders: dict) -> dict[str, torch.Tensor]:
    """fused - original per weight, after diffusers loads the file into each component."""
    from diffusers import UNet2DConditionModel

    raw = {k: v for k, v in load_file(str(lora_file)).items() if "weird" not in k}  # diffusers refuses unknown keys
    unet = UNet2DConditionModel.from_pretrained(pipe_dir / "unet")
    sd, alphas = pipe_cls.lora_state_dict(raw, unet_config=unet.config)
    out = {f"unet.{k}": v for k, v in fused_delta(
        lambda m: pipe_cls.load_lora_into_unet(dict(sd), alphas, unet=m, adapter_name="x"), unet).items()}
    for name, cls in encoders.items():
        te = cls.from_pretrained(pipe_dir / name)
        out |= {f"{name}.{k}": v for k, v in fused_delta(
            lambda m, n=name: pipe_cls.load_lora_into_text_encoder(dict(sd), alphas, text_encoder=m, prefix=n,
                                                                  adapter_name="x"), te).items()}
    return out


def assert_same_deltas(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], base, convs: bool = True) -> None:
    assert set(ours) == set(ref), (sorted(set(ours) ^ set(ref)))[:6]
    for key, want in ref.items():
        want = want.reshape(want.shape[0], -1)
        err = float((ours[key] - want).norm() / want.norm())
        assert err < TOL, (key, err)
    shapes = [len(base.info(k).shape) for k in ours]
    assert shapes.count(4) > 0 if convs else shapes.count(4) == 0  # convolutions compared where the model has them
    assert shapes.count(2) > 0


def _encoders(*names: str) -> dict:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return {n: CLIPTextModel if n == "text_encoder" else CLIPTextModelWithProjection for n in names}


# --- bases ------------------------------------------------------------------------------------
def test_pipeline_base_reads_one_component_file_per_tensor(image_zoo):
    base = Checkpoint.open(image_zoo["sdxl"])
    assert isinstance(base, ComponentCheckpoint)
    assert sorted(base.parts) == ["text_encoder", "text_encoder_2", "unet"]
    key = "unet.down_blocks.0.resnets.0.conv1.weight"
    info = base.info(key)
    assert info.file == "unet/diffusion_pytorch_model.safetensors" and len(info.shape) == 4
    before = base.bytes_read
    w = base.get(key)
    assert base.bytes_read - before == info.nbytes  # that tensor's bytes, nothing else
    ref = load_file(str(image_zoo["sdxl"] / "unet/diffusion_pytorch_model.safetensors"))
    assert torch.equal(w, ref["down_blocks.0.resnets.0.conv1.weight"])
    assert component_of(base, key) == "unet"
    assert component_of(base, "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.weight") == "text_encoder_2"
    assert base.bytes_read - before == info.nbytes and base.header_bytes_read > 0


def test_single_file_checkpoint_components(tmp_path):
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(4),
               "conditioner.embedders.1.model.ln_final.weight": torch.zeros(4)}, str(tmp_path / "m.safetensors"))
    ck = Checkpoint.open(tmp_path / "m.safetensors")
    assert [component_of(ck, k) for k in sorted(ck.keys())] == ["text_encoder", "text_encoder_2", "unet"]
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2), "img_in.weight": torch.zeros(2, 2)},
              str(tmp_path / "flux.safetensors"))
    flux = Checkpoint.open(tmp_path / "flux.safetensors")
    assert {component_of(flux, k) for k in flux.keys()} == {"transformer"}
    save_file({"transformer.h.0.attn.c_attn.weight": torch.zeros(2, 6)}, str(tmp_path / "gpt2.safetensors"))
    gpt2 = Checkpoint.open(tmp_path / "gpt2.safetensors")   # one model: no component, even named "transformer"
    assert component_of(gpt2, "transformer.h.0.attn.c_attn.weight") is None


def test_pipeline_without_safetensors_components_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet/diffusion_pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(CheckpointNotFoundError, match="never unpickles"):
        Checkpoint.open(tmp_path)


# --- formats against diffusers ------------------------------------------------------------------
def test_kohya_sd15_lora_equals_diffusers_fuse(image_zoo):
    """kohya names in diffusers module spelling, alpha != r, Conv2d 3x3 (resnets) and 1x1 (proj_in)."""
    from diffusers import StableDiffusionPipeline

    ours, art, base = tool_deltas(image_zoo["sd15"], image_zoo["kohya_sd15"])
    ref = diffusers_deltas(StableDiffusionPipeline, image_zoo["sd15"],
                           image_zoo["kohya_sd15"] / "my_style_v1.safetensors", _encoders("text_encoder"))
    assert_same_deltas(ours, ref, base)
    assert {tuple(base.info(k).shape[2:]) for k in ours if len(base.info(k).shape) == 4} == {(1, 1), (3, 3)}
    assert art.kind == "lora" and art.describe()["peft_type"] == "KOHYA_LORA"
    assert ("lora_unet_some_new_head.weird_suffix",
            "not a LoRA/LoHa/LoKr tensor zoospectra knows (unknown suffix)") in art.skipped
    assert json.loads(art.describe()["config_json"])["ss_network_dim"] == "4"


def test_kohya_sdxl_lora_equals_diffusers_fuse(image_zoo):
    """SDXL: sgm UNet names (input_blocks_4_1_...) and lora_te1_ / lora_te2_ on two text encoders."""
    from diffusers import StableDiffusionXLPipeline

    ours, art, base = tool_deltas(image_zoo["sdxl"], image_zoo["kohya_sdxl"])
    ref = diffusers_deltas(StableDiffusionXLPipeline, image_zoo["sdxl"],
                           image_zoo["kohya_sdxl"] / "xl_style.safetensors",
                           _encoders("text_encoder", "text_encoder_2"))
    assert_same_deltas(ours, ref, base)
    assert {component_of(base, k) for k in ours} == {"unet", "text_encoder", "text_encoder_2"}
    assert art.skipped == []


def test_diffusers_format_lora_equals_diffusers_fuse(image_zoo):
    from diffusers import StableDiffusionPipeline

    ours, art, base = tool_deltas(image_zoo["sd15"], image_zoo["diffusers_sd15"])
    ref = diffusers_deltas(StableDiffusionPipeline, image_zoo["sd15"],
                           image_zoo["diffusers_sd15"] / "pytorch_lora_weights.safetensors", _encoders("text_encoder"))
    assert_same_deltas(ours, ref, base)
    assert art.format == "diffusers" and art.describe()["r"] == 4


def _flux_fused(image_zoo, lora_file: Path) -> dict[str, torch.Tensor]:
    """diffusers' FluxPipeline loader (kohya Flux conversion included) + merge, on the tiny transformer."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    sd = FluxPipeline.lora_state_dict(load_file(str(lora_file)))
    model = FluxTransformer2DModel.from_pretrained(image_zoo["flux"] / "transformer")
    return fused_delta(lambda m: FluxPipeline.load_lora_into_transformer(sd, None, transformer=m, adapter_name="x"),
                       model)


def test_diffusers_format_flux_lora_equals_diffusers_fuse(image_zoo):
    """A Flux-style transformer (FluxTransformer2DModel, tiny config) in diffusers layout."""
    ours, art, base = tool_deltas(image_zoo["flux"], image_zoo["diffusers_flux"])
    ref = _flux_fused(image_zoo, image_zoo["diffusers_flux"] / "pytorch_lora_weights.safetensors")
    assert_same_deltas(ours, {f"transformer.{k}": v for k, v in ref.items()}, base, convs=False)
    assert {component_of(base, k) for k in ours} == {"transformer"}


def test_kohya_flux_lora_on_a_bfl_single_file_equals_diffusers_fuse(image_zoo):
    """kohya Flux names (lora_unet_double_blocks_0_img_attn_qkv) on a single-file Flux checkpoint in
    BFL naming: diffusers converts the same file onto its own transformer, splitting each fused qkv;
    the rows of our qkv dW must be its to_q / to_k / to_v deltas, concatenated."""
    from fixtures_image import FLUX_BFL

    ours, art, base = tool_deltas(image_zoo["flux_bfl"] / "flux1-tiny.safetensors", image_zoo["kohya_flux"])
    ref = _flux_fused(image_zoo, image_zoo["kohya_flux"] / "flux_style.safetensors")
    bfl = {f"{name}.weight": torch.cat([ref[f"transformer_blocks.0.{p}.weight"] for p in parts])
           for name, parts in FLUX_BFL.items()}
    assert_same_deltas(ours, bfl, base, convs=False)
    assert {component_of(base, k) for k in ours} == {"transformer"}
    assert art.describe()["r"] == 3 and art.describe()["alpha"] == 6.0


def test_kohya_text_encoder_names_with_the_text_model_wrapper(image_zoo, tmp_path):
    """Real SD1.5 kohya files say `lora_te_text_model_encoder_...` (transformers 4's CLIP wrapper);
    transformers 5 saves CLIP without `text_model.`. Renamed so, the file must give the same dW as
    the diffusers-checked original."""
    sd = load_file(str(image_zoo["kohya_sd15"] / "my_style_v1.safetensors"))
    renamed = {k.replace("lora_te_encoder_", "lora_te_text_model_encoder_"): v for k, v in sd.items()}
    assert renamed != sd
    save_file(renamed, str(tmp_path / "wrapped.safetensors"))
    ours, _, _ = tool_deltas(image_zoo["sd15"], tmp_path)
    original, _, _ = tool_deltas(image_zoo["sd15"], image_zoo["kohya_sd15"])
    assert set(ours) == set(original)
    assert all(torch.equal(ours[k], original[k]) for k in ours)


def test_kohya_flux_lora_on_the_diffusers_transformer_equals_diffusers_fuse(image_zoo):
    """The same kohya Flux file on the diffusers-layout transformer: each fused qkv module covers
    to_q / to_k / to_v (add_*_proj for txt), each taking its rows of B, as diffusers' converter does."""
    ours, art, base = tool_deltas(image_zoo["flux"], image_zoo["kohya_flux"])
    ref = _flux_fused(image_zoo, image_zoo["kohya_flux"] / "flux_style.safetensors")
    assert_same_deltas(ours, {f"transformer.{k}": v for k, v in ref.items()}, base, convs=False)
    assert len(ours) == 12 and art.skipped == []


# --- LyCORIS against PEFT ----------------------------------------------------------------------
def _peft_lycoris_deltas(image_zoo, file: Path, kind: str) -> dict[str, torch.Tensor]:
    """PEFT's LoHa / LoKr layers wrapped around the saved UNet, their parameters replaced by the
    file's tensors, merged. For LoKr the scale comes from diffusers' own LyCORIS converter
    (`_bake_lokr_alpha_` folds alpha/rank into w1, or drops alpha when both factors are full), and
    PEFT's scaling is set to 1: diffusers owns the scale convention, PEFT the Kronecker/conv math."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_conversion_utils import _bake_lokr_alpha_
    from peft import LoHaConfig, LoKrConfig, get_peft_model

    sd = load_file(str(file))
    unet = UNet2DConditionModel.from_pretrained(image_zoo["sd15"] / "unet")
    modules = sorted(targeted(unet, LYCORIS_LEAVES))
    if kind == "lokr":
        _bake_lokr_alpha_(sd)
    config = (LoHaConfig(r=2, alpha=3.0, target_modules=modules) if kind == "loha"
              else LoKrConfig(r=2, alpha=3.0, target_modules=modules))

    def load(model) -> None:
        peft_model = get_peft_model(model, config)
        for path in modules:
            layer = peft_model.base_model.model.get_submodule(path)
            prefix = "lora_unet_" + path.replace(".", "_") + "."
            names = [k[len(prefix):] for k in sd if k.startswith(prefix) and not k.endswith(".alpha")]
            for pname in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1",
                          "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"):
                pdict = getattr(layer, pname, None)
                if pdict is not None and "default" in pdict:
                    del pdict["default"]
            for n in names:
                getattr(layer, n)["default"] = torch.nn.Parameter(sd[prefix + n].clone())
            if kind == "lokr":
                layer.scaling["default"] = 1.0

    return {f"unet.{k}": v for k, v in fused_delta(load, unet).items()}


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_lycoris_equals_peft_layers(image_zoo, kind):
    ours, art, base = tool_deltas(image_zoo["sd15"], image_zoo[f"lycoris_{kind}"])
    file = next(image_zoo[f"lycoris_{kind}"].glob("*.safetensors"))
    assert_same_deltas(ours, _peft_lycoris_deltas(image_zoo, file, kind), base)
    assert art.kind == kind


# --- refusals and skips ---------------------------------------------------------------------------
def test_unsupported_modules_and_unknown_keys_are_skipped_with_reasons(image_zoo, tmp_path):
    sd = load_file(str(image_zoo["kohya_sd15"] / "my_style_v1.safetensors"))
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    sd[f"{name}.dora_scale"] = torch.ones(8, 1, 1, 1)
    save_file(sd, str(tmp_path / "with_dora.safetensors"))
    art = open_artifact(tmp_path)
    targets = art.targets(Checkpoint.open(image_zoo["sd15"]))
    assert "unet.down_blocks.0.attentions.0.proj_in.weight" not in {t.tensor for t in targets}
    reasons = dict(art.skipped)
    assert reasons[f"{name}.lora_down.weight"] == "DoRA (weight-decomposed) module"
    assert reasons[f"{name}.dora_scale"] == "DoRA (weight-decomposed) module"


def test_lora_for_another_base_and_ambiguous_folders_are_typed_errors(image_zoo, tmp_path):
    art = open_artifact(image_zoo["kohya_sdxl"])
    with pytest.raises(BaseMismatchError, match="for another base"):
        art.targets(Checkpoint.open(image_zoo["sd15"]))   # SDXL LoRA on an SD1.5 base
    lone = tmp_path / "lone"
    lone.mkdir()
    save_file({"conv_in.weight": torch.zeros(4, 4, 3, 3)}, str(lone / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(AdapterWeightsError, match="not an adapter file"):
        open_artifact(lone)
    for name in ("a.safetensors", "b.safetensors"):
        save_file({"lora_unet_x.alpha": torch.tensor(1.0)}, str(tmp_path / name))
    with pytest.raises(CheckpointNotFoundError, match="several .safetensors"):
        open_artifact(tmp_path)


def dict_rows(root: Path, table: str) -> list[dict]:
    return duckdb.read_parquet(unit_files(root, table), union_by_name=True).to_arrow_table().to_pylist()


# --- end to end -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kohya_run(image_zoo, tmp_path_factory) -> Path:
    """`zoospectra analyze` of the kohya SD1.5 LoRA on the tiny SD1.5 pipeline (in-process)."""
    out = tmp_path_factory.mktemp("kohya_run") / "results"
    proc = subprocess.run([sys.executable, "-m", "zoospectra.cli", "analyze", "--base", str(image_zoo["sd15"]),
                           f"style={image_zoo['kohya_sd15']}", "--out", str(out), "--local"],
                          capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_analyze_kohya_lora_end_to_end(image_zoo, kohya_run):
    """Rows name their component; convolutions carry their kernel shape and are analysed as
    [out, in*kh*kw]."""
    out = kohya_run
    rows = dict_rows(out, "matrices")
    assert len(rows) == 89
    by_tensor = {r["tensor"]: r for r in rows}
    conv = by_tensor["unet.down_blocks.0.resnets.0.conv1.weight"]
    assert conv["component"] == "unet" and conv["kernel_shape"] == [8, 8, 3, 3]
    assert (conv["m"], conv["n"]) == (8, 72) and conv["kind"] == "lora" and conv["rank"] == 4
    assert conv["scale"] == pytest.approx(0.5)
    lin = by_tensor["text_encoder.encoder.layers.0.self_attn.q_proj.weight"]
    assert lin["component"] == "text_encoder" and lin["kernel_shape"] is None
    ours, _, _ = tool_deltas(image_zoo["sd15"], image_zoo["kohya_sd15"])
    dw = ours["unet.down_blocks.0.resnets.0.conv1.weight"]
    assert conv["norm_dw"] == pytest.approx(float(dw.norm()), rel=1e-5)
    models = duckdb.read_parquet(str(out / "models" / "*.parquet")).to_arrow_table().to_pylist()
    assert any("weird_suffix" in s for s in models[0]["skipped"])


def test_single_weight_files_as_cli_arguments(image_zoo, tmp_path):
    """What image-model users download: a BFL single-file Flux base and a kohya LoRA file, passed as
    files, not folders. Each file is pinned on its own: a second LoRA next to the adapter file and a
    .gguf next to the base file are not part of them. The rows are of the diffusers-checked dW of
    that file (test_kohya_flux_lora_on_a_bfl_single_file_equals_diffusers_fuse)."""
    import shutil

    base_dir, lora_dir = tmp_path / "models", tmp_path / "loras"
    base_dir.mkdir()
    lora_dir.mkdir()
    base_file = Path(shutil.copy(image_zoo["flux_bfl"] / "flux1-tiny.safetensors", base_dir))
    lora_file = Path(shutil.copy(image_zoo["kohya_flux"] / "flux_style.safetensors", lora_dir))
    shutil.copy(image_zoo["kohya_sd15"] / "my_style_v1.safetensors", lora_dir)   # a neighbour, not analysed
    (base_dir / "other.Q4_K_M.gguf").write_bytes(b"GGUF not this base")        # nor read as the base
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "zoospectra.cli", "analyze", "--base", str(base_file),
                           str(lora_file), "--out", str(out), "--local"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = dict_rows(out, "matrices")
    ours, _, _ = tool_deltas(image_zoo["flux_bfl"] / "flux1-tiny.safetensors", image_zoo["kohya_flux"])
    assert {r["tensor"] for r in rows} == set(ours) and len(rows) == len(ours) > 0
    models = duckdb.read_parquet(str(out / "models" / "*.parquet")).to_arrow_table().to_pylist()
    assert [(m["model_id"], m["base_id"]) for m in models] == [("flux_style", "flux1-tiny")]
    for r in rows:
        assert (r["model_id"], r["component"]) == ("flux_style", "transformer")
        assert (r["m"], r["n"]) == tuple(ours[r["tensor"]].shape)
        assert r["norm_dw"] == pytest.approx(float(ours[r["tensor"]].norm()), rel=1e-5)
    # a file from the HF cache: snapshots/<sha>/name.safetensors is a symlink to blobs/<hash>
    from zoospectra.io.quantized import open_base
    from zoospectra.io.refs import local_ref

    (tmp_path / "blobs").mkdir()
    (tmp_path / "snap").mkdir()
    shutil.copy(lora_file, tmp_path / "blobs" / "9f3c0a")
    (tmp_path / "snap" / "flux_style.safetensors").symlink_to(tmp_path / "blobs" / "9f3c0a")
    ref, direct = local_ref(tmp_path / "snap" / "flux_style.safetensors"), local_ref(lora_file)
    assert (ref.model_id, ref.revision) == ("flux_style", direct.revision)
    base = open_base(local_ref(base_file).open_source())
    linked = open_artifact(ref.open_source(), model_id=ref.model_id)
    assert sorted(t.tensor for t in linked.targets(base)) == sorted(ours)
    # a file that is no weight file is a one-line error naming it
    (lora_dir / "notes.txt").write_text("not weights")
    bad = subprocess.run([sys.executable, "-m", "zoospectra.cli", "analyze", "--base", str(base_file),
                          str(lora_dir / "notes.txt"), "--out", str(tmp_path / "r2"), "--local"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "single .safetensors / .gguf weight file" in bad.stderr and "notes.txt" in bad.stderr


# --- studies ------------------------------------------------------------------------------------
# layer kinds by hand, per module leaf of the tiny SD1.5 pipeline (the macro's rule, written out)
_KIND = {"to_q": "attention", "to_k": "attention", "to_v": "attention", "to_out.0": "attention",
         "proj_out": "attention", "ff.net.0.proj": "feed-forward", "ff.net.2": "feed-forward",
         "q_proj": "attention", "k_proj": "attention", "v_proj": "attention", "out_proj": "attention",
         "fc1": "feed-forward", "fc2": "feed-forward", "time_emb_proj": "other"}


def _expected_kind(tensor: str, kernel_shape: list | None) -> str:
    if kernel_shape is not None:
        return "convolution"   # resnet conv1/conv2/conv_shortcut (3x3, 1x1) and SD1.5's 1x1 proj_in
    path = tensor[: -len(".weight")]
    return next(kind for leaf, kind in _KIND.items() if path.endswith("." + leaf))


def test_components_study_groups_rows_by_component_and_layer_kind(kohya_run):
    """study_components against the same grouping done by hand over the matrices and vectors rows."""
    from zoospectra.study.studies import STUDIES, connect_scoped, run_study

    eps, k = 0.5, 10
    matrices = dict_rows(kohya_run, "matrices")
    vectors = dict_rows(kohya_run, "vectors")
    intr: dict[str, int] = {}
    for v in vectors:
        if v["side"] == "U" and v["j"] <= k and v["max_cos"] < eps:
            intr[v["tensor"]] = intr.get(v["tensor"], 0) + 1
    want: dict[tuple[str, str], list] = {}
    for r in matrices:
        cell = want.setdefault((r["component"], _expected_kind(r["tensor"], r["kernel_shape"])), [0, 0, []])
        cell[0] += 1
        cell[1] += intr.get(r["tensor"], 0)
        cell[2].append(r["eff_rank"])
    with connect_scoped(kohya_run) as con:
        got = run_study(con, STUDIES["components"], {"eps": eps, "k": k}).to_pylist()
        kinds = con.execute("SELECT layer_kind('encoder.layer.0.attention.output.dense.weight', NULL), "
                        "layer_kind('encoder.layer.0.output.dense.weight', NULL), "
                        "layer_kind('transformer.h.0.mlp.c_proj.weight', NULL), "
                        "layer_kind('model.layers.0.self_attn.o_proj.weight', NULL)").fetchone()
    assert kinds == ("attention", "feed-forward", "feed-forward", "attention")
    assert {(r["component"], r["layer_kind"]) for r in got} == set(want)
    assert {kind for _, kind in want} == {"attention", "convolution", "feed-forward", "other"}
    for r in got:
        n, n_intr, ranks = want[(r["component"], r["layer_kind"])]
        assert (r["n_matrices"], r["n_intruders"]) == (n, n_intr)
        assert r["intruders_per_matrix"] == pytest.approx(n_intr / n)
        assert r["eff_rank_mean"] == pytest.approx(sum(ranks) / len(ranks))
        assert r["model_id"] == "style" and r["kind"] == "lora"
    fig = STUDIES["components"].plot(run_study_table(kohya_run), {"eps": eps, "k": k})
    assert len(fig.axes) == 2


def run_study_table(root: Path):
    from zoospectra.study.studies import STUDIES, connect_scoped, run_study

    with connect_scoped(root) as con:
        return run_study(con, STUDIES["components"], {})


# --- crawls -----------------------------------------------------------------------------------
@pytest.mark.slow   # two crawls, each analysing two 89-matrix LoRAs
def test_crawl_finds_image_loras_of_an_image_base(image_zoo, fake_hub, tmp_path):
    """`--base-model` over the loopback Hub: kohya and diffusers-format LoRAs, tagged `lora` and
    `base_model:adapter:<id>` but not `peft` (library diffusers), are found and analysed against the
    diffusers-layout base repo; a single-file LoRA's base is its model card's base_model. A LoRA whose
    card names another base is an errors row; `--repos` finds the base from the card alone."""
    import pyarrow.parquet as pq
    from fixtures_hub import publish_dir
    from huggingface_hub import constants

    import zoospectra
    from zoospectra.io.hub import HubOptions

    base = "org/tiny-sd15"
    publish_dir(fake_hub, base, image_zoo["sd15"])
    tags = ["lora", "diffusers", f"base_model:{base}", f"base_model:adapter:{base}"]
    publish_dir(fake_hub, "painter/kohya-style", image_zoo["kohya_sd15"], tags=tags, card_data={"base_model": base},
                library_name="diffusers")
    publish_dir(fake_hub, "painter/diffusers-style", image_zoo["diffusers_sd15"], tags=tags,
                card_data={"base_model": base}, library_name="diffusers")
    publish_dir(fake_hub, "painter/mislabelled", image_zoo["kohya_sd15"], tags=tags,
                card_data={"base_model": "org/some-other-base"}, library_name="diffusers")
    opts = HubOptions(endpoint=fake_hub.url, cache_dir=constants.HF_HUB_CACHE, timeout=5.0, max_retries=1,
                      backoff=0.01, backoff_max=0.02)
    out = tmp_path / "r"
    (report,) = zoospectra.crawl({"name": "img", "out": str(out), "base_models": [base]}, options=opts,
                                 executor="local").bases
    errs = [r for p in (out / "errors").glob("*/*.parquet") for r in pq.read_table(p).to_pylist()]
    assert (report.discovered, report.discovery_errors) == (2, 1), (report, [e["message"] for e in errs])
    errs = [r for p in (out / "errors").glob("*/*.parquet") for r in pq.read_table(p).to_pylist()]
    assert (out / "models").exists(), (report, [e["message"] for e in errs])
    models = {m["model_id"]: m for m in pq.read_table(out / "models").to_pylist()}
    assert set(models) == {"painter/kohya-style", "painter/diffusers-style"}
    assert {m["base_id"] for m in models.values()} == {base}
    assert models["painter/kohya-style"]["peft_type"] == "KOHYA_LORA"
    rows = dict_rows(out, "matrices")
    assert len(rows) == 2 * 89 and {r["component"] for r in rows} == {"unet", "text_encoder"}
    assert any(r["kernel_shape"] == [8, 8, 3, 3] for r in rows)

    (by_repo,) = zoospectra.crawl({"name": "img2", "out": str(tmp_path / "r2"), "repos": ["painter/kohya-style"]},
                                  options=opts, executor="local").bases
    assert by_repo.discovered == 1
    assert {m["model_id"]: m["base_id"] for m in pq.read_table(tmp_path / "r2" / "models").to_pylist()} == {
        "painter/kohya-style": base}


def test_planning_every_kind_reads_headers_without_torch(zoo, image_zoo):
    """The driver plans (opens every artifact, lists its targets against the base) from configs
    and safetensors headers alone: in a fresh interpreter, planning each PEFT kind, a full
    fine-tune, a fan-in-fan-out model and every image-LoRA format leaves torch unimported (an
    import of 2-3 s of CPU that would compete with Ray's start). Each plan has units: the check
    is not passed by planning nothing."""
    from fixtures_zoo import base_path_of

    cases = [(str(base_path_of(zoo, name)), str(path)) for name, path in zoo.items() if name != "_root"]
    cases += [(str(image_zoo[b]), str(image_zoo[a])) for b, a in [
        ("sd15", "kohya_sd15"), ("sd15", "lycoris_loha"), ("sd15", "lycoris_lokr"), ("sd15", "diffusers_sd15"),
        ("sdxl", "kohya_sdxl"), ("flux", "diffusers_flux"), ("flux", "kohya_flux")]]
    script = """
import json, sys
from zoospectra.config import AnalysisConfig
from zoospectra.io.refs import local_ref
from zoospectra.run.plan import build_plan
out = []
for base, art in json.loads(sys.argv[1]):
    plan = build_plan(local_ref(base, "base"), [local_ref(art)], AnalysisConfig())
    out.append([art, len(plan.units), [e["message"] for e in plan.errors]])
print(json.dumps([out, sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))]))
"""
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    planned, torch_modules = json.loads(proc.stdout.splitlines()[-1])
    assert [(a, e) for a, n, e in planned if n == 0 or e] == []
    assert len(planned) == len(cases) and torch_modules == []
