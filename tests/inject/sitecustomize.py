"""Fault injection for tests, from outside the package: put this folder on PYTHONPATH and set
INJECT_UNIT_FAILURE=<message>; every Ray worker process then runs units that raise
RuntimeError(<message>), so the driver's task-failure path is exercised for real.
Only Ray worker processes are touched (the driver and other processes import nothing here)."""
import os
import sys

_message = os.environ.get("INJECT_UNIT_FAILURE")
if _message and any("default_worker.py" in a for a in sys.argv[:1]):
    import zoospectra.run.execute as _execute
    import zoospectra.run.unit as _unit

    def _failing_unit(*args, **kwargs):
        raise RuntimeError(_message)

    _unit.process_unit = _failing_unit
    _execute.process_unit = _failing_unit
