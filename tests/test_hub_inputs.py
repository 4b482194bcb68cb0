"""Hub references as artifact arguments, and bases resolved from what each artifact names
(issue 14), with the real huggingface_hub client against the loopback Hub:

- `zoospectra analyze org/lora-a@SHA org/dora-b --out R` (no --base) gives the rows of a local
  analysis of the same files against the local base; rows carry the pinned shas.
- One call over artifacts of several bases plans each group against its own base (same rows as
  one analysis per base); an unknown base, a base that does not fit, an unreachable base and
  no base at all are each one `errors` row, and the rest is analysed.
- A Hub that lists files without sizes gives the same rows (sizes are asked for, not assumed 0).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from fixtures_hub import hub_env, safetensors_bytes, serving_hub
from hub_server import FakeHub
from rows import VOLATILE as _BOOKKEEPING
from rows import assert_rows_close
from rows import table_rows as shared_table_rows

import zoospectra
from zoospectra.demo.zoo import build_zoo, lora
from zoospectra.errors import ConfigError
from zoospectra.io.hub import HubOptions
from zoospectra.io.resolve import HubSpec, hub_spec, resolve_ref

BASE = "sentence-transformers/all-MiniLM-L6-v2"
TINY = "org/tiny-base"
VOLATILE = _BOOKKEEPING | {"model_uid", "base_uid"}
TABLES = ("matrices", "vectors", "spectra", "similarity")


# --- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real LoRA and a real DoRA on MiniLM (a few matrices each, a few steps)."""
    specs = [lora("in_lora", 4, 8, targets=("query", "value"), layers_to_transform=[0]),
             lora("in_dora", 2, 4, targets=("value",), layers_to_transform=[1], use_dora=True)]
    paths = build_zoo(tmp_path_factory.mktemp("inputs_zoo"), specs, steps=3)
    return {"lora": paths[0], "dora": paths[1]}


