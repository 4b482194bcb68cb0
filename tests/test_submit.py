"""`zoospectra submit` and `zoospectra jobs` end to end against a real Ray head with its Jobs API
(`ray start --head --block` with the dashboard on loopback): a job runs and its results land, its
status and log tail come back, a failed job's exit code and message are reported, every wait is
bounded."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rows import assert_rows_close, table_rows

from zoospectra.demo.zoo import build_zoo, lora

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    bin_dir = str(Path(sys.executable).parent)   # the job's `python` is this interpreter
    return {**env, "PATH": bin_dir + os.pathsep + env.get("PATH", ""), "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0"}


def zs(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zoospectra.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=_env())


@pytest.fixture(scope="module")
def jobs_api():
    """A Ray head with the Jobs API at http://127.0.0.1:PORT; stopped with every process it started."""
    port, dash = _free_port(), _free_port()
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--port", str(port),
         "--node-ip-address", "127.0.0.1", "--include-dashboard=true", "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dash), "--num-cpus", "2", "--disable-usage-stats",
         # the agent's HTTP port is fixed (52365) by default: any other Ray on the machine holds it
         "--dashboard-agent-listen-port", str(_free_port())],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 240
    try:
        while zs("jobs", "--address", address, timeout=120).returncode != 0:
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the Jobs API did not come up within 240 s"
            time.sleep(2)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> list[Path]:
    return build_zoo(tmp_path_factory.mktemp("subzoo"), [lora("sub_r4", 4, 8, targets=("query", "value"))],
                     steps=4)


def test_submitted_analysis_runs_and_lands(jobs_api, minilm_dir, zoo, tmp_path):
    out = tmp_path / "results"
    ref = tmp_path / "reference"
    args = ["analyze", *map(str, zoo), "--base", str(minilm_dir), "--batch-size", "4"]
    local = zs(*args, "--out", str(ref), "--local")
    assert local.returncode == 0, local.stderr

    proc = zs("submit", "--address", jobs_api, "--wait", "--timeout", "500", "--", *args, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id = proc.stdout.splitlines()[0].strip()
    assert job_id.startswith("raysubmit_")
    assert "SUCCEEDED" in proc.stdout and "run " in proc.stderr        # the job's log was followed
    for table in ("matrices", "vectors", "spectra"):
        assert_rows_close(table_rows(out, table), table_rows(ref, table))

    status = zs("submit", "--address", jobs_api, "--status", job_id)
    assert status.returncode == 0 and status.stdout.startswith(f"{job_id}  SUCCEEDED")
    assert "units done" in " ".join(status.stdout.split())             # the log tail

    listed = zs("jobs", "--address", jobs_api)
    assert listed.returncode == 0 and job_id in listed.stdout


def test_a_failed_job_reports_its_exit_code_and_message(jobs_api, tmp_path):
    proc = zs("submit", "--address", jobs_api, "--wait", "--timeout", "300", "--",
              "analyze", str(tmp_path / "no-such-adapter"), "--base", str(tmp_path / "no-such-base"),
              "--out", str(tmp_path / "r"))
    assert proc.returncode == 2, proc.stdout + proc.stderr       # the job's own exit code (bad input)
    assert "FAILED" in proc.stdout and "exit code 2" in proc.stdout
    assert "no-such-base" in proc.stderr                         # its one-line error, from the job log


def test_unknown_job_and_bounded_wait(jobs_api, minilm_dir, zoo, tmp_path):
    unknown = zs("submit", "--address", jobs_api, "--status", "raysubmit_doesnotexist")
    assert unknown.returncode == 2 and "no job 'raysubmit_doesnotexist'" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    # an analysis takes far longer than 1 s (the job's interpreter alone starts slower than that)
    slow = zs("submit", "--address", jobs_api, "--wait", "--timeout", "1", "--",
              "analyze", *map(str, zoo), "--base", str(minilm_dir), "--out", str(tmp_path / "r"))
    assert slow.returncode == 1, slow.stderr
    last = slow.stderr.strip().splitlines()[-1]
    assert last.startswith("error (JobWaitTimeoutError): job raysubmit_") and "keeps running" in last
