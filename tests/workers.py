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
