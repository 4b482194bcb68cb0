"""The Hub layer against the real huggingface_hub client and a Hub-compatible loopback server."""
from __future__ import annotations

import json
import logging
import pickle
from dataclasses import replace

import pytest
import torch
from fixtures_hub import safetensors_bytes
from hub_server import LISTING, FakeHub

from zoospectra.errors import HubAccessError, HubNotFoundError, HubUnavailableError, error_row
from zoospectra.io.hub import HubFileSource, HubOptions, discover, pin, pinned_ref, unanalysed
from zoospectra.schemas.tables import to_table

BASE = "org/tiny-base"
TOKEN = "hf_PlantedSecretTokenDoNotLeak42"


def _base_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"layers.{i}.{m}.weight": torch.randn(48, 32, generator=g)
            for i in range(3) for m in ("q_proj", "v_proj", "mlp")}


def _adapter_files(base: str = BASE, seed: int = 0) -> dict[str, bytes]:
    g = torch.Generator().manual_seed(seed)
    config = {"peft_type": "LORA", "base_model_name_or_path": base, "r": 4, "lora_alpha": 8,
              "target_modules": ["q_proj"]}
    weights = {"base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(4, 32, generator=g),
               "base_model.model.layers.0.q_proj.lora_B.weight": torch.randn(48, 4, generator=g)}
    return {"adapter_config.json": json.dumps(config).encode(),
            "adapter_model.safetensors": safetensors_bytes(weights)}


def _api(hub: FakeHub):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.url, token=False)


# --- listing, model info ----------------------------------------------------------------
def test_listing_filters_expand_and_pagination(fake_hub: FakeHub) -> None:
    for i in range(23):
        fake_hub.add_repo(f"u/lora-{i:02d}", _adapter_files(seed=i), base_model=BASE, relation="adapter")
    fake_hub.add_repo("u/other-base-lora", _adapter_files("org/other"), base_model="org/other",
                      relation="adapter")
    fake_hub.add_repo("u/full-ft", {"model.safetensors": b"x"}, base_model=BASE, relation="finetune")
    fake_hub.add_repo("u/hidden", _adapter_files(), base_model=BASE, relation="adapter", private=True)

    listed = list(_api(fake_hub).list_models(filter=["peft", f"base_model:adapter:{BASE}"],
                                             expand=["sha", "siblings", "gated", "lastModified"]))
    assert [m.id for m in listed] == [f"u/lora-{i:02d}" for i in range(23)]   # private one hidden
    assert all(len(m.sha) == 40 and m.last_modified is not None for m in listed)
    assert {s.rfilename for s in listed[0].siblings} == {"adapter_config.json", "adapter_model.safetensors"}
    assert len(fake_hub.requests(LISTING)) == 3                          # 10 + 10 + 3, Link: next
    limited = list(_api(fake_hub).list_models(filter=["peft", f"base_model:adapter:{BASE}"], limit=7))
    assert len(limited) == 7
    full = list(_api(fake_hub).list_models(filter=[f"base_model:finetune:{BASE}"]))
    assert [m.id for m in full] == ["u/full-ft"]


def test_model_info_and_files_by_revision(fake_hub: FakeHub, hub_options: HubOptions) -> None:
    old = fake_hub.add_repo("u/evolving", {"a.json": b"{}"}, base_model=BASE, relation="adapter")
    new = fake_hub.commit("u/evolving", {"b.json": b"[1, 2]"}, delete=["a.json"])
    assert _api(fake_hub).model_info("u/evolving", revision=old).sha == old
    assert pin("u/evolving", options=hub_options) == new
    assert HubFileSource("u/evolving", old, hub_options).files() == {"a.json": 2}
    src = HubFileSource("u/evolving", new, hub_options)
    assert src.files() == {"b.json": 6} and not src.exists("a.json")
    assert src.read_text("b.json") == "[1, 2]"


