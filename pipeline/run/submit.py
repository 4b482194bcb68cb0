"""Ray Jobs API client for `zoospectra submit` / `zoospectra jobs`: every call bounded in time.

By default a job ships nothing: the cluster's image must have zoospectra (deploy/Dockerfile).
`--ship-code` ships only this installed zoospectra package as a py_module; `--working_dir` adds a
directory of the user's (never the whole current directory by default: that once packaged a
checkout with its virtualenv and results and stalled before the job existed).
"""
from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ClusterUnreachableError, ConfigError, JobSubmitError, JobWaitTimeoutError

POLL_S = 1.0
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def connect(address: str) -> Any:
    """A JobSubmissionClient for `address`, after a 5 s TCP probe (the client alone retries for
    minutes on an address that does not answer)."""
    from .execute import probe_address

    probe_address(address, what="the Ray Jobs API")
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as err:  # noqa: BLE001 - the client raises bare ConnectionError/RuntimeError
        raise ClusterUnreachableError(f"the Ray Jobs API at {address} answered but refused the client: "
                                      f"{err}", address=address) from err


def runtime_env(ship_code: bool, working_dir: str | None) -> dict:
    env: dict = {}
    if ship_code:
        import zoospectra

        env["py_modules"] = [str(Path(zoospectra.__file__).parent)]
    if working_dir is not None:
        if not Path(working_dir).is_dir():
            raise ConfigError(f"--working-dir {working_dir} is not a directory", option="working_dir")
        env["working_dir"] = working_dir
        env["excludes"] = [".venv", ".git", "results", "__pycache__"]
    return env


AGENT_WAIT_S = 120.0   # a head that has just started answers before its job agent is ready


def submit(client: Any, args: list[str], *, ship_code: bool = False, working_dir: str | None = None,
           agent_wait: float = AGENT_WAIT_S) -> str:
    """Submit `python -m zoospectra.cli ARGS`; returns the job id. "No available agent" (the
    node's job agent still starting) is retried for up to `agent_wait` seconds."""
    entrypoint = shlex.join(["python", "-m", "zoospectra.cli", *args])
    env = runtime_env(ship_code, working_dir) or None
    deadline = time.monotonic() + agent_wait
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=env)
        except RuntimeError as err:   # the SDK's "Request failed with status code N: ..."
            if "No available agent" in str(err) and time.monotonic() < deadline:
                time.sleep(2 * POLL_S)
                continue
            raise JobSubmitError(f"the Ray Jobs API did not take the job: {err}") from err


def info(client: Any, job_id: str) -> Any:
    try:
        return client.get_job_info(job_id)
    except RuntimeError as err:  # "Request failed with status code 404: Job ... does not exist."
        raise ConfigError(f"no job {job_id!r} on this cluster ({err})", option="status") from err


def listing(client: Any) -> list:
    return sorted(client.list_jobs(), key=lambda j: j.start_time or 0)


def log_tail(client: Any, job_id: str, lines: int = 20) -> str:
    return "\n".join(client.get_job_logs(job_id).rstrip("\n").splitlines()[-lines:])


def follow(client: Any, job_id: str, timeout: float, write: Callable[[str], Any]) -> Any:
    """Stream the job's new log lines until it ends or `timeout` seconds pass; its final info.
    Polls get_job_logs (each call bounded by the HTTP client) instead of the websocket tail,
    which has no time limit of its own."""
    shown, deadline = 0, time.monotonic() + timeout
    while True:
        job = info(client, job_id)
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            write(logs[shown:])
            shown = len(logs)
        if str(job.status) in TERMINAL or getattr(job.status, "value", None) in TERMINAL:
            return job
        if time.monotonic() > deadline:
            raise JobWaitTimeoutError(
                f"job {job_id} still {_status(job)} after {timeout:.0f} s; it keeps running "
                f"(`zoospectra submit --address ADDRESS --status {job_id}`)")
        time.sleep(POLL_S)


def _status(job: Any) -> str:
    return str(getattr(job.status, "value", job.status))


def describe(job: Any) -> str:
    """One line: id, status, exit code, message, entrypoint."""
    code = getattr(job, "driver_exit_code", None)
    parts = [getattr(job, "submission_id", None) or getattr(job, "job_id", "?"), _status(job)]
    if code is not None:
        parts.append(f"exit code {code}")
    if job.message and _status(job) != "SUCCEEDED":
        parts.append(job.message.strip().splitlines()[-1][:300])
    parts.append(job.entrypoint)
    return "  ".join(str(p) for p in parts)


def exit_code(job: Any) -> int:
    """0 succeeded; the job's own exit code when it failed with one (e.g. 2 for bad input, 3 for
    a run with error rows); 1 otherwise (stopped, failed without a code); 0 while still running."""
    status = _status(job)
    if status == "SUCCEEDED" or status not in TERMINAL:
        return 0
    code = getattr(job, "driver_exit_code", None)
    return int(code) if code else 1
