"""Pytest fixtures for the loopback Hub: import them into a test module with

    from fixtures_hub import fake_hub, hub_options, publish_dir, safetensors_bytes  # noqa: F401

`fake_hub` starts a FakeHub (tests/hub_server.py) and points the real huggingface_hub client at
it the standard way (HF_ENDPOINT), with a private HF cache (HF_HOME / HF_HUB_CACHE) and no
token. huggingface_hub reads some settings once at import, so those constants are patched too.
Ray workers started inside such a test inherit the environment variables, not the patches:
pass HubOptions(endpoint=..., cache_dir=...) explicitly to code that runs there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import pytest

from hub_server import FakeHub
from zoospectra.hub import HubOptions


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    from huggingface_hub import constants

    hub = FakeHub(page_size=10).start()
    cache = tmp_path / "hf_home" / "hub"
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    try:
        yield hub
    finally:
        hub.stop()


@pytest.fixture
def hub_options() -> HubOptions:
    """Fast retries for tests: tiny backoff, short timeouts, a low Retry-After cap."""
    return HubOptions(timeout=5.0, max_retries=3, backoff=0.01, backoff_max=0.05, retry_after_max=2.0)


def safetensors_bytes(tensors: dict, metadata: Optional[dict[str, str]] = None) -> bytes:
    """torch tensors -> the bytes of a .safetensors file."""
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def publish_dir(hub: FakeHub, repo_id: str, path: Path, **repo_kwargs: object) -> str:
    """Publish every file under a local directory (e.g. a PEFT save_pretrained output) as a repo."""
    files = {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(Path(path).rglob("*"))
             if p.is_file()}
    return hub.add_repo(repo_id, files, **repo_kwargs)
