"""The durable base SVD store (pipeline/run/basecache.py) and its scheduling (issue 13).

Real local Ray, real Parquet, real safetensors files, PEFT-format LoRA adapters: a run over 100
adapters with --batch-size 8 decomposes each touched base tensor exactly once; a later run over
new adapters of the same base decomposes none; a truncated or altered stored decomposition is
detected, moved aside (never used) and recomputed, and the rows come out identical.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from zoospectra.config import AnalysisConfig
from zoospectra.io.refs import local_ref
from zoospectra.run.basecache import DAMAGED, BaseCache, BaseKey, DamagedEntry, decode, encode, tensor_digest
from zoospectra.spectral import base_svd

MODULES = {"self_attn.q_proj": (48, 48), "self_attn.v_proj": (48, 48), "mlp.up_proj": (80, 48)}
VOLATILE = {"run_id", "unit_id", "seconds", "device", "created_at", "at"}


def _matrix(m: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = torch.arange(1, min(m, n) + 1, dtype=torch.float64) ** -0.7
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    return ((u * s) @ v.T).float()


def write_base(d: Path) -> Path:
    d.mkdir(parents=True)
    save_file({f"model.layers.0.{k}.weight": _matrix(m, n, i) for i, (k, (m, n)) in enumerate(MODULES.items())},
              str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 48,
                                               "intermediate_size": 80, "num_hidden_layers": 1}))
    return d


def write_lora(root: Path, base: Path, k: int) -> Path:
    r = (2, 4, 8)[k % 3]
    d = root / f"lora_{k:03d}"
    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(k)
    weights = {}
    for name, (m, n) in MODULES.items():
        key = f"base_model.model.model.layers.0.{name}"
        weights[f"{key}.lora_A.weight"] = torch.randn(r, n, generator=g) / n**0.5
        weights[f"{key}.lora_B.weight"] = torch.randn(m, r, generator=g) * 0.3
    save_file(weights, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": ["q_proj", "v_proj", "up_proj"],
        "base_model_name_or_path": str(base), "init_lora_weights": True}))
    return d


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> tuple[Path, list[Path], list[Path]]:
    root = tmp_path_factory.mktemp("bc-zoo")
    base = write_base(root / "base")
    first = [write_lora(root, base, k) for k in range(100)]
    fresh = [write_lora(root, base, k) for k in range(100, 110)]
    return base, first, fresh


def analyze(base: Path, adapters: list[Path], out: Path, **kw):
    from zoospectra.cli import run_analysis

    refs = [local_ref(a) for a in adapters]
    return run_analysis(local_ref(base, "base"), refs, AnalysisConfig(), str(out), quiet=True,
                        **{"executor": "ray", **kw})


def runs_row(out: Path, run_id: str) -> dict:
    return pq.read_table(out / "runs" / f"{run_id}.parquet").to_pylist()[0]


def rows(out: Path, table: str, models: set[str] | None = None) -> list[tuple]:
    out_rows = []
    for path in (out / "units").glob(f"*/{table}.parquet"):
        t = pq.read_table(path)
        cols = [c for c in t.column_names if c not in VOLATILE]
        out_rows += [tuple(r[c] for c in cols) for r in t.to_pylist()
                     if models is None or r["model_id"] in models]
    return sorted(out_rows, key=repr)


# --- the store alone --------------------------------------------------------------------------
def _entry() -> tuple[BaseKey, torch.Tensor, object]:
    w0 = _matrix(40, 24, 1)
    key = BaseKey("uid", "base", "rev", "t.weight", False, "float32", (40, 24))
    return key, w0, base_svd(w0, AnalysisConfig())


def test_round_trip_keeps_every_bit_and_checks_the_w0() -> None:
    key, w0, svd = _entry()
    u, s, vh, _ = decode(encode(key, svd, tensor_digest(w0)), key, tensor_digest(w0))
    assert torch.equal(u, svd.U) and torch.equal(s, svd.S) and torch.equal(vh, svd.Vh)
    other = w0.clone()
    other[0, 0] += 1e-3
    with pytest.raises(DamagedEntry, match="another W0"):
        decode(encode(key, svd, tensor_digest(w0)), key, tensor_digest(other))
    with pytest.raises(DamagedEntry, match="key"):
        decode(encode(key, svd, tensor_digest(w0)), dataclasses.replace(key, tensor="x"),
               tensor_digest(w0))


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_damaged_entry_is_moved_aside_and_never_used(tmp_path, damage) -> None:
    key, w0, svd = _entry()
    cache = BaseCache(str(tmp_path / "bases"))
    cache.store(key, svd, tensor_digest(w0))
    path = tmp_path / "bases" / key.file_name
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":   # one bit of Vh's data: the header still parses, the checksum does not
        path.write_bytes(raw[:-5] + bytes([raw[-5] ^ 1]) + raw[-4:])
    else:
        path.write_bytes(b"")
    assert cache.load(key, tensor_digest(w0), torch.device("cpu")) is None
    assert not path.exists()
    moved = list((tmp_path / "bases" / DAMAGED).iterdir())
    assert len(moved) == 1 and moved[0].read_bytes() != raw   # kept for inspection, as it was


def test_remote_root_stores_loads_and_detects_damage() -> None:
    fsspec = pytest.importorskip("fsspec")
    key, w0, svd = _entry()
    cache = BaseCache("memory://bc-test/bases")
    cache.store(key, svd, tensor_digest(w0))
    got = cache.load(key, tensor_digest(w0), torch.device("cpu"))
    assert got is not None and torch.equal(got.Vh, svd.Vh)
    fs = fsspec.filesystem("memory")
    name = f"/bc-test/bases/{key.file_name}"
    raw = fs.cat_file(name)
    fs.pipe_file(name, raw[:100])
    assert cache.load(key, tensor_digest(w0), torch.device("cpu")) is None
    assert not fs.exists(name) and len(fs.ls(f"/bc-test/bases/{DAMAGED}")) == 1


# --- scheduling on real Ray ---------------------------------------------------------------------
@pytest.mark.slow
def test_each_base_tensor_is_decomposed_once_per_base_ever(zoo, tmp_path) -> None:
    base, first, fresh = zoo
    out = tmp_path / "results"
    s1 = analyze(base, first, out, batch_size=8)
    assert s1.n_units == len(MODULES) * 13 and s1.n_failed == 0 and s1.n_member_errors == 0
    row = runs_row(out, s1.run_id)
    # 13 units per tensor on 2 workers, yet each tensor decomposed once, ahead of its units
    assert (row["base_svd_computed"], row["base_svd_reused"], row["mode"]) == (len(MODULES), 0, "fast")
    assert len(list((out / "bases").glob("*.safetensors"))) == len(MODULES)

    s2 = analyze(base, fresh, out, batch_size=8)
    row = runs_row(out, s2.run_id)
    assert (row["base_svd_computed"], row["base_svd_reused"]) == (0, len(MODULES))
    assert s2.n_done == len(MODULES) * 2

    # A shared cache, one entry truncated: a new root over the same adapters recomputes that one
    # entry only, moves the damaged file aside, and writes the same rows.
    victim = sorted((out / "bases").glob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:1000])
    other = tmp_path / "other"
    s3 = analyze(base, fresh, other, batch_size=8, base_cache=str(out / "bases"))
    row = runs_row(other, s3.run_id)
    assert (row["base_svd_computed"], row["base_svd_reused"]) == (1, len(MODULES) - 1)
    assert len(list((out / "bases" / DAMAGED).iterdir())) == 1
    assert not (other / "bases").exists()            # the shared cache was used, not OUT/bases
    names = {p.name for p in fresh}
    for table in ("matrices", "vectors", "spectra", "similarity"):
        assert rows(other, table, names) == rows(out, table, names), table
    assert set(rows(other, "spectra", {"base"})) == set(rows(out, "spectra", {"base"}))   # W0's own


def test_default_location_and_spec_option() -> None:
    from zoospectra.errors import ConfigError
    from zoospectra.jobs.spec import CrawlSpec
    from zoospectra.run.basecache import default_base_cache

    assert default_base_cache("s3://bucket/zs/") == "s3://bucket/zs/bases"
    assert default_base_cache("/r/results") == "/r/results/bases"
    spec = CrawlSpec.from_dict({"name": "x", "base_models": "org/base", "out": "/tmp/r",
                                "base_cache": "s3://b/bases"})
    assert spec.base_cache == "s3://b/bases" and spec.analysis.mode == "fast"
    with pytest.raises(ConfigError, match="base_cache"):
        CrawlSpec.from_dict({"name": "x", "base_models": "org/base", "out": "/tmp/r", "base_cache": 5})


def test_unwritable_cache_costs_reuse_not_the_analysis(tmp_path) -> None:
    """A cache root that cannot be written (a file where the directory should be): the base
    SVD is still computed and returned, and the failure is only logged."""
    from zoospectra.run import basecache

    base = write_base(tmp_path / "base")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    basecache._MEMORY.clear()
    got = basecache.obtain(local_ref(base, "base"), "model.layers.0.mlp.up_proj.weight", False,
                           AnalysisConfig(), "cpu", str(blocker / "bases"))
    assert got.how == "computed" and tuple(got.svd.U.shape) == (80, 48)
    assert blocker.read_text() == "x"


def test_a_tensors_only_unit_obtains_its_base_itself(zoo, tmp_path) -> None:
    """One unit per tensor: no separate decomposition task (it would read W0 a second time);
    the unit computes and stores it, and the counts still say what happened."""
    from zoospectra.cli import run_analysis

    base, first, fresh = zoo
    out = tmp_path / "results"
    kw = dict(quiet=True, executor="local", device="cpu", batch_size=64)
    s1 = run_analysis(local_ref(base, "base"), [local_ref(a) for a in first[:3]], AnalysisConfig(), str(out), **kw)
    assert s1.n_units == len(MODULES)
    assert (s1.base_svd_computed, s1.base_svd_reused) == (len(MODULES), 0)
    s2 = run_analysis(local_ref(base, "base"), [local_ref(a) for a in fresh[:2]], AnalysisConfig(), str(out), **kw)
    row = runs_row(out, s2.run_id)
    assert (row["base_svd_computed"], row["base_svd_reused"]) == (0, len(MODULES))


def test_a_second_run_in_the_same_process_reads_the_store_afresh(zoo, tmp_path) -> None:
    """A worker keeps the last base it obtained, but only for its run: a later run in the same
    process (a notebook, the in-process executor, a driver's workers) must find a store entry
    damaged in between, move it aside and recompute it. Before the memory was scoped to the run,
    the second run answered from the first run's memory: "reused", the damage never seen."""
    from zoospectra.run import basecache

    base = zoo[0]
    tensor = "model.layers.0.self_attn.q_proj.weight"
    adapters = []
    for k in range(4):  # LoRAs of one tensor: the process's memory holds exactly that tensor
        d = write_lora(tmp_path / "loras", base, 200 + k)
        w = {n: t for n, t in load_file(str(d / "adapter_model.safetensors")).items() if "q_proj" in n}
        save_file(w, str(d / "adapter_model.safetensors"))
        adapters.append(d)
    out = tmp_path / "results"
    kw = dict(executor="local", device="cpu", batch_size=1)   # two units per run: a prepare task
    s1 = analyze(base, adapters[:2], out, **kw)
    assert (s1.base_svd_computed, s1.base_svd_reused, s1.n_done) == (1, 0, 2)
    assert {x for k in basecache._MEMORY for x in k} >= {tensor}
    (victim,) = (out / "bases").glob("*.safetensors")
    victim.write_bytes(victim.read_bytes()[:1000])
    s2 = analyze(base, adapters[2:], out, **kw)
    assert (s2.base_svd_computed, s2.base_svd_reused, s2.n_done) == (1, 0, 2)
    assert len(list((out / "bases" / DAMAGED).glob("*.safetensors"))) == 1
    (fresh,) = (out / "bases").glob("*.safetensors")
    assert len(fresh.read_bytes()) > 1000
