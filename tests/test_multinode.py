"""A real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster: a head and worker
nodes, each its own raylet with one CPU): results equal a single-node run, a worker node killed
mid-run loses and duplicates nothing, `runs` records the nodes and the cluster, a plain run never
joins a cluster that happens to run here, and a node that advertises GPUs without CUDA still
analyses on the CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from rows import assert_rows_close, table_rows

from zoospectra.demo.zoo import build_zoo, lora

pytestmark = pytest.mark.slow

TABLES = ("matrices", "vectors", "spectra")
# token auth on for clusters started here would need every driver to carry the token; the tests
# are about scheduling, and a cluster on loopback of a throwaway machine
ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> list[Path]:
    specs = [lora("mn_r4", 4, 8, targets=("query", "value")),
             lora("mn_r8", 8, 16, targets=("query", "value", "intermediate.dense"))]
    return build_zoo(tmp_path_factory.mktemp("mnzoo"), specs, steps=4)


def cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "zoospectra.cli", *args], capture_output=True,
                          text=True, env={**env, **ENV}, timeout=600, **kw)


def analyze_args(minilm_dir: Path, zoo: list[Path], out: Path, *extra: str) -> list[str]:
    return ["analyze", *[f"{p.name}={p}" for p in zoo], "--base", str(minilm_dir), "--out", str(out),
            "--batch-size", "1", *extra]


@pytest.fixture(scope="module")
def reference(minilm_dir, zoo, tmp_path_factory) -> Path:
    """The same work in-process (no Ray at all): what every cluster run must reproduce."""
    out = tmp_path_factory.mktemp("mnref") / "results"
    proc = cli(analyze_args(minilm_dir, zoo, out, "--local"))
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture
def cluster(monkeypatch):
    """Head (1 CPU) + one worker node (1 CPU), both real raylets; torn down after the test."""
    from ray.cluster_utils import Cluster

    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    c = Cluster(initialize_head=True, connect=False,
                head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = c.add_node(num_cpus=1)
    c.wait_for_nodes()
    c.worker = worker
    yield c
    c.shutdown()


def last_run(root: Path) -> dict:
    return json.loads(sorted((root / "runs").glob("*.json"))[-1].read_text())


def runs_row(root: Path) -> tuple:
    return duckdb.sql(f"SELECT n_nodes, cluster FROM read_parquet('{root}/runs/*.parquet', "
                      "union_by_name = true) ORDER BY started_at DESC LIMIT 1").fetchall()[0]


def assert_same_rows(got: Path, want: Path) -> None:
    for table in TABLES:
        a, b = table_rows(got, table), table_rows(want, table)
        assert a, f"{table}: no rows"
        assert_rows_close(a, b)


def test_two_nodes_give_the_single_node_rows(minilm_dir, zoo, reference, cluster, tmp_path):
    out = tmp_path / "results"
    proc = cli(analyze_args(minilm_dir, zoo, out, "--address", cluster.address))
    assert proc.returncode == 0, proc.stderr
    assert_same_rows(out, reference)
    n_nodes, where = runs_row(out)
    assert n_nodes == 2, f"units ran on {n_nodes} node(s): {last_run(out)}"
    assert where.startswith(f"Ray cluster at {cluster.address} (2 nodes")
    said = " ".join((proc.stdout + proc.stderr).split())   # rich wraps long lines
    assert f"ran on Ray cluster at {cluster.address}" in said


def test_a_plain_run_starts_its_own_ray_beside_a_running_cluster(minilm_dir, zoo, reference, cluster,
                                                                 tmp_path):
    """Ray's own default joins a cluster started on this machine; zoospectra's never does."""
    out = tmp_path / "results"
    proc = cli(analyze_args(minilm_dir, zoo, out))
    assert proc.returncode == 0, proc.stderr
    assert_same_rows(out, reference)
    n_nodes, where = runs_row(out)
    assert n_nodes == 1 and where.startswith("local Ray started by this run"), where


def test_worker_node_killed_mid_run_loses_nothing(minilm_dir, zoo, reference, cluster, tmp_path):
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "zoospectra.cli",
                             *analyze_args(minilm_dir, zoo, out, "--address", cluster.address)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**env, **ENV})
    deadline = time.monotonic() + 300
    while not list((out / "units").glob("*/_SUCCESS")):   # the run is under way on the cluster
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no unit committed within 300 s"
        time.sleep(0.2)
    cluster.remove_node(cluster.worker, allow_graceful=False)   # SIGKILL the worker node's raylet
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert_same_rows(out, reference)   # equal row lists: nothing lost, nothing twice
    dup = duckdb.sql(f"SELECT model_id, tensor, count(*) FROM read_parquet('{out}/units/*/matrices.parquet') "
                     "GROUP BY ALL HAVING count(*) > 1").fetchall()
    assert dup == []


def test_a_node_with_gpus_but_no_cuda_runs_units_on_the_cpu(minilm_dir, zoo, reference, monkeypatch, tmp_path):
    """Fractional GPU tasks land on a node that advertises a GPU (num_gpus=1, no CUDA on this
    machine); the task sees no usable CUDA and analyses on the CPU instead of failing."""
    import torch
    from ray.cluster_utils import Cluster

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the fallback is not reachable")
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    c = Cluster(initialize_head=True, connect=False,
                head_node_args={"num_cpus": 2, "num_gpus": 1, "include_dashboard": False})
    try:
        out = tmp_path / "results"
        proc = cli(analyze_args(minilm_dir, zoo, out, "--address", c.address))
        assert proc.returncode == 0, proc.stderr
        assert_same_rows(out, reference)
        assert last_run(out)["devices"] == {"cpu": last_run(out)["n_done"]}
        assert "torch sees no CUDA device; running on the CPU" in " ".join((proc.stderr + proc.stdout).split())
    finally:
        c.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_loopback_head_with_token_auth(minilm_dir, zoo, reference, tmp_path):
    """`ray start --head --node-ip-address 127.0.0.1` with token authentication, joined at
    --address 127.0.0.1:PORT: with the token the run works; without it the CLI stops with one
    line naming the fix (RAY_AUTH_MODE=token) instead of hanging."""
    token = "zs" + os.urandom(16).hex()
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    head_env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    ray_bin = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                             "--port", str(port), "--num-cpus", "1", "--include-dashboard=false",
                             "--disable-usage-stats"], env=head_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        address = f"127.0.0.1:{port}"
        out = tmp_path / "results"
        deadline = time.monotonic() + 180
        while True:   # the head is up once the CLI can join it
            proc = subprocess.run([sys.executable, "-m", "zoospectra.cli",
                                   *analyze_args(minilm_dir, zoo, out, "--address", address)],
                                  capture_output=True, text=True, timeout=600,
                                  env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
            if proc.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert proc.returncode == 0, proc.stderr
        assert_same_rows(out, reference)
        n_nodes, where = runs_row(out)
        assert n_nodes == 1 and where.startswith(f"Ray cluster at {address}"), where

        t0 = time.monotonic()
        denied = subprocess.run([sys.executable, "-m", "zoospectra.cli",
                                 *analyze_args(minilm_dir, zoo, tmp_path / "other", "--address", address)],
                                capture_output=True, text=True, timeout=300,
                                env={**env, "RAY_AUTH_MODE": "disabled", "HOME": str(tmp_path)})
        assert denied.returncode == 1, denied.stderr
        lines = denied.stderr.strip().splitlines()
        assert lines[-1].startswith(f"error (ClusterUnreachableError): cannot join the Ray cluster at {address}")
        assert "RAY_AUTH_MODE=token" in lines[-1] and "Traceback" not in denied.stderr
        assert time.monotonic() - t0 < 240
    finally:
        import signal

        os.killpg(head.pid, signal.SIGTERM)   # --block: the head stops every Ray process it started
        head.wait(timeout=60)
