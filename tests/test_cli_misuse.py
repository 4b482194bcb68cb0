"""The CLI misuse corpus (issue 12): every everyday mistake is one line on stderr and an exit code.

Each case runs the real `zoospectra` CLI in a subprocess, in a scratch directory holding real
inputs (two real LoRAs on MiniLM, a real results root, a user's files and folders), and asserts:
the exit code, no traceback, one error line naming the culprit, and that no file outside the
tool's own outputs changed (a snapshot of paths, sizes, mtimes and hashes before and after).
Exit codes: 2 invalid input, 1 runtime failure (an unreachable cluster or Hub), 130 interrupted.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pytest

from zoospectra.config import AnalysisConfig
from zoospectra.io.refs import local_ref
from zoospectra.outputs import MARKER
from zoospectra.run.execute import run_plan
from zoospectra.run.plan import build_plan

USER_PNG = b"\x89PNG\r\n\x1a\n a user's own figure, not zoospectra's"


# --- scratch tree and snapshots -------------------------------------------------------------
@pytest.fixture(scope="session")
def results_root(tiny_loras: list[Path], minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real results root: tiny_a analysed in-process (k_store 32, the default)."""
    out = tmp_path_factory.mktemp("misuse") / "results"
    plan = build_plan(local_ref(minilm_dir), [local_ref(tiny_loras[0], "tiny_a")], AnalysisConfig())
    run_plan(plan, str(out), executor="local", device="cpu")
    return out


@pytest.fixture
def scratch(tmp_path: Path, tiny_loras: list[Path], results_root: Path) -> Path:
    """The user's working directory: inputs, their own files, a results root, another command's output."""
    s = tmp_path / "work"
    shutil.copytree(tiny_loras[0], s / "inputs" / "adapter")
    shutil.copytree(tiny_loras[1], s / "inputs" / "sibling")
    shutil.copytree(tiny_loras[0], s / "lr=1e-4")                    # a directory name with '='
    shutil.copytree(results_root, s / "results")
    (s / "notes.txt").write_text("the user's notes\n")
    (s / "userdir").mkdir()
    (s / "userdir" / "keep.txt").write_text("keep me\n")
    (s / "fig.png").write_bytes(USER_PNG)
    (s / "dir.png").mkdir()
    (s / "other-output").mkdir()
    (s / "other-output" / MARKER).write_text(json.dumps({"command": "report", "created": "x"}))
    (s / "other-output" / "index.html").write_text("<html>an earlier report</html>")
    return s


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root: files by (size, mtime_ns, sha256), directories by name."""
    out: dict[str, tuple] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            out[rel] = ("dir",)
        else:
            st = p.stat()
            out[rel] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def outside(snap: dict[str, tuple], outputs: tuple[str, ...]) -> dict[str, tuple]:
    """The snapshot without the tool's own outputs (paths equal to or under one of `outputs`)."""
    return {k: v for k, v in snap.items() if not any(k == o or k.startswith(o + "/") for o in outputs)}


