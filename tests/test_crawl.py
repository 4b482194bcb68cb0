"""Hub crawls end to end: discovery + plan + Ray execution against the loopback Hub.

- 52 adapter repos (real PEFT LoRAs trained on the shipped MiniLM, re-published with per-repo
  changes) crawled with `zoospectra crawl` give the same rows as `zoospectra analyze` of the same
  files, and the base is read only for the matrices the adapters touch (counted at the server).
- A second crawl with no Hub change analyses nothing; a new commit to one repo re-analyses it alone.
- Every failure mode (gated/private, 404, 429 + Retry-After, 5xx, timeouts) ends as `errors`
  rows in a completed crawl, with the Hub options shipped to the Ray workers that hit them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
import torch
from fixtures_hub import hub_env, safetensors_bytes
from hub_server import LISTING, FakeHub
from rows import VOLATILE as _BOOKKEEPING
from rows import assert_rows_close
from rows import table_rows as shared_table_rows

from zoospectra.demo.zoo import build_zoo, lora
from zoospectra.io.checkpoint import Checkpoint
from zoospectra.io.hub import HubOptions
from zoospectra.io.refs import ModelRef, local_ref
from zoospectra.jobs.spec import CrawlSpec
from zoospectra.run.crawl import BaseCrawl, run_crawl
from zoospectra.run.store import ResultsStore

BASE = "sentence-transformers/all-MiniLM-L6-v2"
N_REPOS = 52
BATCH = 64                       # >= N_REPOS: one unit per base matrix, W0 read once
# Columns that legitimately differ between a crawl and a local analysis of the same files:
# bookkeeping, and the uids (they hash the source: hub repo@sha vs local name@content hash).
VOLATILE = _BOOKKEEPING | {"model_uid", "base_uid"}
TABLES = ("matrices", "vectors", "spectra", "similarity")
# Ray runs each task with one BLAS thread; the in-process reference does the same, so both take
# the same LAPACK path (near-degenerate tail vectors of Wt are not stable across thread counts).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# --- fixtures: a real adapter zoo published as 52 Hub repos -------------------------------
@pytest.fixture(scope="session")
def lora_sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three real LoRAs on MiniLM touching 4 base matrices (layers 0-1, query/value) in all."""
    targets = ("query", "value")
    specs = [lora("crawl_r2_l0", 2, 4, targets=targets, layers_to_transform=[0]),
             lora("crawl_r4_l1", 4, 8, targets=targets, layers_to_transform=[1]),
             lora("crawl_r8_v", 8, 16, targets=("value",), layers_to_transform=[0, 1])]
    return build_zoo(tmp_path_factory.mktemp("crawl_zoo"), specs, steps=3)


