"""Every command `zoospectra demo` suggests at its end runs as printed, on a real results root
(the CLI installs no `duckdb` program, so none may be suggested)."""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_studies import StudyZoo

from zoospectra.demo.run import SQL_EXAMPLE


def suggested_commands(out: Path) -> list[list[str]]:
    """The suggestion text split into commands (a command's quoted SQL may span lines)."""
    commands: list[str] = []
    for line in SQL_EXAMPLE.format(out=out).splitlines():
        if line.startswith("zoospectra "):
            commands.append(line)
        else:
            commands[-1] += "\n" + line
    return [shlex.split(c, comments=True) for c in commands]


def test_the_suggestions_are_zoospectra_commands(tmp_path: Path) -> None:
    commands = suggested_commands(tmp_path)
    assert len(commands) >= 4 and all(c[0] == "zoospectra" for c in commands)
    assert {c[1] for c in commands} <= {"sql", "report", "shell", "plot", "status"}


@pytest.mark.slow
def test_every_suggested_command_runs(study_zoo: StudyZoo, tmp_path: Path) -> None:
    out = study_zoo.root
    for cmd in suggested_commands(out):
        proc = subprocess.run([sys.executable, "-m", "zoospectra.cli", *cmd[1:]], input=".quit\n",
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (cmd, proc.stderr[-2000:])
        if cmd[1] == "sql":
            assert len(proc.stdout.strip().splitlines()) >= 3, (cmd, proc.stdout)   # header + rows
        if cmd[1] == "report":
            assert (Path(cmd[cmd.index("--out") + 1]) / "index.html").is_file()
