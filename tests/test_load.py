"""Load, reduced for CI: bench/load_crawl.py with 60 adapter repos (3 distinct real LoRAs) crawled
from the loopback Hub on a local Ray. Nothing lost, nothing duplicated, no error rows, and the
workers' memory stays bounded (it does not grow with the number of repos). The full 500-repo
figures come from `python -m bench.load_crawl`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import torch

from bench.load_crawl import hub_environment, run_load
from fixtures_faults import tiny_loras  # noqa: F401

torch.set_num_threads(1)
N_REPOS = 60
WORKER_RSS_BOUND_MB = 1500   # one MiniLM matrix batch per task: ~400 MiB measured


@pytest.fixture
def fresh_ray() -> Iterator[None]:
    """The crawl starts its own local Ray, whose workers inherit this test's Hub environment:
    none may be running from an earlier test, and none is left behind."""
    import ray

    ray.shutdown()
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_crawl_of_60_repos_loses_and_duplicates_nothing(tiny_loras: list[Path], tmp_path: Path, fresh_ray: None,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    env = hub_environment(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
    result = run_load(tiny_loras, N_REPOS, tmp_path, batch_size=32)
    print(f"\nload: {result}")
    assert result["discovered"] == N_REPOS and result["error_rows"] == 0
    assert result["units_failed"] == 0 and result["units_done"] == result["units"] == 6 * 2  # 60 -> 2 batches
    assert result["rows"]["matrices"] == N_REPOS * 6
    assert set(result["rows_lost"].values()) == {0}
    assert set(result["duplicates"].values()) == {0}
    assert 0 < result["worker_peak_rss_mb_reported"] < WORKER_RSS_BOUND_MB
