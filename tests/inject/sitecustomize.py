"""Fault injection for tests, from outside the package: put this folder on PYTHONPATH and set
INJECT_UNIT_FAILURE=<message> (units) or INJECT_BASE_FAILURE=<message> (prepare-base tasks);
every Ray worker process then runs those tasks as raising RuntimeError(<message>), so the
driver's task-failure paths are exercised for real.
Only Ray worker processes are touched (the driver and other processes import nothing here)."""
import os
import sys

_in_worker = any("default_worker.py" in a for a in sys.argv[:1])
_message = os.environ.get("INJECT_UNIT_FAILURE")
if _message and _in_worker:
    import zoospectra.run.execute as _execute
    import zoospectra.run.unit as _unit

    def _failing_unit(*args, **kwargs):
        raise RuntimeError(_message)

    _unit.process_unit = _failing_unit
    _execute.process_unit = _failing_unit

_base_message = os.environ.get("INJECT_BASE_FAILURE")
if _base_message and _in_worker:
    # the remote function reaches prepare_base by reference to its defining module
    import zoospectra.run.basecache as _basecache
    import zoospectra.run.execute as _execute_b

    def _failing_base(*args, **kwargs):
        raise RuntimeError(_base_message)

    _basecache.prepare_base = _failing_base
    _execute_b.prepare_base = _failing_base