def naming(src: Path, dest: Path, base: str | None, *, revision: str | None = None,
           card: str | None = None) -> Path:
    """A copy of adapter `src` whose adapter_config.json names `base` (None: names none), with
    an optional model card whose front matter names `card`."""
    shutil.copytree(src, dest)
    config = json.loads((dest / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base
    config["revision"] = revision
    (dest / "adapter_config.json").write_text(json.dumps(config))
    if card is not None:
        (dest / "README.md").write_text(f"---\nbase_model: {card}\nlibrary_name: peft\n---\n# card\n")
    return dest


def files_of(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def publish_base(hub: FakeHub, minilm_dir: Path) -> str:
    return hub.add_repo(BASE, {n: (minilm_dir / n).read_bytes() for n in ("model.safetensors", "config.json")})


def table_rows(root: Path, table: str) -> list[tuple]:
    return shared_table_rows(root, table, volatile=VOLATILE)


def error_rows(root: Path) -> list[dict]:
    return [r for p in sorted((root / "errors").glob("*/*.parquet")) for r in pq.read_table(p).to_pylist()]


def models(root: Path) -> dict[str, dict]:
    return {r["model_id"]: r for r in pq.read_table(root / "models").to_pylist()}


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zoospectra.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def fast(hub: FakeHub) -> HubOptions:
    from huggingface_hub import constants

    return HubOptions(endpoint=hub.url, cache_dir=constants.HF_HUB_CACHE, timeout=5.0, max_retries=1,
                      backoff=0.01, backoff_max=0.02, retry_after_max=1.0)


# --- reference parsing ---------------------------------------------------------------------
def test_reference_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert hub_spec("org/name") == HubSpec("org/name")
    assert hub_spec("org/name@v1.0") == HubSpec("org/name", "v1.0")
    assert hub_spec("hf://org/name@0123abc") == HubSpec("org/name", "0123abc")
    assert hub_spec("a/b/c") is None and hub_spec("./org/name") is None and hub_spec("name") is None
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert hub_spec("org/name") is None            # an existing directory wins
    with pytest.raises(ConfigError, match="not a Hub reference"):
        hub_spec("hf://just-a-name")


# --- analyze with Hub references and no --base ---------------------------------------------
@pytest.mark.slow   # two CLI processes
def test_analyze_hub_refs_without_base_gives_the_rows_of_local_copies(
        fake_hub: FakeHub, sources: dict[str, Path], minilm_dir: Path, tmp_path: Path) -> None:
    base_sha = publish_base(fake_hub, minilm_dir)
    lora_a = naming(sources["lora"], tmp_path / "lora-a", BASE)
    dora_b = naming(sources["dora"], tmp_path / "dora-b", BASE)
    sha_a = fake_hub.add_repo("org/lora-a", files_of(lora_a), base_model=BASE, relation="adapter")
    # a later commit to lora-a: @SHA must still analyse the first one
    fake_hub.commit("org/lora-a", {"adapter_model.safetensors": (dora_b / "adapter_model.safetensors").read_bytes()})
    sha_b = fake_hub.add_repo("org/dora-b", files_of(dora_b), base_model=BASE, relation="adapter")

    out = tmp_path / "hub"
    proc = cli("analyze", f"org/lora-a@{sha_a}", "org/dora-b", "--out", str(out), "--local",
               env=hub_env(fake_hub))
    assert proc.returncode == 0, proc.stderr
    ref = tmp_path / "local"
    proc = cli("analyze", f"org/lora-a={lora_a}", f"org/dora-b={dora_b}", "--base", str(minilm_dir),
               "--base-name", BASE, "--out", str(ref), "--local")
    assert proc.returncode == 0, proc.stderr
    assert {r[0] for r in table_rows(out, "matrices")} == {"org/lora-a", "org/dora-b"}
    for table in TABLES:
        assert_rows_close(table_rows(out, table), table_rows(ref, table))
    rows = models(out)
    assert {m: (r["revision"], r["source"], r["base_id"], r["base_revision"]) for m, r in rows.items()} == {
        "org/lora-a": (sha_a, "hub", BASE, base_sha), "org/dora-b": (sha_b, "hub", BASE, base_sha)}
    assert error_rows(out) == []


def test_name_equals_ref_and_hf_uri(fake_hub: FakeHub, sources: dict[str, Path], tmp_path: Path) -> None:
    sha = fake_hub.add_repo("org/lora-a", files_of(naming(sources["lora"], tmp_path / "a", BASE)))
    ref = resolve_ref("hf://org/lora-a@main", "mine")
    assert (ref.model_id, ref.location, ref.revision, ref.source) == ("mine", "org/lora-a", sha, "hub")
    with pytest.raises(zoospectra.errors.HubNotFoundError, match="not a local directory"):
        resolve_ref("org/missing")


# --- one call, several bases, and every way a base can fail ---------------------------------
def _tiny_base_dir(path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(safetensors_bytes(
        {f"layers.{i}.{m}.weight": torch.randn(48, 32, generator=g) for i in range(2) for m in ("q_proj", "v_proj")}))
    (path / "config.json").write_text("{}")
    return path


def _tiny_adapter(path: Path, seed: int, base: str | None, card: str | None = None) -> Path:
    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    if base is not None:
        config["base_model_name_or_path"] = base
    (path / "adapter_config.json").write_text(json.dumps(config))
    (path / "adapter_model.safetensors").write_bytes(safetensors_bytes(
        {f"base_model.model.layers.0.{m}.lora_{ab}.weight": torch.randn(shape, generator=g)
         for m in ("q_proj", "v_proj") for ab, shape in (("A", (4, 32)), ("B", (48, 4)))}))
    if card is not None:
        (path / "README.md").write_text(f"---\nbase_model: {card}\n---\n")
    return path


def test_mixed_bases_are_grouped_and_bad_bases_are_error_rows(
        fake_hub: FakeHub, sources: dict[str, Path], minilm_dir: Path, tmp_path: Path) -> None:
    publish_base(fake_hub, minilm_dir)
    tiny_dir = _tiny_base_dir(tmp_path / "zoo" / "tiny-base")
    fake_hub.add_repo(TINY, files_of(tiny_dir))
    fake_hub.add_repo("org/down-base", files_of(tiny_dir))
    fake_hub.inject("org/down-base", status=503, times=-1)            # unreachable: every request 503
    fake_hub.add_repo("org/lora-a", files_of(naming(sources["lora"], tmp_path / "lora-a", BASE)))
    card_only = _tiny_adapter(tmp_path / "card-only", 5, None, card=TINY)
    fake_hub.add_repo("org/card-only", files_of(card_only))        # base named by the model card only
    good = {
        "org/lora-a": "org/lora-a",                                     # Hub adapter of the Hub MiniLM
        "local-dora": str(naming(sources["dora"], tmp_path / "local-dora", BASE)),  # local, Hub base
        "t-abs": str(_tiny_adapter(tmp_path / "zoo" / "t-abs", 1, str(tiny_dir))),   # local path
        "t-rel": str(_tiny_adapter(tmp_path / "zoo" / "t-rel", 2, "../tiny-base")),  # relative to it
        "card": "org/card-only",
    }
    bad = {
        "unknown": (str(_tiny_adapter(tmp_path / "unknown", 3, "nobody/no-such-base")), "HubNotFoundError"),
        "misfit": (str(_tiny_adapter(tmp_path / "misfit", 4, BASE)), "BaseMismatchError"),
        "down": (str(_tiny_adapter(tmp_path / "down", 6, "org/down-base")), "HubUnavailableError"),
        "nameless": (str(_tiny_adapter(tmp_path / "nameless", 7, None)), "BaseUnresolvedError"),
    }
    out = tmp_path / "mixed"
    plans: list = []
    run = zoospectra.analyze({**good, **{k: v for k, (v, _) in bad.items()}}, out=out, executor="local",
                             hub=fast(fake_hub), on_plan=plans.append)
    assert len(plans[0].bases) == 3 and run.n_plan_errors == 4 and run.n_failed == 0
    errors = {r["model_id"]: r for r in error_rows(out)}
    assert {m: r["error_type"] for m, r in errors.items()} == {m: t for m, (_, t) in bad.items()}
    assert "pass --base" in errors["nameless"]["message"] and "--base" in errors["down"]["message"]
    assert "no-such-base" in errors["unknown"]["message"]
    rows = models(out)
    assert {m: r["base_id"] for m, r in rows.items()} == {
        "org/lora-a": BASE, "local-dora": BASE, "t-abs": "tiny-base", "t-rel": "tiny-base", "card": TINY}

    # the reference: one analysis per base, the base given explicitly
    ref = tmp_path / "ref"
    zoospectra.analyze({k: good[k] for k in ("org/lora-a", "local-dora")}, base=BASE, out=ref, executor="local",
                       hub=fast(fake_hub))
    zoospectra.analyze({k: good[k] for k in ("t-abs", "t-rel")}, base=tiny_dir, out=ref, executor="local")
    zoospectra.analyze({"card": "org/card-only"}, base=TINY, out=ref, executor="local", hub=fast(fake_hub))
    for table in TABLES:
        assert_rows_close(table_rows(out, table), table_rows(ref, table))
    assert len({r[0] for r in table_rows(out, "matrices")}) == 5


# --- a listing without sizes --------------------------------------------------------------
def test_listing_without_sizes_gives_correct_results(
        monkeypatch: pytest.MonkeyPatch, sources: dict[str, Path], minilm_dir: Path, tmp_path: Path) -> None:
    with serving_hub(monkeypatch, tmp_path / "sizes") as hub:
        hub.sizes = False
        publish_base(hub, minilm_dir)
        hub.add_repo("org/lora-a", files_of(naming(sources["lora"], tmp_path / "lora-a", BASE)))
        out = tmp_path / "nosizes"
        run = zoospectra.analyze(["org/lora-a"], out=out, executor="local", hub=fast(hub))
        heads = hub.requests(BASE, "model.safetensors", "HEAD")
    assert run.n_plan_errors == run.n_member_errors == run.n_failed == 0 and run.n_done > 0
    assert heads, "the base's size was asked for with a HEAD request"
    ref = tmp_path / "ref"
    zoospectra.analyze({"org/lora-a": tmp_path / "lora-a"}, base=minilm_dir, base_name=BASE, out=ref,
                       executor="local")
    for table in TABLES:
        assert_rows_close(table_rows(out, table), table_rows(ref, table))


# --- mitigate from the Hub ------------------------------------------------------------------
def test_mitigate_a_hub_adapter_against_the_hub_base_it_names(
        fake_hub: FakeHub, sources: dict[str, Path], minilm_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from zoospectra.mitigate import MitigationParams, mitigate_adapter

    publish_base(fake_hub, minilm_dir)
    local = naming(sources["lora"], tmp_path / "lora-a", BASE)
    weights = load_file(str(local / "adapter_model.safetensors"))   # a large update: intruders
    save_file({k: v * 30 if ".lora_B." in k else v for k, v in weights.items()},
              str(local / "adapter_model.safetensors"))
    sha = fake_hub.add_repo("org/lora-a", files_of(local))
    params = MitigationParams(lam=0.5, eps=0.9)
    hub_run = mitigate_adapter(f"org/lora-a@{sha}", tmp_path / "from-hub", params)
    ref_run = mitigate_adapter(local, tmp_path / "from-disk", params, base=minilm_dir)
    assert hub_run.base == f"{BASE}@{fake_hub.state.repos[BASE].head.sha}"
    assert [(m.module, m.intruders) for m in hub_run.matrices] == \
        [(m.module, m.intruders) for m in ref_run.matrices]
    assert hub_run.n_intruders > 0
    got, want = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("from-hub", "from-disk"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    # the base was read by byte ranges, never whole
    assert all(r.range for r in fake_hub.requests(BASE, "model.safetensors", "GET"))
