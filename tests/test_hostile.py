"""A corpus of hostile and broken inputs, built programmatically from two real PEFT LoRAs.

Every case is one artifact directory derived from a good adapter (or a one-tensor full
fine-tune of MiniLM): broken safetensors containers, factors that do not fit, adapters of another
base, absurd configs, pickles that would run code, paths and symlinks that leave the directory.

- Each case alone raises its typed error, and the message names the file or tensor at fault.
- All of them in ONE job beside two good adapters (in-process, and once through the real CLI on a
  local Ray): every bad artifact becomes `errors` rows naming what was wrong, the good adapters'
  rows are exactly those of a run without the bad ones, and nothing unpickles anything.
- SQL injection through CLI parameters (study params, scopes, model names, a quoted root) runs no
  SQL of the attacker's: a COPY ... TO payload never writes its file.
- Odd repo ids (crawl specs, a Hub that lists them) end as typed errors, not crashes.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
import torch
from rows import table_rows

from zoospectra import errors as E
from zoospectra.adapters import open_artifact, read_base
from zoospectra.config import AnalysisConfig
from zoospectra.io.checkpoint import Checkpoint
from zoospectra.io.refs import local_ref
from zoospectra.run.execute import run_plan
from zoospectra.run.plan import build_plan
from zoospectra.spectral import analyze_batch

torch.set_num_threads(1)

Q0 = "encoder.layer.0.attention.self.query"
A0, B0 = f"base_model.model.{Q0}.lora_A.weight", f"base_model.model.{Q0}.lora_B.weight"
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
UNIT_TABLES = ("matrices", "vectors", "spectra", "similarity")
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# --- building blocks ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def goods(tiny_loras: list[Path]) -> list[Path]:
    """Two real LoRAs (r=4, one with rsLoRA) on MiniLM's query matrices, named good1 and good2."""
    return tiny_loras[:2]


def split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join_safetensors(header: dict | bytes, data: bytes, length: int | None = None) -> bytes:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if length is None else length) + blob + data


