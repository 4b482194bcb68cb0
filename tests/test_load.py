"""Load, reduced for CI: the real benchmark, `python -m bench.load_crawl`, with 60 adapter repos
(3 distinct real LoRAs) crawled from the loopback Hub on a local Ray, run as the program it is
(no import of bench/). Nothing lost, nothing duplicated, no error rows, and the workers' memory
stays bounded (it does not grow with the number of repos). The full 500-repo figures come from
the same command with its defaults.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
N_REPOS = 60
WORKER_RSS_BOUND_MB = 1500   # one MiniLM matrix batch per task: ~400 MiB measured


@pytest.mark.slow
def test_crawl_of_60_repos_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "HF_TOKEN")}
    proc = subprocess.run([sys.executable, "-m", "bench.load_crawl", "--repos", str(N_REPOS), "--distinct", "3",
                           "--batch-size", "32", "--keep", str(tmp_path / "work")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\nload: {result}")
    assert result["discovered"] == N_REPOS and result["error_rows"] == 0
    assert result["units_failed"] == 0 and result["units_done"] == result["units"] == 6 * 2  # 60 -> 2 batches
    assert result["rows"]["matrices"] == N_REPOS * 6
    assert set(result["rows_lost"].values()) == {0}
    assert set(result["duplicates"].values()) == {0}
    assert 0 < result["worker_peak_rss_mb_reported"] < WORKER_RSS_BOUND_MB
