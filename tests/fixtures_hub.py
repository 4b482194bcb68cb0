"""Pytest fixtures for the loopback Hub and the helpers that go with them:

    fake_hub, hub_options, module_hub: fixtures (registered by conftest.py's pytest_plugins)
    from fixtures_hub import publish_dir, safetensors_bytes, serving_hub   # helpers

(`module_hub` is the same server shared by a whole module; `hub_env` gives a subprocess the
environment that reaches it.)

`fake_hub` starts a FakeHub (tests/hub_server.py) and points the real huggingface_hub client at
it the standard way (HF_ENDPOINT), with a private HF cache (HF_HOME / HF_HUB_CACHE) and no
token. huggingface_hub reads some settings once at import, so those constants are patched too.
Ray workers started inside such a test inherit the environment variables, not the patches:
pass HubOptions(endpoint=..., cache_dir=...) explicitly to code that runs there.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hub_server import FakeHub

from zoospectra.io.hub import HubOptions


@contextmanager
def serving_hub(mp: pytest.MonkeyPatch, root: Path) -> Iterator[FakeHub]:
    """A FakeHub on loopback with the client pointed at it (HF_ENDPOINT) and its cache in `root`."""
    from huggingface_hub import constants

    hub = FakeHub(page_size=10).start()
    cache = root / "hf_home" / "hub"
    mp.setenv("HF_ENDPOINT", hub.url)
    mp.setenv("HF_HOME", str(root / "hf_home"))
    mp.setenv("HF_HUB_CACHE", str(cache))
    mp.setenv("HF_HUB_OFFLINE", "0")
    mp.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        mp.delenv(var, raising=False)
    mp.setattr(constants, "HF_HUB_OFFLINE", False)
    mp.setattr(constants, "HF_HUB_CACHE", str(cache))
    mp.setattr(constants, "HF_TOKEN_PATH", str(root / "hf_home" / "token"))
    mp.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    try:
        yield hub
    finally:
        hub.stop()


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    with serving_hub(monkeypatch, tmp_path) as hub:
        yield hub


@pytest.fixture(scope="module")
def module_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    """One FakeHub for a whole test module (state shared by its tests, e.g. crawl after crawl)."""
    with pytest.MonkeyPatch.context() as mp, serving_hub(mp, tmp_path_factory.mktemp("hub")) as hub:
        yield hub


def hub_env(hub: FakeHub) -> dict[str, str]:
    """The environment a subprocess (CLI, Ray worker) needs to reach `hub` with the test's cache:
    huggingface_hub reads these at import, so the in-process patches do not reach it."""
    import os

    keys = ("HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS")
    env = {k: os.environ[k] for k in keys}
    assert env["HF_ENDPOINT"] == hub.url, "use inside the hub fixture"
    return env


@pytest.fixture
def hub_options() -> HubOptions:
    """Fast retries for tests: tiny backoff, short timeouts, a low Retry-After cap."""
    return HubOptions(timeout=5.0, max_retries=3, backoff=0.01, backoff_max=0.05, retry_after_max=2.0)


def safetensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """torch tensors -> the bytes of a .safetensors file."""
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def publish_dir(hub: FakeHub, repo_id: str, path: Path, **repo_kwargs: object) -> str:
    """Publish every file under a local directory (e.g. a PEFT save_pretrained output) as a repo."""
    files = {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(Path(path).rglob("*"))
             if p.is_file()}
    return hub.add_repo(repo_id, files, **repo_kwargs)