def copy_adapter(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in (CONFIG, WEIGHTS):
        shutil.copy(src / name, dst / name)
    return dst


Builder = Callable[[Path, Path, Path], Path]   # (good adapter, destination, base dir) -> artifact dir


def raw_weights(edit: Callable[[bytes], bytes]) -> Builder:
    def build(good: Path, dst: Path, base: Path) -> Path:
        copy_adapter(good, dst)
        (dst / WEIGHTS).write_bytes(edit((good / WEIGHTS).read_bytes()))
        return dst
    return build


def header_edit(edit: Callable[[dict], None]) -> Builder:
    def change(raw: bytes) -> bytes:
        header, data = split_safetensors(raw)
        edit(header)
        return join_safetensors(header, data)
    return raw_weights(change)


def tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Builder:
    from safetensors.torch import load_file, save_file

    def build(good: Path, dst: Path, base: Path) -> Path:
        copy_adapter(good, dst)
        sd = load_file(str(dst / WEIGHTS))
        edit(sd)
        save_file({k: v.clone().contiguous() for k, v in sd.items()}, str(dst / WEIGHTS))
        return dst
    return build


def config(edit: Callable[[dict], None]) -> Builder:
    def build(good: Path, dst: Path, base: Path) -> Path:
        copy_adapter(good, dst)
        cfg = json.loads((dst / CONFIG).read_text())
        edit(cfg)
        (dst / CONFIG).write_text(json.dumps(cfg))  # allow_nan: NaN is written as the JS literal
        return dst
    return build


def config_text(text: bytes) -> Builder:
    def build(good: Path, dst: Path, base: Path) -> Path:
        copy_adapter(good, dst)
        (dst / CONFIG).write_bytes(text)
        return dst
    return build


def _set(**fields: object) -> Callable[[dict], None]:
    return lambda d: d.update(fields)


def _drop(*names: str) -> Callable[[dict], None]:
    return lambda d: [d.pop(n) for n in names]


# --- builders for cases that need more than an edit -----------------------------------------
class Boom:
    """Unpickling this runs a shell command that creates a marker file next to it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def pickle_adapter(good: Path, dst: Path, base: Path) -> Path:
    """adapter_config.json + adapter_model.bin whose payload would run code on load."""
    dst.mkdir(parents=True)
    shutil.copy(good / CONFIG, dst / CONFIG)
    (dst / "adapter_model.bin").write_bytes(pickle.dumps(Boom(dst.parent / f"PWNED-{dst.name}")))
    return dst


def pickle_full(good: Path, dst: Path, base: Path) -> Path:
    dst.mkdir(parents=True)
    (dst / "pytorch_model.bin").write_bytes(pickle.dumps(Boom(dst.parent / f"PWNED-{dst.name}")))
    return dst


def symlinked(name: str) -> Builder:
    """`name` is a symlink to a valid copy of itself outside the artifact directory."""
    def build(good: Path, dst: Path, base: Path) -> Path:
        copy_adapter(good, dst)
        outside = dst.parent / f"outside-{dst.name}-{name}"
        shutil.move(dst / name, outside)
        (dst / name).symlink_to(outside)
        return dst
    return build


def full_ft(edit: Callable[[torch.Tensor], torch.Tensor]) -> Builder:
    """A one-tensor full fine-tune of MiniLM (its layer-0 query weight, nudged, then edited)."""
    from safetensors.torch import save_file

    def build(good: Path, dst: Path, base: Path) -> Path:
        dst.mkdir(parents=True)
        w0 = Checkpoint.open(base).get(f"{Q0}.weight")
        w = edit(w0 + 0.01 * torch.randn(w0.shape, generator=torch.Generator().manual_seed(0)))
        save_file({f"{Q0}.weight": w.contiguous()}, str(dst / "model.safetensors"))
        return dst
    return build


def sharded_index(shard: str, *, link_outside: bool = False, index: bytes | None = None) -> Builder:
    """A sharded full fine-tune whose index points at `shard` (or is `index` verbatim)."""
    def build(good: Path, dst: Path, base: Path) -> Path:
        full_ft(lambda w: w)(good, dst, base)
        real = dst / "model.safetensors"
        if link_outside:  # the shard itself is a symlink out of the directory
            outside = dst.parent / f"outside-{dst.name}.safetensors"
            shutil.move(real, outside)
            (dst / shard).symlink_to(outside)
        else:
            shutil.move(real, dst.parent / f"outside-{dst.name}.safetensors")
        body = index or json.dumps({"metadata": {}, "weight_map": {f"{Q0}.weight": shard}}).encode()
        (dst / "model.safetensors.index.json").write_bytes(body)
        return dst
    return build


def overlapping(h: dict) -> None:
    a, b = h[A0]["data_offsets"], h[B0]["data_offsets"]
    if a[0] > b[0]:
        a, b = b, a
    b[0], b[1] = a[0] + 4, a[0] + 4 + (b[1] - b[0])  # same size, starts inside the other


def other_base_keys(sd: dict[str, torch.Tensor]) -> None:
    for k in list(sd):
        sd[k.replace("encoder.layer.", "model.layers.").replace("attention.self.query", "self_attn.q_proj")] = sd.pop(k)


# --- the corpus -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    build: Builder
    error: type[E.ZoospectraError]
    names: str            # what the message must name: a file or a tensor
    stage: str = "plan"   # where the job catches it: plan | load | analyze


NAN_B = tensors(lambda sd: sd[B0].__setitem__((0, 0), float("nan")))
INF_A = tensors(lambda sd: sd[A0].__setitem__((1, 2), float("inf")))

CASES = [
    # safetensors container
    Case("truncated", raw_weights(lambda raw: raw[: len(raw) // 2]), E.CorruptSafetensorsError, WEIGHTS),
    Case("shorter_than_length", raw_weights(lambda raw: raw[:5]), E.CorruptSafetensorsError, WEIGHTS),
    Case("header_len_beyond_file", raw_weights(lambda raw: struct.pack("<Q", len(raw)) + raw[8:]),
         E.CorruptSafetensorsError, WEIGHTS),
    Case("header_len_huge", raw_weights(lambda raw: struct.pack("<Q", 2**63 - 1) + raw[8:]),
         E.CorruptSafetensorsError, WEIGHTS),
    Case("header_invalid_json", raw_weights(lambda raw: join_safetensors(b'{"a": [1, 2', b"")),
         E.CorruptSafetensorsError, WEIGHTS),
    Case("header_not_object", raw_weights(lambda raw: join_safetensors(b"[1, 2, 3]", b"")),
         E.CorruptSafetensorsError, WEIGHTS),
    Case("header_not_utf8", raw_weights(lambda raw: join_safetensors(b'{"\xff\xfe": 1}', b"")),
         E.CorruptSafetensorsError, WEIGHTS),
    Case("header_deeply_nested", raw_weights(lambda raw: join_safetensors(b"[" * 100_000 + b"]" * 100_000, b"")),
         E.CorruptSafetensorsError, WEIGHTS),
    Case("header_duplicate_key", raw_weights(
        lambda raw: join_safetensors(raw[8:8 + struct.unpack("<Q", raw[:8])[0]].replace(
            b'"' + A0.encode() + b'"', b'"' + B0.encode() + b'"', 1), raw[8 + struct.unpack("<Q", raw[:8])[0]:])),
         E.CorruptSafetensorsError, WEIGHTS),
    Case("offsets_overlap", header_edit(overlapping), E.CorruptSafetensorsError, "lora_"),
    Case("offsets_past_end", header_edit(lambda h: h[A0]["data_offsets"].__setitem__(1, 10**9)),
         E.CorruptSafetensorsError, A0),
    Case("offsets_reversed", header_edit(lambda h: h[A0].update(data_offsets=h[A0]["data_offsets"][::-1])),
         E.CorruptSafetensorsError, A0),
    Case("dtype_shape_mismatch", header_edit(lambda h: h[A0].update(shape=[8, 384])),
         E.CorruptSafetensorsError, A0),
    Case("unknown_dtype", header_edit(lambda h: h[A0].update(dtype="Q4_K")), E.CorruptSafetensorsError, A0),
    Case("negative_shape", header_edit(lambda h: h[A0].update(shape=[-4, -384])), E.CorruptSafetensorsError, A0),
    Case("metadata_not_strings", header_edit(lambda h: h.update(__metadata__={"format": 1})),
         E.CorruptSafetensorsError, WEIGHTS),
    Case("integer_factor", tensors(lambda sd: sd.update({A0: (sd[A0] * 100).to(torch.int32)})),
         E.UnsupportedDtypeError, A0),
    # non-finite weights
    Case("nan_in_lora_b", NAN_B, E.NonFiniteWeightsError, B0, "load"),
    Case("inf_in_lora_a", INF_A, E.NonFiniteWeightsError, A0, "load"),
    Case("scale_overflows", config(_set(lora_alpha=1e308)), E.NonFiniteWeightsError, "attention.self.query",
         "analyze"),
    Case("full_ft_nan", full_ft(lambda w: w.index_put_((torch.tensor([3]), torch.tensor([5])), torch.tensor(math.nan))),
         E.NonFiniteWeightsError, f"{Q0}.weight", "load"),
    # another base
    Case("other_base_keys", tensors(other_base_keys), E.BaseMismatchError, "q_proj"),
    Case("other_base_shapes", tensors(lambda sd: sd.update({A0: torch.randn(4, 768), B0: torch.randn(768, 4)})),
         E.BaseMismatchError, Q0),
    Case("full_ft_other_shape", full_ft(lambda w: torch.randn(384, 768)), E.BaseMismatchError, f"{Q0}.weight"),
    # factors that do not fit together
    Case("rank_mismatch_a_b", tensors(lambda sd: sd.update({B0: torch.randn(384, 8)})), E.AdapterWeightsError, B0),
    Case("factor_1d", tensors(lambda sd: sd.update({A0: torch.randn(384)})), E.AdapterWeightsError, A0),
    Case("factor_3d", tensors(lambda sd: sd.update({A0: torch.randn(4, 384, 1)})), E.AdapterWeightsError, A0),
    Case("missing_lora_b", tensors(lambda sd: sd.pop(B0)), E.AdapterConfigError, "lora_B.weight"),
    Case("unknown_suffix", tensors(lambda sd: sd.update({B0.replace("lora_B", "lora_Z"): sd[B0]})),
         E.UnsupportedAdapterError, "lora_Z"),
    Case("no_tensors", raw_weights(lambda raw: join_safetensors(b"{}", b"")), E.AdapterConfigError, WEIGHTS),
    # adapter_config.json
    Case("config_missing_r", config(_drop("r")), E.AdapterConfigError, CONFIG),
    Case("config_negative_r", config(_set(r=-4)), E.AdapterConfigError, CONFIG),
    Case("config_zero_r", config(_set(r=0)), E.AdapterConfigError, CONFIG),
    Case("config_absurd_r", config(_set(r=10**9)), E.AdapterConfigError, "query.lora_A.weight", "load"),
    Case("config_r_beyond_int32", config(_set(r=10**12)), E.AdapterConfigError, CONFIG),
    Case("config_target_modules_numbers", config(_set(target_modules=[1, 2])), E.AdapterConfigError, CONFIG),
    Case("config_r_string", config(_set(r="4")), E.AdapterConfigError, CONFIG),
    Case("config_r_bool", config(_set(r=True)), E.AdapterConfigError, CONFIG),
    Case("config_alpha_nan", config(_set(lora_alpha=float("nan"))), E.AdapterConfigError, CONFIG),
    Case("config_alpha_string", config(_set(lora_alpha="sixteen")), E.AdapterConfigError, CONFIG),
    Case("config_rslora_string", config(_set(use_rslora="false")), E.AdapterConfigError, CONFIG),
    Case("config_rank_pattern_negative", config(_set(rank_pattern={"query": -1})), E.AdapterConfigError, CONFIG),
    Case("config_rank_pattern_bad_regex", config(_set(rank_pattern={"quer(y": 4})), E.AdapterConfigError, CONFIG),
    Case("config_alpha_pattern_list", config(_set(alpha_pattern=["query", 4])), E.AdapterConfigError, CONFIG),
    Case("unknown_peft_type", config(_set(peft_type="FOURIERFT")), E.UnsupportedAdapterError, CONFIG),
    Case("missing_peft_type", config(_drop("peft_type")), E.AdapterConfigError, CONFIG),
    Case("refused_lora_variant", config(_set(use_qalora=True)), E.UnsupportedAdapterError, CONFIG),
    Case("config_invalid_json", config_text(b'{"peft_type": "LORA", "r": 4,'), E.AdapterConfigError, CONFIG),
    Case("config_json_list", config_text(b'["LORA", 4]'), E.AdapterConfigError, CONFIG),
    Case("config_not_utf8", config_text(b'{"peft_type": "\xff\xfe"}'), E.AdapterConfigError, CONFIG),
    Case("config_deeply_nested", config_text(b'{"a":' * 100_000 + b"1" + b"}" * 100_000), E.AdapterConfigError,
         CONFIG),
    # files, paths and pickles
    Case("pickle_adapter_runs_code", pickle_adapter, E.UnsafeCheckpointError, "adapter_model.bin"),
    Case("pickle_full_runs_code", pickle_full, E.UnsafeCheckpointError, "pytorch_model.bin"),
    Case("weights_symlink_escapes", symlinked(WEIGHTS), E.UnsafeCheckpointError, WEIGHTS),
    Case("config_symlink_escapes", symlinked(CONFIG), E.UnsafeCheckpointError, CONFIG),
    Case("index_parent_traversal", sharded_index("../outside.safetensors"), E.UnsafeCheckpointError,
         "../outside.safetensors"),
    Case("index_absolute_path", sharded_index("/etc/passwd"), E.UnsafeCheckpointError, "/etc/passwd"),
    Case("index_nested_traversal", sharded_index("sub/../../x.safetensors"), E.UnsafeCheckpointError,
         "sub/../../x.safetensors"),
    Case("index_shard_symlink_escapes", sharded_index("shard-1.safetensors", link_outside=True),
         E.UnsafeCheckpointError, "shard-1.safetensors"),
    Case("index_not_json", sharded_index("x", index=b"{weight_map: nope"), E.CorruptSafetensorsError,
         "model.safetensors.index.json"),
    Case("index_map_not_strings", sharded_index("x", index=b'{"weight_map": {"a": 1}}'), E.CorruptSafetensorsError,
         "model.safetensors.index.json"),
]
BY_NAME = {c.name: c for c in CASES}


def _tree_digest(artifact: Path, siblings: bool = True) -> str:
    """Hash of what a case left on disk in its artifact directory and (siblings=True) beside it:
    names relative to the artifact, file bytes, and symlink targets (not followed: an escaping
    link is the corruption)."""
    h = hashlib.sha256()
    paths = sorted(artifact.parent.rglob("*") if siblings else artifact.rglob("*"))
    for p in paths:
        if p == artifact:
            continue
        name = p.relative_to(artifact) if p.is_relative_to(artifact) else Path("..", p.relative_to(artifact.parent))
        h.update(str(name).encode())
        if p.is_symlink():
            h.update(b"->" + os.readlink(p).encode())
        elif p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def test_every_case_corrupts_the_good_adapter(hostile: dict[str, Path], goods: list[Path],
                                             base_ckpt: Checkpoint) -> None:
    """A builder that silently left the good adapter unchanged would make its case test nothing
    (the good one loads fine): every case must differ on disk from the good adapter and from
    every other case."""
    assert len(CASES) >= 30 and len(BY_NAME) == len(CASES)
    attempt(goods[0], base_ckpt, "good")                      # the source of every case is sound
    good = _tree_digest(goods[0], siblings=False)
    digests = {name: _tree_digest(path) for name, path in hostile.items()}
    assert good not in digests.values(), [n for n, d in digests.items() if d == good]
    same: dict[str, list[str]] = {}
    for name, d in digests.items():
        same.setdefault(d, []).append(name)
    assert all(len(names) == 1 for names in same.values()), [n for n in same.values() if len(n) > 1]


@pytest.fixture(scope="session")
def hostile(goods: list[Path], minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every case built once: name -> artifact directory (each in its own parent directory, so
    'outside' files and pickle markers sit next to it, never inside another case)."""
    root = tmp_path_factory.mktemp("hostile")
    return {c.name: c.build(goods[0], root / c.name / c.name, minilm_dir) for c in CASES}


@pytest.fixture(scope="session")
def base_ckpt(minilm_dir: Path) -> Checkpoint:
    return Checkpoint.open(minilm_dir)


def attempt(path: Path, base: Checkpoint, name: str) -> None:
    """Plan, load and analyse every matrix of one artifact, as a unit would."""
    art = open_artifact(path, model_id=name)
    for target in art.targets(base):
        w0 = read_base(base, target)
        analyze_batch(w0, [art.load_update(target, base, w0=w0)], AnalysisConfig(k_store=10, k_spec=10))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_each_case_raises_its_typed_error_naming_the_culprit(case: Case, hostile: dict[str, Path],
                                                            base_ckpt: Checkpoint) -> None:
    with pytest.raises(case.error) as info:
        attempt(hostile[case.name], base_ckpt, case.name)
    assert case.names in str(info.value), str(info.value)
    assert isinstance(info.value.context.get("file") or info.value.context.get("tensor"), str)
    assert not list(hostile[case.name].parent.glob("PWNED-*")), "a pickle was loaded"


def test_good_adapters_pass_the_same_checks(goods: list[Path], base_ckpt: Checkpoint) -> None:
    for path in goods:
        attempt(path, base_ckpt, path.name)


# --- one job with every case beside two good adapters ---------------------------------------
def errors_by_model(root: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for p in sorted((root / "errors").glob("*/*.parquet")):
        for row in pq.read_table(p).to_pylist():
            out.setdefault(row["model_id"], []).append(row)
    return out


def assert_every_case_is_an_error_row(root: Path, cases: list[Case], names: dict[str, str]) -> None:
    by_model = errors_by_model(root)
    for case in cases:
        rows = by_model.get(names[case.name], [])
        assert rows, f"{case.name}: no errors row"
        assert {r["error_type"] for r in rows} == {case.error.__name__}, (case.name, rows)
        assert {r["stage"] for r in rows} == {case.stage}, (case.name, rows)
        for r in rows:
            assert case.names in r["message"] + r["context_json"], (case.name, r["message"])


def assert_good_rows_complete(root: Path, reference: Path, good_ids: set[str]) -> None:
    for table in UNIT_TABLES:
        got, want = table_rows(root, table, models=good_ids), table_rows(reference, table, models=good_ids)
        assert len(got) == len(want) > 0, table
        for g, w in zip(got, want, strict=True):
            assert _close(g, w), (table, g, w)
    assert not any(m in good_ids for m in errors_by_model(root)), "a good adapter got an errors row"


def _close(a: tuple, b: tuple) -> bool:
    return all(x == pytest.approx(y, rel=1e-4, abs=1e-6) if isinstance(x, float) and isinstance(y, float)
               else x == y for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="session")
def reference_root(goods: list[Path], minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The good adapters alone, in-process."""
    out = tmp_path_factory.mktemp("reference") / "results"
    cfg = AnalysisConfig()
    plan = build_plan(local_ref(minilm_dir), [local_ref(goods[0], "good1"), local_ref(goods[1], "good2")], cfg,
                      batch_size=64)
    run_plan(plan, str(out), executor="local", device="cpu")
    return out


def test_one_local_job_turns_every_case_into_error_rows(goods: list[Path], hostile: dict[str, Path],
                                                        minilm_dir: Path, reference_root: Path,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    refs = [local_ref(goods[0], "good1"), *[local_ref(hostile[c.name], c.name) for c in CASES],
            local_ref(goods[1], "good2")]
    plan = build_plan(local_ref(minilm_dir), refs, AnalysisConfig(), batch_size=64)
    out = tmp_path / "results"
    summary = run_plan(plan, str(out), executor="local", device="cpu")
    assert summary.n_done == 6 and summary.n_failed == 0  # every unit committed its good members
    assert_every_case_is_an_error_row(out, CASES, {c.name: c.name for c in CASES})
    assert_good_rows_complete(out, reference_root, {"good1", "good2"})
    load_stage = {c.name for c in CASES if c.stage != "plan"}
    assert {m["model_id"] for m in plan.models} == {"good1", "good2"} | load_stage


def test_a_model_row_that_does_not_fit_the_schema_is_a_plan_error(goods: list[Path], minilm_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from zoospectra.adapters import PeftAdapter

    describe = PeftAdapter.describe
    monkeypatch.setattr(PeftAdapter, "describe", lambda self: dict(describe(self), r=2**40)
                        if self.model_id == "bad" else describe(self))
    plan = build_plan(local_ref(minilm_dir), [local_ref(goods[0], "bad"), local_ref(goods[1], "good2")],
                      AnalysisConfig())
    assert [m["model_id"] for m in plan.models] == ["good2"]
    (err,) = plan.errors
    assert err["model_id"] == "bad" and err["error_type"] == "AdapterConfigError" and "models table" in err["message"]


# --- the same through the real CLI on a local Ray, plus odd names and SQL payloads ------------
INJECT = "x'); COPY (SELECT 42) TO '{marker}'; --"


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zoospectra.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **ONE_THREAD, **(env or {})}, timeout=600)


@pytest.fixture(scope="session")
def cli_root(goods: list[Path], hostile: dict[str, Path], minilm_dir: Path,
             tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("cli")
    marker = tmp / "pwned-by-name.csv"
    odd_names = {"sql": INJECT.format(marker=marker), "traversal": "../../escaped-model"}
    out = tmp / "results"
    args = [f"good1={goods[0]}", *[f"{c.name}={hostile[c.name]}" for c in CASES], f"good2={goods[1]}",
            f"{odd_names['sql']}={goods[0]}", f"{odd_names['traversal']}={goods[1]}"]
    proc = cli("analyze", "--base", str(minilm_dir), *args, "--out", str(out), "--batch-size", "64")
    return {"out": out, "proc": proc, "marker": marker, "odd": odd_names, "tmp": tmp}


def test_cli_on_ray_turns_every_case_into_error_rows(cli_root: dict, reference_root: Path) -> None:
    proc, out = cli_root["proc"], cli_root["out"]
    assert proc.returncode == 3, proc.stderr  # 3: finished, with error rows
    assert_every_case_is_an_error_row(out, CASES, {c.name: c.name for c in CASES})
    assert_good_rows_complete(out, reference_root, {"good1", "good2"})
    for case in CASES:
        assert case.name in proc.stderr  # each failure is reported as it happens
    assert not list(cli_root["tmp"].parent.rglob("PWNED-*")), "a pickle was loaded"


def test_odd_model_names_are_data_not_paths_or_sql(cli_root: dict) -> None:
    out, odd = cli_root["out"], cli_root["odd"]
    con = duckdb.connect()
    names = {r[0] for r in con.execute("SELECT model_id FROM read_parquet(?)",
                                       [str(out / "models" / "*.parquet")]).fetchall()}
    assert set(odd.values()) <= names
    n = con.execute("SELECT count(*) FROM read_parquet(?) WHERE model_id = ?",
                    [str(out / "units" / "*" / "matrices.parquet"), odd["sql"]]).fetchone()[0]
    assert n == 6
    assert not cli_root["marker"].exists()
    every = [p.resolve() for p in out.rglob("*")]
    assert all(p.is_relative_to(out.resolve()) for p in every)
    assert not (out.parent.parent / "escaped-model").exists()


def invoke(*args: str) -> tuple[int, str]:
    """The CLI in-process (same typer app, same parsing): exit code as `zoospectra` would give it
    (2 for a typed error, as cli.main does) and the output."""
    from typer.testing import CliRunner

    from zoospectra.cli import app

    result = CliRunner().invoke(app, list(args))
    if isinstance(result.exception, E.ZoospectraError):
        return 2, f"{result.output}{result.exception}"
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.output


def test_sql_injection_through_cli_parameters_runs_nothing(cli_root: dict, tmp_path: Path) -> None:
    out = str(cli_root["out"])
    markers = [tmp_path / f"pwned-{i}.csv" for i in range(5)]
    payload = [INJECT.format(marker=m) for m in markers]
    count = ("sql", out, "SELECT count(*) AS n FROM matrices", "--format", "csv")
    code, before = invoke(*count)
    assert code == 0, before
    runs = [
        ("plot", out, "similarity", "-p", f"model_name={payload[0]}", "--out", str(tmp_path / "a.svg")),
        ("plot", out, "intruders-eps", "-p", f"k=1); COPY (SELECT 1) TO '{markers[1]}'; --",
         "--out", str(tmp_path / "b.svg")),
        ("report", out, "--out", str(tmp_path / "r1"), "--base-model", payload[2]),
        ("report", out, "--out", str(tmp_path / "r2"), "--kind", payload[3]),
        ("plot", out, "pairs", "-p", f"model_a={payload[4]}", "-p", f"model_b={payload[4]}",
         "--out", str(tmp_path / "c.svg")),
    ]
    for args in runs:  # a typed refusal (exit 2) or an empty study; never an untyped crash
        code, text = invoke(*args)
        assert code in (0, 2), text
    assert not any(m.exists() for m in markers)
    assert invoke(*count) == (0, before)


def test_quoted_results_root_is_not_sql(goods: list[Path], minilm_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned-root.csv"
    root = tmp_path / f"r'; COPY (SELECT 1) TO '{marker.name}'; --"
    code, text = invoke("analyze", "--base", str(minilm_dir), f"good1={goods[0]}", "--out", str(root), "--local",
                        "--k-store", "10", "--k-spec", "10")
    assert code == 0, text
    code, text = invoke("sql", str(root), "SELECT count(*) AS n FROM matrices", "--format", "csv")
    assert code == 0 and text.split()[-1] == "6", text
    assert not marker.exists() and not (Path.cwd() / marker.name).exists()


def test_markup_in_a_model_name_is_printed_not_interpreted(hostile: dict[str, Path], minilm_dir: Path,
                                                           tmp_path: Path) -> None:
    code, text = invoke("analyze", "--base", str(minilm_dir), f"[/]={hostile['truncated']}", "--out",
                        str(tmp_path / "r"),
                        "--local", "--k-store", "10", "--k-spec", "10")
    assert code == 3 and "[/]" in text and "[file=" in text, text


# --- odd repo ids ---------------------------------------------------------------------------
ODD_IDS = ["../evil", "a/b/c", "org/name with space", "", "/abs", "org/%2e%2e", "org/ok\nInjected: header",
           "org/..", "org/x--y", "org/" + "a" * 120]


@pytest.mark.parametrize("repo", ODD_IDS)
def test_odd_base_repo_ids_in_a_crawl_spec_are_config_errors(repo: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from zoospectra.jobs.spec import CrawlSpec

    with pytest.raises(HFValidationError):  # the Hub client itself refuses these ids ...
        validate_repo_id(repo)
    with pytest.raises(E.ConfigError):  # ... so the spec must, before anything is crawled
        CrawlSpec.from_dict({"name": "n", "base_models": [repo], "out": "/tmp/x"})


def test_a_hub_listing_odd_repo_ids_gives_error_rows(goods: list[Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from fixtures_hub import serving_hub

    from zoospectra.io.hub import HubOptions, discover

    base = "sentence-transformers/all-MiniLM-L6-v2"
    cfg = json.loads((goods[0] / CONFIG).read_text()) | {"base_model_name_or_path": base}
    files = {CONFIG: json.dumps(cfg).encode(), WEIGHTS: (goods[0] / WEIGHTS).read_bytes()}
    with serving_hub(monkeypatch, tmp_path) as hub:
        for repo in ["org/good", "org/..", "../evil", "org/a b"]:
            hub.add_repo(repo, files, base_model=base, relation="adapter")
        found = discover([base], options=HubOptions(endpoint=hub.url, cache_dir=str(tmp_path / "c"),
                                                     timeout=5, max_retries=0))
    assert [e.repo_id for e in found.entries] == ["org/good"]
    assert {r["model_id"] for r in found.errors} == {"org/..", "../evil", "org/a b"}