def cli(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "COLUMNS": "200", **(env or {})}
    full.pop("ZOOSPECTRA_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "zoospectra.cli", *args], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, culprit: str) -> None:
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text
    assert proc.returncode == code, (proc.returncode, text)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error ("), proc.stderr
    assert culprit in lines[0], (culprit, lines[0])
    assert proc.stdout == "", proc.stdout


# --- the corpus: one case per mistake ----------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]        # {S} scratch, {A} adapter, {B} sibling, {M} MiniLM base, {R} results
    code: int
    culprit: str                 # must appear in the error line
    env: dict = field(default_factory=dict)
    outputs: tuple[str, ...] = ()   # scratch paths the tool may create or change
    max_s: float = 90.0
    setup: Callable[[Path], None] | None = None


def _chmod_note(s: Path) -> None:
    """A marker that names no command: not ours either."""
    (s / "userdir" / MARKER).write_text("not json")


NO_NET = {"HF_HUB_OFFLINE": "0"}
ANALYZE = ("analyze", "--base", "{M}", "{A}")
CASES = [
    # data loss: mitigate --out
    Case("mitigate-out-dot", ("mitigate", "{A}", "--out", ".", "--base", "{M}"), 2, "contains the input"),
    Case("mitigate-out-adapter-parent", ("mitigate", "{A}", "--out", "{S}/inputs", "--base", "{M}"), 2,
         "contains the input"),
    Case("mitigate-out-is-adapter", ("mitigate", "{A}", "--out", "{A}", "--base", "{M}"), 2, "inside the input"),
    Case("mitigate-out-inside-adapter", ("mitigate", "{A}", "--out", "{A}/mitigated", "--base", "{M}"), 2,
         "inside the input"),
    Case("mitigate-out-user-dir", ("mitigate", "{A}", "--out", "userdir", "--base", "{M}"), 2,
         "not written by zoospectra mitigate"),
    Case("mitigate-force-user-dir", ("mitigate", "{A}", "--out", "userdir", "--base", "{M}", "--force"), 2,
         "not written by zoospectra mitigate"),
    Case("mitigate-out-bad-marker", ("mitigate", "{A}", "--out", "userdir", "--base", "{M}", "--force"), 2,
         "not written by zoospectra mitigate", setup=_chmod_note),
    Case("mitigate-out-other-command", ("mitigate", "{A}", "--out", "other-output", "--base", "{M}", "--force"),
         2, "output of zoospectra report"),
    Case("mitigate-out-is-file", ("mitigate", "{A}", "--out", "notes.txt", "--base", "{M}"), 2, "is a file"),
    Case("mitigate-out-under-file", ("mitigate", "{A}", "--out", "notes.txt/sub", "--base", "{M}"), 2,
         "is a file, not a directory"),
    Case("mitigate-out-read-only", ("mitigate", "{A}", "--out", "/proc/zoospectra-out", "--base", "{M}"), 2,
         "cannot write in /proc"),
    Case("mitigate-lam-negative", ("mitigate", "{A}", "--out", "new", "--lam", "-1"), 2, "--lam must lie in [0, 1]"),
    Case("mitigate-lam-above-one", ("mitigate", "{A}", "--out", "new", "--lam", "1.5"), 2, "--lam must lie in [0, 1]"),
    Case("mitigate-not-an-adapter", ("mitigate", "userdir", "--out", "new", "--base", "{M}"), 2,
         "no adapter_config.json"),
    # report / plot / sql outputs
    Case("report-out-file", ("report", "{R}", "--out", "notes.txt"), 2, "is a file"),
    Case("report-out-user-dir", ("report", "{R}", "--out", "userdir"), 2, "not written by zoospectra report"),
    Case("report-out-inside-results", ("report", "{R}", "--out", "{R}/report"), 2, "inside the input"),
    Case("report-out-other-command", ("report", "{R}", "--out", "{S}/mit"), 2, "output of zoospectra mitigate",
         setup=lambda s: ((s / "mit").mkdir(), (s / "mit" / MARKER).write_text('{"command": "mitigate"}'))),
    Case("report-missing-results", ("report", "nope", "--out", "rep"), 2, "no results at nope"),
    Case("plot-foreign-file", ("plot", "{R}", "intruders-eps", "--out", "fig.png"), 2,
         "exists and was not written by zoospectra plot"),
    Case("plot-out-directory", ("plot", "{R}", "intruders-eps", "--out", "dir.png"), 2, "is a directory"),
    Case("plot-inside-results", ("plot", "{R}", "intruders-eps", "--out", "{R}/f.png"), 2, "inside the input"),
    Case("plot-bad-suffix", ("plot", "{R}", "intruders-eps", "--out", "f.jpg"), 2, "must end in .png or .svg"),
    Case("plot-missing-results", ("plot", "nope", "intruders-eps"), 2, "no results at nope"),
    # sql: DuckDB's own message, and the macros' refusals
    Case("sql-typo", ("sql", "{R}", "SELEC 1"), 2, 'syntax error at or near "SELEC"'),
    Case("sql-unknown-column", ("sql", "{R}", "SELECT no_such_column FROM matrices"), 2, "no_such_column"),
    Case("sql-k-exceeds-stored", ("sql", "{R}", "SELECT * FROM intruders(0.5, 100)"), 2,
         "k = 100 exceeds the 32 singular vectors stored"),
    Case("sql-eps-above-one", ("sql", "{R}", "SELECT * FROM intruders(2, 10)"), 2, "eps = 2 must lie in (0, 1]"),
    Case("sql-eps-zero", ("sql", "{R}", "SELECT * FROM intruders(eps := 0, k := 10)"), 2, "must lie in (0, 1]"),
    Case("sql-k-zero", ("sql", "{R}", "SELECT * FROM intruders(0.5, 0)"), 2, "k = 0 must be an integer >= 1"),
    Case("sql-curve-k-negative", ("sql", "{R}", "SELECT * FROM intruder_curve(-1)"), 2, "k = -1 must be"),
    Case("sql-fraction-eps", ("sql", "{R}", "SELECT * FROM intruder_fraction_curve(eps := 1.5)"), 2,
         "eps = 1.5 must lie"),
    Case("sql-missing-results", ("sql", "nope", "SELECT 1"), 2, "no results at nope"),
    Case("sql-user-dir-as-results", ("sql", "userdir", "SELECT 1"), 2, "no results at userdir"),
    Case("sql-output-existing-file", ("sql", "{R}", "SELECT 1", "--format", "csv", "--output", "notes.txt"), 2,
         "notes.txt exists"),
    Case("sql-bad-format", ("sql", "{R}", "SELECT 1", "--format", "xml"), 2, "output format must be one of"),
    Case("status-missing-results", ("status", "nope"), 2, "no results at nope"),
    Case("status-file-as-results", ("status", "notes.txt"), 2, "no results at notes.txt"),
    Case("shell-missing-results", ("shell", "nope"), 2, "no results at nope"),
    Case("compact-missing-results", ("compact", "nope"), 2, "no results at nope"),
    Case("compact-file-as-results", ("compact", "notes.txt"), 2, "no results at notes.txt"),
    Case("compact-negative-keep", ("compact", "{R}", "--keep-units-for", "-1"), 2, "--keep-units-for"),
    # analyze: options checked before anything runs
    Case("analyze-batch-size-zero", (*ANALYZE, "--out", "r", "--batch-size", "0"), 2, "--batch-size must be >= 1"),
    Case("analyze-batch-size-negative", (*ANALYZE, "--out", "r", "--batch-size", "-3"), 2,
         "--batch-size must be >= 1"),
    Case("analyze-batch-size-text", (*ANALYZE, "--out", "r", "--batch-size", "many"), 2, "--batch-size"),
    Case("analyze-max-in-flight-negative", (*ANALYZE, "--out", "r", "--max-in-flight", "-1"), 2,
         "--max-in-flight must be >= 1"),
    Case("analyze-max-in-flight-zero", (*ANALYZE, "--out", "r", "--max-in-flight", "0"), 2,
         "--max-in-flight must be >= 1"),
    Case("analyze-device-unknown", (*ANALYZE, "--out", "r", "--local", "--device", "tpu"), 2,
         "--device must be one of auto, cpu, cuda"),
    Case("analyze-eps-out-of-range", (*ANALYZE, "--out", "r", "--eps", "2"), 2, "eps must lie in (0, 1)"),
    Case("analyze-k-store-text", (*ANALYZE, "--out", "r", "--k-store", "lots"), 2, "--k-store"),
    Case("analyze-null-draws-negative", (*ANALYZE, "--out", "r", "--null-draws", "-1"), 2,
         "null_draws must lie in 0..10000"),
    Case("analyze-out-is-file", (*ANALYZE, "--out", "notes.txt"), 2, "notes.txt is a file"),
    Case("analyze-out-user-dir", (*ANALYZE, "--out", "userdir"), 2, "is not a zoospectra results root"),
    Case("analyze-out-inside-adapter", (*ANALYZE, "--out", "{A}/results"), 2, "inside the input"),
    Case("analyze-out-read-only", (*ANALYZE, "--out", "/proc/zoospectra-results"), 2, "cannot write in /proc"),
    Case("analyze-duplicate-names", ("analyze", "--base", "{M}", "same={A}", "same={B}", "--out", "r"), 2,
         "two artifacts have the name 'same'"),
    Case("analyze-missing-artifact", ("analyze", "--base", "{M}", "x=does/not/exist", "--out", "r"), 2,
         "does/not/exist"),
    Case("analyze-missing-base", ("analyze", "--base", "no-base", "{A}", "--out", "r"), 2, "no-base"),
    Case("analyze-name-without-path", ("analyze", "--base", "{M}", "lonely=", "--out", "r"), 2, "'lonely='"),
    Case("analyze-address-ray-refused", (*ANALYZE, "--out", "r", "--address", "ray://127.0.0.1:1"), 1,
         "cannot reach Ray cluster at ray://127.0.0.1:1", max_s=30),
    Case("analyze-address-refused", (*ANALYZE, "--out", "r", "--address", "127.0.0.1:1"), 1,
         "cannot reach Ray cluster at 127.0.0.1:1", max_s=30),
    Case("analyze-address-unresolvable", (*ANALYZE, "--out", "r", "--address", "ray://nonexistent.invalid:10001"),
         1, "does not resolve", max_s=30),
    Case("analyze-address-bad-port", (*ANALYZE, "--out", "r", "--address", "head:port"), 2, "head:port"),
    Case("analyze-unknown-option", (*ANALYZE, "--out", "r", "--frobnicate"), 2, "--frobnicate"),
    Case("analyze-missing-out", ANALYZE, 2, "--out"),
    # submit, crawl, demo
    Case("submit-unreachable", ("submit", "--address", "http://127.0.0.1:1", "--", "status", "x"), 1,
         "cannot reach the Ray Jobs API at http://127.0.0.1:1", max_s=30),
    Case("submit-no-command", ("submit", "--address", "http://127.0.0.1:1"), 2, "give the zoospectra command"),
    Case("crawl-unresolvable-endpoint", ("crawl", "--base-model", "org/base", "--out", "hub", "--local"), 1,
         "cannot reach http://nonexistent.invalid", env={**NO_NET, "HF_ENDPOINT": "http://nonexistent.invalid"},
         max_s=30),
    Case("crawl-closed-port", ("crawl", "--base-model", "org/base", "--out", "hub", "--local"), 1,
         "cannot reach http://127.0.0.1:1", env={**NO_NET, "HF_ENDPOINT": "http://127.0.0.1:1"}, max_s=30),
    Case("crawl-address-refused", ("crawl", "--base-model", "org/base", "--out", "hub", "--address", "127.0.0.1:1"),
         1, "cannot reach Ray cluster at 127.0.0.1:1", max_s=30),
    Case("crawl-batch-size-zero", ("crawl", "--base-model", "org/base", "--out", "hub", "--batch-size", "0"), 2,
         "--batch-size must be >= 1"),
    Case("crawl-out-user-dir", ("crawl", "--base-model", "org/base", "--out", "userdir"), 2,
         "is not a zoospectra results root"),
    Case("demo-cache-user-dir", ("demo", "--cache", "userdir", "--out", "demo-results"), 2,
         "--cache userdir is not empty and was not written by zoospectra demo-cache"),
    Case("demo-out-user-dir", ("demo", "--out", "userdir", "--cache", "cache"), 2, "is not a zoospectra results root"),
    Case("demo-cache-inside-results", ("demo", "--out", "{R}", "--cache", "{R}/zoo"), 2, "contains the input"),
    Case("unknown-command", ("frobnicate",), 2, "No such command 'frobnicate'"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_misuse(case: Case, scratch: Path, tiny_loras: list[Path], minilm_dir: Path) -> None:
    if case.setup:
        case.setup(scratch)
    places = {"S": str(scratch), "A": str(scratch / "inputs" / "adapter"), "B": str(scratch / "inputs" / "sibling"),
              "M": str(minilm_dir), "R": str(scratch / "results")}
    args = [a.format(**places) for a in case.args]
    before = snapshot(scratch)
    t0 = time.perf_counter()
    proc = cli(args, cwd=scratch, env=case.env)
    elapsed = time.perf_counter() - t0
    assert_one_line_error(proc, case.code, case.culprit)
    assert elapsed < case.max_s, f"{case.name} took {elapsed:.1f}s"
    assert outside(snapshot(scratch), case.outputs) == outside(before, case.outputs)


assert len(CASES) >= 40


# --- the cases that succeed: outputs of the tool's own, warnings, '=' in a path ----------------
@pytest.mark.slow
def test_mitigate_writes_reruns_and_force_replaces_only_its_output(scratch: Path, minilm_dir: Path) -> None:
    adapter = scratch / "inputs" / "adapter"
    before = snapshot(scratch)
    proc = cli(["mitigate", str(adapter), "--out", "mit", "--base", str(minilm_dir), "--lam", "0.5"], scratch)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "mitigate" in proc.stderr and "intruders in" in proc.stderr  # the bar and the summary
    marker = json.loads((scratch / "mit" / MARKER).read_text())
    assert marker["command"] == "mitigate"
    assert {p.name for p in (scratch / "mit").iterdir()} == {
        MARKER, "adapter_config.json", "adapter_model.safetensors", "mitigation.json"}
    # a file the user put into the output survives a rerun; --force empties the output first
    (scratch / "mit" / "user-note.txt").write_text("mine")
    proc = cli(["mitigate", str(adapter), "--out", "mit", "--base", str(minilm_dir), "--lam", "0.25"], scratch)
    assert proc.returncode == 0, proc.stderr
    assert (scratch / "mit" / "user-note.txt").is_file()
    assert json.loads((scratch / "mit" / "mitigation.json").read_text())["params"]["lam"] == 0.25
    proc = cli(["mitigate", str(adapter), "--out", "mit", "--base", str(minilm_dir), "--force"], scratch)
    assert proc.returncode == 0, proc.stderr
    assert not (scratch / "mit" / "user-note.txt").exists()
    assert outside(snapshot(scratch), ("mit",)) == before


@pytest.mark.slow
def test_report_and_plot_rerun_over_their_own_outputs(scratch: Path) -> None:
    before = snapshot(scratch)
    for _ in range(2):  # the second run writes over the first: its own output
        proc = cli(["report", "results", "--out", "rep"], scratch, timeout=300)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        assert (scratch / "rep" / "index.html").is_file()
        proc = cli(["plot", "results", "intruders-eps", "--out", "figs/f.svg"], scratch)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert json.loads((scratch / "rep" / MARKER).read_text())["command"] == "report"
    assert outside(snapshot(scratch), ("rep", "figs")) == before


def test_a_directory_with_equals_is_taken_whole(scratch: Path, minilm_dir: Path) -> None:
    before = snapshot(scratch)
    proc = cli(["analyze", "--base", str(minilm_dir), "lr=1e-4", "named=inputs/adapter=", "--out", "r", "--local"],
               scratch)
    # 'named=inputs/adapter=' does not exist: NAME is 'named', the path 'inputs/adapter=' is missing
    assert proc.returncode == 2 and "inputs/adapter=" in proc.stderr, proc.stderr
    proc = cli(["analyze", "--base", str(minilm_dir), "lr=1e-4", "--out", "r", "--local", "--k-spec", "8"], scratch)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    ids = duckdb.sql(f"SELECT DISTINCT model_id FROM read_parquet('{scratch}/r/models/*.parquet')").fetchall()
    assert ids == [("lr=1e-4",)]
    assert outside(snapshot(scratch), ("r",)) == before


def test_a_config_naming_another_base_is_warned_and_recorded(scratch: Path, minilm_dir: Path) -> None:
    cfg_path = scratch / "inputs" / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "other-org/other-base"
    cfg_path.write_text(json.dumps(cfg))
    before = snapshot(scratch)
    proc = cli(["analyze", "--base", str(minilm_dir), f"mine={scratch / 'inputs' / 'adapter'}",
                f"ok={scratch / 'inputs' / 'sibling'}", "--out", "r", "--local", "--k-spec", "8"], scratch)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    warned = [ln for ln in proc.stderr.splitlines() if "warning" in ln]
    assert len(warned) == 1 and "mine" in warned[0] and "other-org/other-base" in warned[0], proc.stderr
    rows = dict(duckdb.sql(f"SELECT model_id, warnings FROM read_parquet('{scratch}/r/models/*.parquet')").fetchall())
    assert rows["ok"] == [] and len(rows["mine"]) == 1 and "other-org/other-base" in rows["mine"][0]
    assert outside(snapshot(scratch), ("r",)) == before


def test_a_config_naming_the_base_directory_by_another_path_is_not_warned(minilm_dir: Path,
                                                                           tmp_path: Path) -> None:
    """The same local directory reached through a symlink is the same base (os.path.samefile)."""
    from zoospectra.run.plan import base_warnings

    base = local_ref(minilm_dir, "minilm")
    (tmp_path / "link").symlink_to(minilm_dir, target_is_directory=True)
    assert base_warnings({"base_model_name_or_path": str(tmp_path / "link")}, base) == []
    assert base_warnings({"base_model_name_or_path": str(minilm_dir) + "/"}, base) == []
    other = tmp_path / "other-base"
    other.mkdir()
    warned = base_warnings({"base_model_name_or_path": str(other)}, base)
    assert len(warned) == 1 and "other-base" in warned[0] and "minilm" in warned[0]


def _sigint_as_a_terminal_gives_it() -> None:
    """In the child: SIGINT handled by default. A suite started in the background by a
    non-interactive shell (`cmd &`, nohup) inherits SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler at all: the user's Ctrl-C these tests send would be a no-op."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(scratch: Path, minilm_dir: Path, extra: list[str], wait_for: str, after: float,
               second: float | None = None) -> tuple[int, str]:
    """Start an analyze, send SIGINT `after` seconds past the first stderr line starting with
    `wait_for` (and again `second` seconds later); its exit code and all its output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "RAY_USAGE_STATS_ENABLED": "0"}
    args = [sys.executable, "-m", "zoospectra.cli", "analyze", "--base", str(minilm_dir), "inputs/adapter",
            "inputs/sibling", "--out", "r", "--k-store", "all", "--k-spec", "all", "--batch-size", "1", *extra]
    proc = subprocess.Popen(args, cwd=scratch, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_as_a_terminal_gives_it)
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith(wait_for):
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert started.wait(180), "".join(lines)
        time.sleep(after)
        proc.send_signal(signal.SIGINT)
        if second is not None:
            time.sleep(second)
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # a second Ctrl-C, e.g. during Ray's teardown
        code = proc.wait(90)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(10)
    return code, "".join(lines) + proc.stdout.read()


def test_sigint_during_a_run_exits_130_with_one_line(scratch: Path, minilm_dir: Path) -> None:
    code, text = _interrupt(scratch, minilm_dir, ["--local"], "plan", after=1.0)
    assert code == 130 and "Traceback" not in text, text
    assert [ln for ln in text.splitlines() if ln.strip()][-1].strip() == "interrupted", text


@pytest.mark.slow
def test_sigint_twice_during_a_ray_run_exits_130_with_one_line(scratch: Path, minilm_dir: Path) -> None:
    # the first interrupt lands while Ray starts or runs; the second while the driver is leaving
    code, text = _interrupt(scratch, minilm_dir, [], "plan", after=3.0, second=0.5)
    assert code == 130 and "Traceback" not in text, text
    assert [ln.strip() for ln in text.splitlines() if ln.strip()][-1] == "interrupted", text
    assert text.count("interrupted") == 1, text


def test_an_interrupt_swallowed_by_a_fork_handler_is_delivered_again(tmp_path: Path) -> None:
    # CI once sent Ctrl-C just as Ray forked: it landed in filelock's at-fork handler, Python
    # printed "Exception ignored ... KeyboardInterrupt" with a traceback and dropped it
    script = tmp_path / "fork.py"
    script.write_text(
        "import os, sys, time\n"
        "from zoospectra.cli import _redeliver_interrupts\n"
        "if sys.argv[1] == 'hook':\n"
        "    sys.unraisablehook = _redeliver_interrupts(sys.unraisablehook)\n"
        "def before():\n"
        "    raise KeyboardInterrupt  # the Ctrl-C, arriving inside a fork handler\n"
        "os.register_at_fork(before=before)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "try:\n"
        "    time.sleep(3)\n"
        "    print('lost')\n"
        "except KeyboardInterrupt:\n"
        "    print('delivered')\n")
    plain = subprocess.run([sys.executable, str(script), "plain"], capture_output=True, text=True, timeout=60,
                           preexec_fn=_sigint_as_a_terminal_gives_it)
    assert plain.stdout.strip() == "lost" and "KeyboardInterrupt" in plain.stderr  # the mechanism is real
    hooked = subprocess.run([sys.executable, str(script), "hook"], capture_output=True, text=True, timeout=60,
                            preexec_fn=_sigint_as_a_terminal_gives_it)
    assert hooked.stdout.strip() == "delivered" and hooked.stderr == "", hooked.stderr