# --- ranged reads ------------------------------------------------------------------------
def test_ranged_reads_return_exact_bytes_and_only_those(fake_hub: FakeHub, hub_options: HubOptions,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from zoospectra.io.checkpoint import Checkpoint

    tensors = _base_tensors()
    blob = safetensors_bytes(tensors)
    sha = fake_hub.add_repo(BASE, {"model.safetensors": blob, "config.json": b"{}"}, gated="manual")
    fake_hub.grant(TOKEN, BASE)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    src = HubFileSource(BASE, sha, hub_options)

    for start, end in [(0, 8), (100, 1000), (len(blob) - 17, len(blob)), (5, 5)]:
        assert bytes(src.read_range("model.safetensors", start, end)) == blob[start:end]
    fake_hub.reset_counters()

    ckpt = Checkpoint.open(src)
    wanted = ["layers.1.q_proj.weight", "layers.2.mlp.weight"]
    for key in wanted:
        assert torch.equal(ckpt.get(key), tensors[key])
    touched = sum(ckpt.info(k).nbytes for k in wanted)
    served = fake_hub.bytes_served(BASE, "model.safetensors")
    assert served == touched + ckpt.header_bytes_read          # nothing beyond header + tensors
    assert served <= 1.1 * touched
    # LFS files redirect to a CDN origin: the token went to the Hub, never to the CDN.
    gets = fake_hub.requests(BASE, "model.safetensors", "GET")
    assert {r.host for r in gets} == {"hub", "cdn"}
    assert all(r.authorized for r in gets if r.host == "hub")
    assert not any(r.authorized for r in gets if r.host == "cdn")
    assert all(r.range for r in gets)


def test_small_files_go_to_the_cache_and_cached_files_are_read_locally(
        fake_hub: FakeHub, hub_options: HubOptions, tmp_path) -> None:
    files = _adapter_files()
    sha = fake_hub.add_repo("u/lora", files, base_model=BASE, relation="adapter")
    src = HubFileSource("u/lora", sha, hub_options)
    path = src.local_path("adapter_model.safetensors")
    assert path.startswith(str(tmp_path / "hf_home" / "hub")) and f"snapshots/{sha}" in path
    assert open(path, "rb").read() == files["adapter_model.safetensors"]
    fake_hub.reset_counters()
    again = HubFileSource("u/lora", sha, hub_options)
    assert bytes(again.read_range("adapter_model.safetensors", 8, 40)) == files["adapter_model.safetensors"][8:40]
    assert json.loads(again.read_text("adapter_config.json"))["r"] == 4   # downloaded once ...
    fake_hub.reset_counters()
    assert json.loads(again.read_text("adapter_config.json"))["r"] == 4   # ... then local
    assert fake_hub.requests() == []


def test_source_pickles_without_token(fake_hub: FakeHub, hub_options: HubOptions,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    sha = fake_hub.add_repo("u/lora", _adapter_files(), base_model=BASE, relation="adapter")
    src = HubFileSource("u/lora", sha, hub_options)
    src.files()
    blob = pickle.dumps(src)
    assert TOKEN.encode() not in blob
    assert pickle.loads(blob).read_text("adapter_config.json")


# --- access and missing things -----------------------------------------------------------
def test_gated_and_private_repos_raise_access_errors(fake_hub: FakeHub, hub_options: HubOptions,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    g = fake_hub.add_repo("org/gated", {"model.safetensors": b"x" * 64}, gated="manual")
    p = fake_hub.add_repo("org/private", {"model.safetensors": b"x" * 64}, private=True)
    with pytest.raises(HubAccessError, match="gated"):                   # 401: no token
        HubFileSource("org/gated", g, hub_options).read_range("model.safetensors", 0, 8)
    with pytest.raises(HubAccessError, match="private"):
        HubFileSource("org/private", p, hub_options).files()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    fake_hub.grant(TOKEN)                                                # valid, no access
    with pytest.raises(HubAccessError, match="gated") as info:           # 403
        HubFileSource("org/gated", g, hub_options).read_range("model.safetensors", 0, 8)
    assert info.value.context["repo"] == "org/gated"
    fake_hub.grant(TOKEN, "org/gated", "org/private")
    assert HubFileSource("org/gated", g, hub_options).read_range("model.safetensors", 0, 8) == b"x" * 8
    assert HubFileSource("org/private", p, hub_options).size("model.safetensors") == 64
    assert all(r.status < 500 for r in fake_hub.requests())              # no retries on 4xx
    assert len([r for r in fake_hub.requests("org/gated") if r.status in (401, 403)]) == 2


def test_missing_repo_revision_and_file_raise_not_found(fake_hub: FakeHub, hub_options: HubOptions) -> None:
    sha = fake_hub.add_repo("u/lora", _adapter_files(), base_model=BASE, relation="adapter")
    with pytest.raises(HubNotFoundError, match="repo not found"):
        HubFileSource("u/nope", sha, hub_options).files()
    with pytest.raises(HubNotFoundError, match="revision not found"):
        HubFileSource("u/lora", "f" * 40, hub_options).files()
    with pytest.raises(HubNotFoundError, match="file not found"):
        HubFileSource("u/lora", sha, hub_options).read_text("nope.json")
    with pytest.raises(HubNotFoundError):
        HubFileSource("u/lora", sha, hub_options).size("nope.bin")
    assert len(fake_hub.requests()) == 4                                 # 404s are not retried


# --- transient failures ------------------------------------------------------------------
def test_429_waits_retry_after_then_succeeds(fake_hub: FakeHub, hub_options: HubOptions) -> None:
    blob = safetensors_bytes(_base_tensors())
    sha = fake_hub.add_repo(BASE, {"model.safetensors": blob})
    fake_hub.inject(BASE, "model.safetensors", status=429, retry_after=1, methods=("GET",))
    src = HubFileSource(BASE, sha, hub_options)
    assert bytes(src.read_range("model.safetensors", 10, 90)) == blob[10:90]
    first, second = fake_hub.requests(BASE, "model.safetensors", "GET")[:2]
    assert (first.status, second.status) == (429, 302)
    assert second.at - first.at >= 0.9                                   # honoured Retry-After: 1


def test_retry_after_is_capped(fake_hub: FakeHub, hub_options: HubOptions) -> None:
    sha = fake_hub.add_repo(BASE, {"config.json": b"{}"})
    fake_hub.inject(BASE, "config.json", status=429, retry_after=3600)
    opts = replace(hub_options, retry_after_max=0.2)
    assert HubFileSource(BASE, sha, opts).read_text("config.json") == "{}"


def test_5xx_n_times_then_success(fake_hub: FakeHub, hub_options: HubOptions) -> None:
    sha = fake_hub.add_repo("u/lora", _adapter_files(), base_model=BASE, relation="adapter")
    fake_hub.inject("u/lora", "adapter_config.json", status=500, times=1)
    fake_hub.inject("u/lora", "adapter_config.json", status=503, times=1)
    src = HubFileSource("u/lora", sha, hub_options)
    assert json.loads(src.read_text("adapter_config.json"))["r"] == 4
    statuses = [r.status for r in fake_hub.requests("u/lora", "adapter_config.json")]
    assert statuses[:2] == [500, 503] and statuses[-1] == 200


def test_persistent_5xx_gives_up_after_bounded_retries(fake_hub: FakeHub, hub_options: HubOptions) -> None:
    sha = fake_hub.add_repo(BASE, {"model.safetensors": b"x" * 100})
    fake_hub.inject(BASE, "model.safetensors", status=500, times=-1)
    with pytest.raises(HubUnavailableError, match="after 4 tries") as info:
        HubFileSource(BASE, sha, hub_options).read_range("model.safetensors", 0, 10)
    assert info.value.context["file"] == "model.safetensors"
    assert len(fake_hub.requests(BASE, "model.safetensors")) == hub_options.max_retries + 1


def test_slow_reply_times_out_then_retries(fake_hub: FakeHub, hub_options: HubOptions) -> None:
    sha = fake_hub.add_repo(BASE, {"model.safetensors": b"abcdefghij" * 10})
    opts = replace(hub_options, timeout=0.3, max_retries=2)
    fake_hub.inject(BASE, "model.safetensors", delay=1.0, times=1)
    assert HubFileSource(BASE, sha, opts).read_range("model.safetensors", 3, 7) == b"defg"
    fake_hub.inject(BASE, "model.safetensors", delay=1.0, times=-1)
    with pytest.raises(HubUnavailableError, match="Timeout"):
        HubFileSource(BASE, sha, opts).read_range("model.safetensors", 3, 7)


def test_token_never_in_messages_logs_or_error_rows(fake_hub: FakeHub, hub_options: HubOptions,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    fake_hub.grant(TOKEN)
    g = fake_hub.add_repo("org/gated", {"model.safetensors": b"x" * 64}, gated="auto")
    s = fake_hub.add_repo("org/flaky", {"model.safetensors": b"x" * 64})
    fake_hub.inject("org/flaky", status=500, times=-1)
    errors = []
    for repo, sha in (("org/gated", g), ("org/flaky", s), ("org/missing", s)):
        with pytest.raises((HubAccessError, HubUnavailableError, HubNotFoundError)) as info:
            HubFileSource(repo, sha, hub_options).read_range("model.safetensors", 0, 8)
        errors.append(info.value)
    assert any(r.authorized for r in fake_hub.requests())               # the token was sent
    texts = [str(e) for e in errors] + [repr(e.context) for e in errors]
    texts += [json.dumps(error_row("hub", e, model=pinned_ref("x", "y")), default=str) for e in errors]
    assert "retry" in caplog.text and TOKEN not in caplog.text
    assert not any(TOKEN in t for t in texts)
    assert all(e.__cause__ is None for e in errors)                      # no request objects chained


# --- discovery ---------------------------------------------------------------------------
def _zoo(hub: FakeHub) -> dict[str, str]:
    shas = {f"u/good-{i}": hub.add_repo(f"u/good-{i}", _adapter_files(seed=i), base_model=BASE,
                                        relation="adapter") for i in range(4)}
    hub.add_repo("u/mislabelled", _adapter_files("org/other"), base_model=BASE, relation="adapter")
    hub.add_repo("u/gated-lora", _adapter_files(), base_model=BASE, relation="adapter", gated="manual")
    hub.add_repo("u/pickle-lora", {"adapter_config.json": _adapter_files()["adapter_config.json"],
                                   "adapter_model.bin": b"\x80\x04"}, base_model=BASE, relation="adapter")
    hub.add_repo("u/no-config", {"adapter_model.safetensors": b"x"}, base_model=BASE, relation="adapter")
    shas["u/full"] = hub.add_repo("u/full", {"model.safetensors": safetensors_bytes(_base_tensors())},
                                  base_model=BASE, relation="finetune")
    hub.add_repo("u/full-bin", {"pytorch_model.bin": b"\x80"}, base_model=BASE, relation="finetune")
    return shas


def test_discover_pins_checks_and_records_errors(fake_hub: FakeHub, hub_options: HubOptions) -> None:
    shas = _zoo(fake_hub)
    fake_hub.inject("u/good-2", "adapter_config.json", status=503, times=2)    # transient
    fake_hub.inject(LISTING, status=429, retry_after=0, times=1)                # listing retried
    found = discover([BASE, "org/no-adapters"], include_full=True, options=hub_options)

    assert [(e.repo_id, e.sha, e.kind) for e in found.entries] == sorted(
        (r, s, "full" if r == "u/full" else "adapter") for r, s in shas.items())
    kinds = {row["model_id"]: row["error_type"] for row in found.errors}
    assert kinds == {"u/mislabelled": "BaseMismatchError", "u/gated-lora": "HubAccessError",
                     "u/pickle-lora": "UnsafeCheckpointError", "u/no-config": "CheckpointNotFoundError",
                     "u/full-bin": "UnsafeCheckpointError"}
    assert all(row["stage"] == "hub" and row["model_uid"] for row in found.errors)
    catalog = to_table("catalog", [e.row("run-1") for e in found.entries])
    assert catalog.num_rows == 5 and catalog.column("sha").to_pylist()[0] == shas["u/full"]
    errors = to_table("errors", [{**r, "run_id": "run-1", "unit_id": "discover"} for r in found.errors])
    assert errors.num_rows == 5

    adapters_only = discover([BASE], include_full=False, limit=3, options=hub_options)
    assert len(adapters_only.entries) + len(adapters_only.errors) == 3
    assert all(e.kind == "adapter" for e in adapters_only.entries)


def test_listing_failure_is_an_error_row_and_discovery_goes_on(fake_hub: FakeHub) -> None:
    fake_hub.add_repo("u/good", _adapter_files(), base_model=BASE, relation="adapter")
    opts = HubOptions(max_retries=0, backoff=0.01)
    fake_hub.inject(LISTING, status=400, times=1)         # one base's listing fails for good
    found = discover(["org/broken", BASE], options=opts)
    assert [e.repo_id for e in found.entries] == ["u/good"]
    assert [(r["model_id"], r["error_type"]) for r in found.errors] == [("org/broken", "HubError")]


def test_incremental_selection_by_repo_and_sha(fake_hub: FakeHub, hub_options: HubOptions) -> None:
    for i in range(3):
        fake_hub.add_repo(f"u/lora-{i}", _adapter_files(seed=i), base_model=BASE, relation="adapter")
    first = discover([BASE], options=hub_options).entries
    analysed = {e.key for e in first}
    assert unanalysed(discover([BASE], options=hub_options).entries, analysed) == []
    new_sha = fake_hub.commit("u/lora-1", _adapter_files(seed=99))
    fresh = unanalysed(discover([BASE], options=hub_options).entries, analysed)
    assert [(e.repo_id, e.sha) for e in fresh] == [("u/lora-1", new_sha)]


# --- crawl edge (discovery + catalog + errors; planning needs pipeline/adapters/) -------
def test_crawl_with_unreadable_base_still_completes_with_rows(fake_hub: FakeHub, hub_options: HubOptions,
                                                               tmp_path) -> None:
    import pyarrow.parquet as pq

    from zoospectra.jobs.spec import CrawlSpec
    from zoospectra.run.crawl import run_crawl

    fake_hub.add_repo("u/good", _adapter_files(), base_model=BASE, relation="adapter")
    fake_hub.add_repo("u/mislabelled", _adapter_files("org/other"), base_model=BASE, relation="adapter")
    out = tmp_path / "results"
    spec = CrawlSpec.from_dict({"name": "t", "base_models": [BASE], "out": str(out)})
    (report,) = run_crawl(spec, options=hub_options, executor="local").bases   # BASE itself is missing
    assert report.base_sha is None and report.discovered == 1 and report.error_rows == 2
    catalog = pq.read_table(out / "catalog" / f"{report.run_id}.parquet").to_pylist()
    assert [(r["repo_id"], r["kind"]) for r in catalog] == [("u/good", "adapter")]
    errors = pq.read_table(out / "errors" / report.run_id / "discover.parquet").to_pylist()
    assert sorted((r["model_id"], r["error_type"]) for r in errors) == [
        (BASE, "HubNotFoundError"), ("u/mislabelled", "BaseMismatchError")]
    assert json.loads((out / "runs" / f"{report.run_id}.json").read_text())["status"] == "failed"
