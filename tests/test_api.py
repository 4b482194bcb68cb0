"""The public Python API (zoospectra.analyze / connect / crawl): the driver the CLI wraps gives the
CLI's rows, and a plain Python process can query a results root."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import zoospectra
from zoospectra.demo.zoo import build_zoo, lora


@pytest.fixture(scope="module")
def api_zoo(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    specs = [lora("api_r4", 4, 8, targets=("query", "value")), lora("api_r2", 2, 4, targets=("key",))]
    return build_zoo(tmp_path_factory.mktemp("api-zoo"), specs, steps=4)


@pytest.fixture(scope="module")
def api_root(minilm_dir: Path, api_zoo: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("api") / "results"
    seen = []
    run = zoospectra.analyze({p.name: p for p in api_zoo}, base=minilm_dir, out=out,
                             base_name="minilm", executor="local", on_plan=seen.append)
    assert run.n_failed == run.n_member_errors == run.n_plan_errors == 0
    assert run.n_done == run.n_units == len(seen[0].units) == 6 * 2 + 6  # q, v per layer + key
    return out


def test_analyze_commits_one_row_per_targeted_matrix(api_root: Path) -> None:
    con = zoospectra.connect(api_root)
    rows = con.sql("SELECT model_id, count(*) FROM matrices GROUP BY ALL ORDER BY 1").fetchall()
    assert rows == [("api_r2", 6), ("api_r4", 12)]
    # a rank-r LoRA update has exactly r nonzero singular values: the stored effective rank <= r
    worst = con.sql("SELECT max(eff_rank) FROM matrices WHERE model_id = 'api_r2'").fetchall()[0][0]
    assert 1.0 <= worst <= 2.0 + 1e-6


def test_rerun_through_the_api_is_a_no_op(api_root: Path, api_zoo: list[Path], minilm_dir: Path) -> None:
    run = zoospectra.analyze({p.name: p for p in api_zoo}, base=minilm_dir, out=api_root,
                             base_name="minilm", executor="local")
    assert run.n_units == 0 and run.n_done == 0
    n = zoospectra.connect(api_root).sql("SELECT count(*) FROM matrices").fetchall()[0][0]
    assert n == 18


def test_connect_from_a_plain_python_process(api_root: Path) -> None:
    """The issue's check, verbatim, in a fresh interpreter: views and macros are loaded."""
    code = ("import zoospectra, sys; "
            f"print(zoospectra.connect({str(api_root)!r})"
            ".sql('SELECT count(*) FROM intruders(0.5, 10)').fetchall()[0][0])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) == 18  # one intruders() row per (model, matrix)


def test_crawl_accepts_a_mapping_and_validates_it(tmp_path: Path) -> None:
    """The mapping goes through CrawlSpec's validation: unknown keys are errors, not ignored."""
    with pytest.raises(zoospectra.errors.ConfigError, match="bogus"):
        zoospectra.crawl({"name": "x", "base_models": ["org/base"], "out": str(tmp_path), "bogus": 1})
