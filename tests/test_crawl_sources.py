"""Crawls that start from an author, a search term or a list of repos (issue 14): each finds
exactly the expected repos on the loopback Hub, and each repo is analysed against the base its
adapter config (or model card) names, as `analyze --base` of the same files would."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from fixtures_hub import hub_env, safetensors_bytes
from hub_server import FakeHub
from rows import VOLATILE, assert_rows_close
from rows import table_rows as shared_table_rows

import zoospectra
from zoospectra.errors import ConfigError
from zoospectra.io.hub import HubOptions
from zoospectra.jobs.spec import CrawlSpec, read_repos

TINY = "org/tiny-base"
OTHER = "org/other-base"            # a second base: one crawl plans over both
TABLES = ("matrices", "vectors", "spectra", "similarity")


def _base(seed: int, cols: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.{m}.weight": torch.randn(48, cols, generator=g)
            for i in range(2) for m in ("q_proj", "v_proj")}


def _adapter(seed: int, base: str | None, cols: int = 32, card: str | None = None) -> dict[str, bytes]:
    g = torch.Generator().manual_seed(seed)
    config: dict = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    if base:
        config["base_model_name_or_path"] = base
    files = {"adapter_config.json": json.dumps(config).encode(),
             "adapter_model.safetensors": safetensors_bytes(
                 {f"base_model.model.layers.0.{m}.lora_{ab}.weight": torch.randn(shape, generator=g)
                  for m in ("q_proj", "v_proj") for ab, shape in (("A", (4, cols)), ("B", (48, 4)))})}
    if card:
        files["README.md"] = f"---\nbase_model: {card}\nlibrary_name: peft\n---\n".encode()
    return files


@pytest.fixture
def zoo(fake_hub: FakeHub) -> FakeHub:
    """Two bases; adapters by alice, bob and carol; a full fine-tune; a repo that is neither."""
    fake_hub.add_repo(TINY, {"model.safetensors": safetensors_bytes(_base(0)), "config.json": b"{}"})
    fake_hub.add_repo(OTHER, {"model.safetensors": safetensors_bytes(_base(1, 24)), "config.json": b"{}"})
    fake_hub.add_repo("alice/tiny-lora-0", _adapter(10, TINY), base_model=TINY, relation="adapter")
    fake_hub.add_repo("alice/other-lora-1", _adapter(11, OTHER, cols=24), base_model=OTHER, relation="adapter")
    fake_hub.add_repo("alice/card-lora", _adapter(12, None, card=TINY), base_model=TINY, relation="adapter")
    full = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(3)) for k, v in _base(0).items()}
    fake_hub.add_repo("alice/tiny-full", {"model.safetensors": safetensors_bytes(full), "config.json": b"{}"},
                      base_model=TINY, relation="finetune")
    fake_hub.add_repo("alice/notes", {"README.md": b"# not a model"})
    fake_hub.add_repo("bob/tiny-lora-2", _adapter(13, TINY), base_model=TINY, relation="adapter")
    fake_hub.add_repo("carol/special-dora", _adapter(14, TINY), base_model=TINY, relation="adapter")
    return fake_hub


def options(hub: FakeHub) -> HubOptions:
    from huggingface_hub import constants

    return HubOptions(endpoint=hub.url, cache_dir=constants.HF_HUB_CACHE, timeout=5.0, max_retries=1,
                      backoff=0.01, backoff_max=0.02)


def crawl(out: Path, hub: FakeHub, executor: str = "local", **sources: object):
    spec = {"name": "t", "out": str(out), **sources}
    (report,) = zoospectra.crawl(spec, options=options(hub), executor=executor).bases
    return report


@pytest.fixture
def local_ray() -> Iterator[None]:
    """A local Ray whose workers may reach the loopback Hub (conftest sets HF_HUB_OFFLINE=1)."""
    import logging

    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}})
    try:
        yield
    finally:
        ray.shutdown()


def catalog(out: Path, run_id: str) -> set[str]:
    return {r["repo_id"] for r in pq.read_table(out / "catalog" / f"{run_id}.parquet").to_pylist()}


def analysed(out: Path) -> dict[str, str]:
    """model_id -> base_id of every analysed model."""
    return {r["model_id"]: r["base_id"] for r in pq.read_table(out / "models").to_pylist()}


@pytest.mark.slow   # a local Ray start
def test_author_finds_exactly_its_adapters_each_against_its_base(zoo: FakeHub, local_ray: None,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "r"
    report = crawl(out, zoo, executor="ray", author="alice")      # one Ray run over two bases
    assert (report.discovered, report.discovery_errors, report.error_rows) == (3, 0, 0)
    assert catalog(out, report.run_id) == {"alice/tiny-lora-0", "alice/other-lora-1", "alice/card-lora"}
    assert analysed(out) == {"alice/tiny-lora-0": TINY, "alice/other-lora-1": OTHER, "alice/card-lora": TINY}
    # the same rows as one analysis per base, the base given
    ref = tmp_path / "ref"
    hub = options(zoo)
    zoospectra.analyze(["alice/tiny-lora-0", "alice/card-lora"], base=TINY, out=ref, executor="local", hub=hub)
    zoospectra.analyze(["alice/other-lora-1"], base=OTHER, out=ref, executor="local", hub=hub)
    cols = VOLATILE | {"model_uid", "base_uid"}
    for table in TABLES:
        assert_rows_close(shared_table_rows(out, table, volatile=cols), shared_table_rows(ref, table, volatile=cols))

    full = crawl(tmp_path / "full", zoo, author=["alice"], include_full=True)
    assert catalog(tmp_path / "full", full.run_id) == {"alice/tiny-lora-0", "alice/other-lora-1",
                                                       "alice/card-lora", "alice/tiny-full"}
    assert analysed(tmp_path / "full")["alice/tiny-full"] == TINY


def test_search_finds_exactly_the_matching_repos(zoo: FakeHub, tmp_path: Path) -> None:
    report = crawl(tmp_path / "r", zoo, search="special")
    assert catalog(tmp_path / "r", report.run_id) == {"carol/special-dora"}
    report = crawl(tmp_path / "r2", zoo, search=["tiny-lora"], limit=1)    # --limit caps each listing
    assert report.discovered == 1


def test_repos_file_finds_exactly_the_listed_repos(zoo: FakeHub, tmp_path: Path) -> None:
    old = zoo.state.repos["bob/tiny-lora-2"].head.sha
    zoo.commit("bob/tiny-lora-2", _adapter(99, TINY))                 # @old must pin the old commit
    listing = tmp_path / "repos.txt"
    listing.write_text(f"# adapters we care about\nalice/card-lora\n\nbob/tiny-lora-2@{old}   # pinned\n"
                       "alice/notes\n")
    assert read_repos(listing) == ("alice/card-lora", f"bob/tiny-lora-2@{old}", "alice/notes")
    out = tmp_path / "r"
    proc = subprocess.run([sys.executable, "-m", "zoospectra.cli", "crawl", "--repos", str(listing), "--out",
                           str(out), "--local"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **hub_env(zoo)})
    assert proc.returncode == 3, proc.stderr                           # alice/notes: an errors row
    (report,) = json.loads(proc.stdout)["bases"]
    assert catalog(out, report["run_id"]) == {"alice/card-lora", "bob/tiny-lora-2"}
    models = pq.read_table(out / "models").to_pylist()
    assert {(m["model_id"], m["revision"]) for m in models} == {
        ("alice/card-lora", zoo.state.repos["alice/card-lora"].head.sha), ("bob/tiny-lora-2", old)}
    (row,) = [r for p in (out / "errors").glob("*/*.parquet") for r in pq.read_table(p).to_pylist()]
    assert row["model_id"] == "alice/notes" and "neither a PEFT adapter" in row["message"]


def test_source_specs_are_validated(tmp_path: Path) -> None:
    base = {"name": "x", "out": "r"}
    assert CrawlSpec.from_dict({**base, "author": "alice"}).author == ("alice",)
    listing = tmp_path / "list.txt"
    listing.write_text("org/a@v1\n# c\n")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("name: x\nout: r\nrepos: list.txt\n")               # relative to the spec
    assert CrawlSpec.load(spec_file).repos == ("org/a@v1",)
    for bad, match in [({}, "base_models is empty"), ({"repos": ["not a ref!"]}, "repo id"),
                       ({"author": ["a/b"]}, "author"), ({"repos": str(tmp_path / "missing.txt")}, "does not exist")]:
        with pytest.raises(ConfigError, match=match):
            CrawlSpec.from_dict({**base, **bad})


def test_a_base_model_pinned_to_a_revision(zoo: FakeHub, tmp_path: Path) -> None:
    old = zoo.state.repos[TINY].head.sha
    zoo.commit(TINY, {"config.json": b'{"changed": true}'})             # main moves on
    report = crawl(tmp_path / "r", zoo, base_models=[f"{TINY}@{old}"])
    assert report.base_sha == old and report.units_done > 0
    bases = {r["base_revision"] for r in pq.read_table(tmp_path / "r" / "models").to_pylist()}
    assert bases == {old}
