"""Killing a Ray worker from outside, mid-task: the worker-crash tests need no hook in the package.

A Ray worker's process title is `ray::<function>` while it runs a task (`ray::IDLE` between
tasks), so the first process titled `ray::analyze_unit` is a worker inside a unit.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import psutil

BUSY_TITLE = "ray::analyze_unit"


def busy_worker() -> psutil.Process | None:
    """A process of this user that is running a unit right now, if any."""
    for proc in psutil.process_iter(["cmdline", "uids"]):
        try:
            cmd = proc.info["cmdline"] or []
            if cmd and cmd[0].startswith(BUSY_TITLE) and proc.info["uids"].real == os.getuid():
                return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


class WorkerKiller(threading.Thread):
    """Polls for a busy worker and SIGKILLs the first one it sees (once), within `timeout` s."""

    def __init__(self, timeout: float = 300.0, poll: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.timeout, self.poll = timeout, poll
        self.killed: int | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        end = time.monotonic() + self.timeout
        while not self._halt.is_set() and time.monotonic() < end:
            proc = busy_worker()
            if proc is not None:
                try:
                    proc.send_signal(signal.SIGKILL)
                    self.killed = proc.pid
                    return
                except psutil.NoSuchProcess:
                    pass
            time.sleep(self.poll)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def descendants(pid: int) -> list[psutil.Process]:
    """Every process below `pid` now (a driver's local Ray: GCS, raylet, its agents, workers)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def still_running(procs: list[psutil.Process], wait: float = 10.0) -> list[str]:
    """Those of `procs` still alive (zombies aside) after up to `wait` seconds; is_running also
    checks the start time, so a reused pid does not count."""
    deadline = time.monotonic() + wait
    while True:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{p.pid} {p.name()}")
            except psutil.NoSuchProcess:
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)