def _variant(src: Path, dest: Path, i: int, scale: float = 1.0) -> Path:
    """A copy of adapter `src` with lora_B changed deterministically by `i`, naming BASE."""
    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True, exist_ok=True)
    weights = load_file(str(src / "adapter_model.safetensors"))
    g = torch.Generator().manual_seed(i)
    for key, value in weights.items():
        if ".lora_B." in key:
            noise = torch.randn(value.shape, generator=g) * value.std()
            weights[key] = (value * (1 + 0.05 * i) + 0.2 * noise) * scale
    save_file(weights, str(dest / "adapter_model.safetensors"))
    config = json.loads((src / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = BASE
    (dest / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return dest


def _repo_files(path: Path) -> dict[str, bytes]:
    return {name: (path / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}


@pytest.fixture(scope="module")
def hub_zoo(module_hub: FakeHub, lora_sources: list[Path], minilm_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The MiniLM base and 52 adapter repos on the loopback Hub: repo id -> the local copy."""
    module_hub.add_repo(BASE, {n: (minilm_dir / n).read_bytes() for n in ("model.safetensors", "config.json")})
    root = tmp_path_factory.mktemp("variants")
    repos = {}
    for i in range(N_REPOS):
        repo = f"user{i % 4}/minilm-lora-{i:02d}"
        local = _variant(lora_sources[i % len(lora_sources)], root / f"v{i:02d}", i)
        module_hub.add_repo(repo, _repo_files(local), base_model=BASE, relation="adapter")
        repos[repo] = local
    return repos


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zoospectra.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


@pytest.fixture(scope="module")
def first_crawl(module_hub: FakeHub, hub_zoo: dict[str, Path],
                tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`zoospectra crawl` in a subprocess (its own local Ray) against the loopback Hub."""
    out = tmp_path_factory.mktemp("crawl") / "results"
    module_hub.reset_counters()
    t0 = time.perf_counter()
    proc = cli("crawl", "--base-model", BASE, "--out", str(out), "--batch-size", str(BATCH),
               "--name", "test-crawl", env=hub_env(module_hub))
    assert proc.returncode == 0, proc.stderr
    print(f"\ncrawl of {len(hub_zoo)} repos: {time.perf_counter() - t0:.1f}s")
    return {"out": out, "summary": json.loads(proc.stdout),
            "base_bytes": module_hub.bytes_served(BASE, "model.safetensors"),
            "base_gets": module_hub.requests(BASE, "model.safetensors", "GET")}


@pytest.fixture(scope="module")
def local_reference(minilm_dir: Path, hub_zoo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`zoospectra analyze` of the same files, each named by its repo id (in-process executor:
    the Ray path is the crawl's)."""
    out = tmp_path_factory.mktemp("local") / "results"
    proc = cli("analyze", "--base", str(minilm_dir), *[f"{repo}={path}" for repo, path in hub_zoo.items()],
               "--out", str(out), "--base-name", BASE, "--batch-size", str(BATCH), "--local",
               env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One in-process local Ray for the module. Workers get HF_HUB_OFFLINE=0 (conftest sets 1
    for the test process); endpoint and cache reach them inside the refs' HubOptions."""
    import logging

    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                                       "TOKENIZERS_PARALLELISM": "false"}})
    try:
        yield
    finally:
        ray.shutdown()


# --- helpers ----------------------------------------------------------------------------
def table_rows(root: Path, table: str, run_id: str | None = None) -> list[tuple]:
    """rows.table_rows without the uids: hub refs and local refs of one adapter differ only there."""
    return shared_table_rows(root, table, run_id=run_id, volatile=VOLATILE)


def error_rows(root: Path) -> list[dict]:
    return [r for p in sorted((root / "errors").glob("*/*.parquet")) for r in pq.read_table(p).to_pylist()]


def n_units(root: Path) -> int:
    return ResultsStore(root).status()["units_done"]


def options_for(hub: FakeHub, base: HubOptions | None = None, **changes: object) -> HubOptions:
    """Explicit endpoint and cache: they ride on the refs to Ray workers, which have neither."""
    from dataclasses import replace

    from huggingface_hub import constants

    return replace(base or HubOptions(), endpoint=hub.url, cache_dir=constants.HF_HUB_CACHE, **changes)


def crawl(out: Path, base: str, options: HubOptions, **spec: object) -> BaseCrawl:
    crawl_spec = CrawlSpec.from_dict({"name": "t", "base_models": [base], "out": str(out), **spec})
    (report,) = run_crawl(crawl_spec, options=options, executor="ray").bases
    return report


# --- 52 repos: same rows as a local analysis, base bytes, incremental crawls --------------
def test_crawl_cli_gives_the_rows_of_a_local_analysis(first_crawl: dict, local_reference: Path,
                                                      module_hub: FakeHub) -> None:
    (report,) = first_crawl["summary"]["bases"]
    assert report["discovered"] == N_REPOS and report["discovery_errors"] == 0
    assert report["base_sha"] == module_hub.state.repos[BASE].head.sha
    assert (report["units"], report["units_done"], report["units_failed"], report["error_rows"]) == (4, 4, 0, 0)
    out = first_crawl["out"]
    matrices = table_rows(out, "matrices")
    assert len(matrices) == 104                     # 18 x 2 + 17 x 2 (query+value) + 17 x 2 (value)
    assert len({r[0] for r in matrices}) == N_REPOS
    for table in TABLES:
        assert_rows_close(table_rows(out, table), table_rows(local_reference, table))
    models = duckdb.read_parquet(str(out / "models" / "*.parquet")).select(
        "model_id, revision, source, base_revision").fetchall()
    heads = {r: repo.head.sha for r, repo in module_hub.state.repos.items()}
    assert sorted(models) == sorted((m, heads[m], "hub", heads[BASE]) for m in heads if m != BASE)
    catalog = pq.read_table(next((out / "catalog").glob("*.parquet"))).to_pylist()
    assert sorted((c["repo_id"], c["sha"]) for c in catalog) == sorted((m, heads[m]) for m in heads if m != BASE)


def test_crawl_reads_the_base_only_for_touched_matrices(first_crawl: dict, minilm_dir: Path) -> None:
    base = Checkpoint.open(minilm_dir)
    touched_keys = {r[1] for r in table_rows(first_crawl["out"], "matrices")}
    assert len(touched_keys) == 4
    touched = sum(base.info(k).nbytes for k in touched_keys)
    header = base.header("model.safetensors").header_bytes
    served = first_crawl["base_bytes"]
    # Each touched matrix exactly once, plus whole headers (planner + one per Ray worker process).
    extra = served - touched
    assert extra > 0 and extra % header == 0 and extra // header <= 4, (served, touched, header)
    assert served <= 1.1 * touched, f"served {served} bytes for {touched} touched ({served / touched:.3f}x)"
    assert all(r.range for r in first_crawl["base_gets"])        # ranged reads, never the whole file
    print(f"\nbase bytes served {served} / touched {touched} = {served / touched:.4f} "
          f"(header {header} B, read {extra // header}x)")


def test_unchanged_hub_analyses_nothing_and_a_new_commit_only_its_repo(
        first_crawl: dict, module_hub: FakeHub, hub_zoo: dict[str, Path], minilm_dir: Path,
        local_ray: None, tmp_path: Path) -> None:
    out = first_crawl["out"]
    before = n_units(out)
    opts = options_for(module_hub)

    module_hub.reset_counters()
    again = crawl(out, BASE, opts, batch_size=BATCH)
    assert (again.discovered, again.units, again.units_done, again.error_rows) == (N_REPOS, 0, 0, 0)
    assert n_units(out) == before
    assert module_hub.bytes_served(BASE) == 0 and not module_hub.requests(BASE)  # nothing new: no base
    assert not any(module_hub.requests(r) for r in hub_zoo)                  # adapters: nothing asked

    repo = "user1/minilm-lora-05"                                            # touches 2 matrices
    new_dir = _variant(hub_zoo[repo], tmp_path / "v05-new", 99, scale=3.0)
    new_sha = module_hub.commit(repo, _repo_files(new_dir))
    third = crawl(out, BASE, opts, batch_size=BATCH)
    assert (third.discovered, third.units, third.units_done, third.error_rows) == (N_REPOS, 2, 2, 0)
    assert n_units(out) == before + 2
    new_uid = ModelRef(model_id=repo, revision=new_sha, location=repo, source="hub").uid
    rows = duckdb.read_parquet(str(out / "units" / "*" / "matrices.parquet")).filter(
        f"run_id = '{third.run_id}'").select("model_uid, model_id").fetchall()
    assert rows == [(new_uid, repo)] * 2
    # The new commit's rows are those of a local analysis of its files.
    ref_out = tmp_path / "ref"
    _analyse_locally(local_ref(minilm_dir, BASE), [local_ref(new_dir, repo)], ref_out)
    for table in TABLES:
        assert_rows_close(table_rows(out, table, run_id=third.run_id), table_rows(ref_out, table))


def test_no_change_crawl_downloads_nothing_even_with_an_empty_hf_cache(
        first_crawl: dict, module_hub: FakeHub, hub_zoo: dict[str, Path], tmp_path: Path) -> None:
    """The catalog of the results root is read first: an analysed (repo, sha) costs its entry in
    the listing and nothing else, whether the HF cache holds its files or not."""
    from dataclasses import replace

    out = first_crawl["out"]
    before = n_units(out)
    pages = -(-N_REPOS // module_hub.page_size)
    for cache in ("cold", "warm"):
        opts = options_for(module_hub)
        if cache == "cold":  # a fresh pod: an empty HF cache
            opts = replace(opts, cache_dir=str(tmp_path / "empty-hf-cache"))
        module_hub.reset_counters()
        report = crawl(out, BASE, opts, batch_size=BATCH)
        assert (report.discovered, report.units, report.error_rows) == (N_REPOS, 0, 0)
        log = module_hub.requests()
        assert not any(module_hub.requests(r) for r in hub_zoo)      # no adapter config, no weights
        assert [r.repo_id for r in log] == [LISTING] * pages          # one request per listing page
        assert sum(module_hub.state.served.values()) == 0             # no file body at all
        print(f"\nno-change crawl of {N_REPOS} repos, {cache} HF cache: {len(log)} requests "
              f"({pages} listing pages), {module_hub.state.sent} bytes received, 0 file bytes")
    assert n_units(out) == before
    assert not any(p.is_file() for p in (tmp_path / "empty-hf-cache").rglob("*"))   # nothing cached


def _analyse_locally(base: ModelRef, refs: list[ModelRef], out: Path) -> None:
    """The analyze command's path, in-process and single-threaded like a Ray task."""
    from zoospectra.config import AnalysisConfig
    from zoospectra.run.execute import run_plan
    from zoospectra.run.plan import build_plan

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plan = build_plan(base, refs, AnalysisConfig(), batch_size=BATCH)
        assert run_plan(plan, str(out), executor="local").n_done == len(plan.units)
    finally:
        torch.set_num_threads(threads)


# --- failure modes: each an errors row, and the crawl completes ---------------------------
TINY = "org/tiny-base"


def _tiny_base() -> bytes:
    g = torch.Generator().manual_seed(0)
    return safetensors_bytes({f"layers.{i}.{m}.weight": torch.randn(48, 32, generator=g)
                              for i in range(2) for m in ("q_proj", "v_proj", "mlp")})


def _tiny_adapter(seed: int) -> dict[str, bytes]:
    g = torch.Generator().manual_seed(seed)
    config = {"peft_type": "LORA", "base_model_name_or_path": TINY, "r": 4, "lora_alpha": 8,
              "target_modules": ["q_proj", "v_proj"]}
    weights = {f"base_model.model.layers.0.{m}.lora_{ab}.weight": torch.randn(shape, generator=g)
               for m in ("q_proj", "v_proj") for ab, shape in (("A", (4, 32)), ("B", (48, 4)))}
    return {"adapter_config.json": json.dumps(config).encode(),
            "adapter_model.safetensors": safetensors_bytes(weights)}


def _tiny_zoo(hub: FakeHub, *faulty: str, **base_kwargs: object) -> int:
    """TINY plus u/good-0, u/good-1 and the `faulty` adapter repos; returns where TINY's data starts."""
    blob = _tiny_base()
    hub.add_repo(TINY, {"model.safetensors": blob, "config.json": b"{}"}, **base_kwargs)
    for i, repo in enumerate(("u/good-0", "u/good-1", *faulty)):
        hub.add_repo(repo, _tiny_adapter(i), base_model=TINY, relation="adapter",
                     gated="manual" if repo == "u/gated" else False)
    return 8 + int.from_bytes(blob[:8], "little")


def _analysed(out: Path) -> set[str]:
    return {r[0] for r in table_rows(out, "matrices")}


def _status(out: Path, report: BaseCrawl) -> str:
    return json.loads((out / "runs" / f"{report.run_id}.json").read_text())["status"]


def test_gated_adapter_without_access_is_an_error_row(fake_hub: FakeHub, hub_options: HubOptions,
                                                      local_ray: None, tmp_path: Path) -> None:
    _tiny_zoo(fake_hub, "u/gated")
    out = tmp_path / "results"
    report = crawl(out, TINY, options_for(fake_hub, hub_options))
    assert (report.discovered, report.discovery_errors, report.units_done) == (2, 1, 2)
    (row,) = error_rows(out)
    assert (row["model_id"], row["error_type"], row["stage"]) == ("u/gated", "HubAccessError", "hub")
    assert "gated" in row["message"] and "request access" in row["message"]
    assert _analysed(out) == {"u/good-0", "u/good-1"} and _status(out, report) == "finished"


@pytest.mark.parametrize("access", ["private", "gated"])
def test_base_without_access_is_an_error_row(access: str, fake_hub: FakeHub, hub_options: HubOptions,
                                             local_ray: None, tmp_path: Path) -> None:
    _tiny_zoo(fake_hub, **({"private": True} if access == "private" else {"gated": "manual"}))
    out = tmp_path / "results"
    report = crawl(out, TINY, options_for(fake_hub, hub_options))
    assert report.discovered == 2 and report.units == 0 and report.error_rows == 1
    # private: the repo is hidden (401 RepoNotFound) at pin; gated: metadata is public, the
    # weights are not (401 GatedRepo) when the planner reads the header.
    assert (report.base_sha is None) == (access == "private")
    (row,) = error_rows(out)
    assert (row["model_id"], row["error_type"], row["stage"]) == (TINY, "HubAccessError", "plan")
    assert access in row["message"]
    assert _status(out, report) == "failed" and _analysed(out) == set()
    assert len(pq.read_table(out / "catalog" / f"{report.run_id}.parquet")) == 2


def test_404_adapter_weights_are_an_error_row(fake_hub: FakeHub, hub_options: HubOptions,
                                              local_ray: None, tmp_path: Path) -> None:
    _tiny_zoo(fake_hub, "u/vanished")
    fake_hub.inject("u/vanished", "adapter_model.safetensors", status=404, times=-1)
    out = tmp_path / "results"
    report = crawl(out, TINY, options_for(fake_hub, hub_options))
    assert (report.discovered, report.units_done, report.error_rows) == (3, 2, 1)
    (row,) = error_rows(out)
    assert (row["model_id"], row["error_type"], row["stage"]) == ("u/vanished", "HubNotFoundError", "plan")
    assert json.loads(row["context_json"])["file"] == "adapter_model.safetensors"
    assert _analysed(out) == {"u/good-0", "u/good-1"} and _status(out, report) == "finished"


def test_429_honours_retry_after_then_gives_up_as_an_error_row(
        fake_hub: FakeHub, hub_options: HubOptions, local_ray: None, tmp_path: Path) -> None:
    data_start = _tiny_zoo(fake_hub, "u/throttled")
    fake_hub.inject(TINY, "model.safetensors", status=429, retry_after=1, times=1, methods=("GET",),
                    data_from=data_start)                                    # a worker's W0 read, once
    fake_hub.inject("u/throttled", "adapter_model.safetensors", status=429, retry_after=1, times=-1)
    out = tmp_path / "results"
    report = crawl(out, TINY, options_for(fake_hub, hub_options, max_retries=1))
    assert (report.discovered, report.units_done, report.units_failed, report.error_rows) == (3, 2, 0, 1)
    (row,) = error_rows(out)
    assert (row["model_id"], row["error_type"]) == ("u/throttled", "HubUnavailableError")
    assert "after 2 tries" in row["message"] and "429" in row["message"]
    throttled = [r for r in fake_hub.requests("u/throttled", "adapter_model.safetensors") if r.host == "hub"]
    assert len(throttled) == 2 and throttled[1].at - throttled[0].at >= 0.9  # waited Retry-After
    gets = [r for r in fake_hub.requests(TINY, "model.safetensors", "GET") if r.host == "hub"]
    (limited,) = [r for r in gets if r.status == 429]
    retried = [r for r in gets if r.range == limited.range and r.at > limited.at]
    assert retried[0].status == 302 and retried[0].at - limited.at >= 0.9   # the worker waited
    assert _analysed(out) == {"u/good-0", "u/good-1"} and _status(out, report) == "finished"


def test_5xx_in_workers_become_error_rows_and_a_rerun_recovers(
        fake_hub: FakeHub, hub_options: HubOptions, local_ray: None, tmp_path: Path) -> None:
    data_start = _tiny_zoo(fake_hub)
    fake_hub.inject(TINY, "model.safetensors", status=503, times=-1, data_from=data_start)
    out = tmp_path / "results"
    report = crawl(out, TINY, options_for(fake_hub, hub_options))
    assert (report.units, report.units_done, report.units_failed, report.error_rows) == (2, 0, 2, 4)
    rows = error_rows(out)
    assert {(r["stage"], r["error_type"]) for r in rows} == {("load", "HubUnavailableError")}
    assert sorted((r["model_id"], r["tensor"]) for r in rows) == sorted(
        (m, f"layers.0.{p}.weight") for m in ("u/good-0", "u/good-1") for p in ("q_proj", "v_proj"))
    assert all("503" in r["message"] and "tries" in r["message"] for r in rows)
    assert _status(out, report) == "finished" and ResultsStore(out).status()["open_errors"] == 4

    fake_hub.clear_faults()                                  # the Hub is back: the rerun finishes
    rerun = crawl(out, TINY, options_for(fake_hub, hub_options))
    assert (rerun.units, rerun.units_done, rerun.error_rows) == (2, 2, 0)
    assert _analysed(out) == {"u/good-0", "u/good-1"} and ResultsStore(out).status()["open_errors"] == 0


def test_timeouts_become_error_rows_in_discovery_and_in_workers(
        fake_hub: FakeHub, hub_options: HubOptions, local_ray: None, tmp_path: Path) -> None:
    data_start = _tiny_zoo(fake_hub, "u/slow")
    fake_hub.inject("u/slow", "adapter_config.json", delay=1.5, times=-1)
    fake_hub.inject(TINY, "model.safetensors", delay=1.5, times=-1, data_from=data_start)
    out = tmp_path / "results"
    # A 30 s default timeout would make this test hang: the short one reached the workers.
    report = crawl(out, TINY, options_for(fake_hub, hub_options, timeout=0.3, max_retries=1))
    assert (report.discovered, report.discovery_errors, report.units_failed) == (2, 1, 2)
    rows = error_rows(out)
    assert {(r["model_id"], r["stage"], r["error_type"]) for r in rows} == {
        ("u/slow", "hub", "HubUnavailableError"), ("u/good-0", "load", "HubUnavailableError"),
        ("u/good-1", "load", "HubUnavailableError")}
    assert len(rows) == 5 and all("Timeout" in r["message"] for r in rows)
    assert _status(out, report) == "finished" and _analysed(out) == set()


# --- the job spec's hub section -----------------------------------------------------------
def test_spec_hub_section_is_validated_into_hub_options() -> None:
    from zoospectra.errors import ConfigError

    base = {"name": "x", "base_models": ["org/b"], "out": "r"}
    spec = CrawlSpec.from_dict({**base, "hub": {"timeout": 5, "max_retries": 0, "endpoint": "http://mirror:8080"}})
    assert spec.hub == HubOptions(timeout=5.0, max_retries=0, endpoint="http://mirror:8080")
    assert CrawlSpec.from_dict(base).hub == HubOptions()
    for bad, match in [({"token": "hf_x"}, "unknown hub option"), ({"timeout": 0}, "positive"),
                       ({"max_retries": -1}, "max_retries"), ({"backoff": True}, "positive"),
                       ({"endpoint": "mirror"}, "http"), ([1], "mapping")]:
        with pytest.raises(ConfigError, match=match):
            CrawlSpec.from_dict({**base, "hub": bad})


def test_cli_crawl_with_an_error_row_exits_3(fake_hub: FakeHub, tmp_path: Path) -> None:
    """Like `analyze`: the crawl completes (good repos analysed) and says so with exit 3."""
    _tiny_zoo(fake_hub, "u/gated")
    out = tmp_path / "results"
    proc = cli("crawl", "--base-model", TINY, "--out", str(out), "--local", env=hub_env(fake_hub))
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    summary = json.loads(proc.stdout)
    assert [(b["discovered"], b["units_done"], b["error_rows"]) for b in summary["bases"]] == [(2, 2, 1)]
    assert _analysed(out) == {"u/good-0", "u/good-1"}
