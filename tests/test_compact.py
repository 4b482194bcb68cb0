"""Compaction (issue 18, item 2) on real analysed roots: three real PEFT LoRAs on MiniLM.

Every check compares against the same root before compaction, whose rows come straight from the
unit files the analysis wrote: `sql` gives identical answers before, while (a compaction killed at
each of its steps, in a real subprocess; a reader connected before it started) and after; verify
understands the compacted files; a later analyze adds to a compacted root, skips what is there
and writes no duplicate; only folders proven to be in a committed generation are removed.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import torch
from fixtures_store import build_zoo, memory_zoo_root
from test_damage import IDS, answers, assert_same_answers, verify_cli
from typer.testing import CliRunner

import zoospectra.run.compact as compact_mod
from zoospectra.cli import VERIFY_DAMAGED, app
from zoospectra.config import AnalysisConfig
from zoospectra.io.refs import local_ref
from zoospectra.run.compact import FAILPOINT_ENV, compact, maybe_compact
from zoospectra.run.execute import run_plan
from zoospectra.run.plan import build_plan
from zoospectra.run.store import ResultsStore
from zoospectra.study.sql import connect

torch.set_num_threads(1)
STEPS = ("compact:written", "compact:manifest", "compact:published", "compact:folded", "compact:removing")


def plan_and_run(minilm: Path, paths: list[Path], out: Path, ids: tuple[str, ...] = IDS) -> None:
    """Plan against the root's done pairs, run in-process (as test_damage, any subset of IDS)."""
    refs = [local_ref(p, n) for n, p in zip(ids, paths, strict=True)]
    plan = build_plan(local_ref(minilm), refs, AnalysisConfig(), batch_size=64,
                      done_pairs=ResultsStore(out).done_pairs())
    assert run_plan(plan, str(out), executor="local", device="cpu").n_failed == 0


@pytest.fixture(scope="module")
def clean(minilm_dir: Path, tiny_loras: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "results"
    plan_and_run(minilm_dir, tiny_loras, out)
    return out


@pytest.fixture
def root(clean: Path, tmp_path: Path) -> Path:
    out = tmp_path / "results"
    shutil.copytree(clean, out)
    return out


def files_in(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file() and "_staging" not in p.parts)


def compact_cli(root: Path, *args: str, failpoint: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({FAILPOINT_ENV: failpoint} if failpoint else {})}
    return subprocess.run([sys.executable, "-m", "zoospectra.cli", "compact", str(root), *args],
                          capture_output=True, text=True, timeout=300, env=env)


def test_compaction_keeps_every_answer_and_drops_the_files(root: Path, clean: Path) -> None:
    want = answers(clean)
    before = files_in(root)
    proc = compact_cli(root, "--by-base")
    assert proc.returncode == 0, proc.stderr
    assert not [p for p in (root / "units").iterdir()]  # every unit folder proven and removed
    gens = list((root / "compacted").iterdir())
    assert len(gens) == 1 and (gens[0] / "_SUCCESS").exists()
    assert all(p.parent.parent.name == "bases" for p in gens[0].rglob("*.parquet")
               if p.name != "_units.parquet")
    assert files_in(root) < before
    assert_same_answers(answers(root), want)
    code, text, record = verify_cli(root)
    assert code == 0 and record["units_compacted"] == 6 and "compacted: 6 units" in text, text
    # plan and commit see the compacted units as done
    store = ResultsStore(root)
    assert store.done_pairs() == ResultsStore(clean).done_pairs() and len(store.done_units()) == 6
    assert store.status()["units_done"] == 6


@pytest.mark.parametrize("step", STEPS)
def test_compaction_killed_at_each_step_leaves_a_valid_root(step: str, root: Path, clean: Path) -> None:
    want = answers(clean)
    proc = compact_cli(root, failpoint=step)
    assert proc.returncode == 137, (step, proc.stderr)  # died like kill -9 at that step
    assert_same_answers(answers(root), want)  # what a reader sees "during" compaction
    code, text, _ = verify_cli(root)
    assert code == 0, text
    assert ResultsStore(root).done_pairs() == ResultsStore(clean).done_pairs()
    proc = compact_cli(root)  # the next compaction finishes the job
    assert proc.returncode == 0, proc.stderr
    assert not list((root / "units").iterdir())
    assert_same_answers(answers(root), want)
    assert verify_cli(root)[0] == 0


def test_a_reader_connected_before_keeps_reading(root: Path, clean: Path) -> None:
    want = answers(clean)
    con = connect(root)  # lists the unit files now
    try:
        first = con.sql("SELECT model_uid, tensor, intruders_u FROM matrices ORDER BY ALL").fetchall()
        result = compact(root, grace_s=3600)  # folders kept for readers that listed them
        assert result.units == 6 and result.units_removed == 0 and len(result.leftovers_kept) == 0
        assert con.sql("SELECT model_uid, tensor, intruders_u FROM matrices ORDER BY ALL").fetchall() == first
        assert_same_answers(answers(root), want)  # new readers: the generation, never both
        assert sorted(ResultsStore(root).status()["units_damaged"]) == []
    finally:
        con.close()
    again = compact(root, grace_s=3600)  # too young: kept, and nothing new to merge
    assert again.gen_id is None and len(again.leftovers_kept) == 6
    done = compact(root, grace_s=0)
    assert done.units_removed == 6 and not list((root / "units").iterdir())
    assert_same_answers(answers(root), want)


def test_a_later_analyze_adds_to_a_compacted_root(minilm_dir: Path, tiny_loras: list[Path],
                                                  tmp_path: Path) -> None:
    """Two adapters, compacted, then all three: only the third's pairs run, none twice, and the
    answers are those of the same two runs into a root never compacted."""
    ref, out = tmp_path / "reference", tmp_path / "results"
    for root in (ref, out):
        plan_and_run(minilm_dir, tiny_loras[:2], root, ids=IDS[:2])
    assert compact(out).units_removed == 6
    pairs_before = ResultsStore(out).done_pairs()
    for root in (ref, out):
        plan_and_run(minilm_dir, tiny_loras, root)
    assert len(ResultsStore(out).done_pairs() - pairs_before) == 6
    assert duplicates_everywhere(out) == 0
    assert_same_answers(answers(out), answers(ref))
    plan_and_run(minilm_dir, tiny_loras, out)  # all done: nothing runs (skip is right)
    assert len(list((out / "units").iterdir())) == 6 and duplicates_everywhere(out) == 0
    assert compact(out).units == 6  # a second generation
    assert len(list((out / "compacted").iterdir())) == 2 and verify_cli(out)[0] == 0
    assert_same_answers(answers(out), answers(ref))


def duplicates_everywhere(root: Path) -> int:
    """Rows beyond the first per natural key in the views (loose + compacted together)."""
    con = connect(root)
    try:
        n = 0
        for table, key in (("matrices", "model_uid, tensor"), ("vectors", "model_uid, tensor, side, j")):
            ((total, distinct),) = con.sql(f"SELECT count(*), count(DISTINCT ({key})) FROM {table}").fetchall()
            n += total - distinct
        return n
    finally:
        con.close()


def test_damaged_generation_is_found_and_repaired(root: Path, clean: Path, minilm_dir: Path,
                                                  tiny_loras: list[Path]) -> None:
    compact(root)
    gen = next((root / "compacted").iterdir())
    path = gen / "vectors.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    code, text, record = verify_cli(root)
    assert code == VERIFY_DAMAGED and "vectors.parquet checksum differs" in text, text
    assert gen.name in record["generations_damaged"]
    ResultsStore(root).repair()  # what a rerun does first: the generation goes to quarantine/
    assert not (root / "compacted" / gen.name).exists()
    assert any(p.name.startswith(f"compacted-{gen.name}") for p in (root / "quarantine").iterdir())
    assert ResultsStore(root).done_pairs() == set()
    plan_and_run(minilm_dir, tiny_loras, root)  # recomputed
    assert verify_cli(root)[0] == 0
    assert_same_answers(answers(root), answers(clean))


def test_never_removes_a_folder_that_holds_more_than_the_unit(root: Path, clean: Path) -> None:
    compact(root, grace_s=3600)
    victim = sorted((root / "units").iterdir())[0]
    (victim / "notes.txt").write_text("mine")
    result = compact(root, grace_s=0)
    assert result.units_removed == 5 and result.leftovers_kept == [victim.name]
    assert (victim / "notes.txt").read_text() == "mine" and (victim / "_SUCCESS").exists()
    assert_same_answers(answers(root), answers(clean))


def test_compact_cli_misuse_is_one_line(tmp_path: Path) -> None:
    proc = compact_cli(tmp_path / "nope")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
    result = CliRunner().invoke(app, ["compact", str(tmp_path), "--keep-units-for", "-1"])
    assert result.exit_code == 2


def test_auto_compaction_past_a_threshold(tmp_path: Path) -> None:
    zoo = build_zoo()
    store = ResultsStore(tmp_path)
    for unit_id, tables, done in zoo.units:
        store.commit_unit(unit_id, tables, done)
    files = sum(len(list(p.iterdir())) for p in (tmp_path / "units").iterdir())
    assert maybe_compact(tmp_path, threshold_files=files + 1, grace_s=0) is None
    result = maybe_compact(tmp_path, threshold_files=files, grace_s=0)
    assert result is not None and result.units == 3 and result.units_removed == 3
    assert maybe_compact(tmp_path, threshold_files=None) is None


# --- object stores (fsspec memory://): failures injected at each step -------------------------
class Killed(BaseException):
    pass


@pytest.mark.parametrize("step", STEPS)
def test_memory_root_compaction_interrupted_at_each_step(step: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("fsspec")
    with memory_zoo_root() as (uri, name, mem, zoo):
        want = vectors_of(uri)

        def die(at: str) -> None:
            if at == step:
                raise Killed(at)

        monkeypatch.setattr(compact_mod, "_failpoint", die)
        with pytest.raises(Killed):
            compact(uri)
        assert vectors_of(uri) == want
        assert ResultsStore(uri).done_pairs() == {p for _, _, d in zoo.units for p in d}
        monkeypatch.undo()
        compact(uri)
        assert vectors_of(uri) == want and not mem.exists(f"/{name}/units/{zoo.units[0][0]}/_SUCCESS")
        record = ResultsStore(uri).verify()
        assert record["healthy"] and record["units_compacted"] == 3
        # a commit of a compacted unit is refused: its rows are there already
        assert ResultsStore(uri).commit_unit(*zoo.units[0]) is False


def vectors_of(uri: str) -> list[tuple]:
    con = connect(uri)
    try:
        return con.sql("SELECT unit_id, model_uid, side, j, max_cos FROM vectors ORDER BY ALL").fetchall()
    finally:
        con.close()


def test_generation_files_match_their_manifest(root: Path) -> None:
    """The manifest's records, checked independently of compact.check_generation."""
    import json

    compact(root, partition_by_base=True)
    gen = next((root / "compacted").iterdir())
    manifest = json.loads((gen / "_manifest.json").read_text())
    for rel, rec in manifest["files"].items():
        data = (gen / rel).read_bytes()
        assert rec["size"] == len(data) and rec["sha256"] == hashlib.sha256(data).hexdigest()
        n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{gen / rel}')").fetchall()[0][0]
        assert n == rec["rows"]
    assert sum(r["rows"]["vectors"] for r in manifest["units"].values()) == \
        sum(r["rows"] for r in manifest["files"].values() if r["table"] == "vectors")


# --- crawls compact past a threshold -----------------------------------------------------------
def test_a_crawl_compacts_past_its_threshold(fake_hub, hub_options, tmp_path: Path) -> None:
    """A real crawl (loopback Hub, in-process executor) into two roots, one compacting after every
    crawl: the same rows; a second crawl over a new adapter adds to the compacted root."""
    from test_crawl import TINY, _tiny_adapter, _tiny_zoo, options_for

    from zoospectra.jobs.spec import CrawlSpec
    from zoospectra.run.crawl import run_crawl

    _tiny_zoo(fake_hub)
    options = options_for(fake_hub, hub_options)

    def crawl(out: Path, threshold: int) -> None:
        spec = CrawlSpec.from_dict({"name": "t", "base_models": [TINY], "out": str(out),
                                    "compact_after_files": threshold})
        (report,) = run_crawl(spec, options=options, executor="local").bases
        assert report.error_rows == 0 and report.units_failed == 0

    plain, compacted = tmp_path / "plain", tmp_path / "compacted"
    crawl(plain, 0)
    crawl(compacted, 1)
    assert not (plain / "compacted").exists()
    assert len(list((compacted / "compacted").iterdir())) == 1
    assert_same_answers(results(compacted), results(plain))
    fake_hub.add_repo("u/good-2", _tiny_adapter(7), base_model=TINY, relation="adapter")
    crawl(plain, 0)
    crawl(compacted, 1)
    assert len(list((compacted / "compacted").iterdir())) == 2
    assert_same_answers(results(compacted), results(plain))
    assert duplicates_everywhere(compacted) == 0 and verify_cli(compacted)[0] == 0
    with pytest.raises(Exception, match="compact_after_files"):
        CrawlSpec.from_dict({"name": "t", "base_models": [TINY], "out": "x", "compact_after_files": -1})


def results(root: Path) -> dict:
    """The analysis answers (catalog, models and errors carry discovery times: not compared)."""
    return {k: v for k, v in answers(root).items() if k not in ("catalog", "models", "errors")}


def test_one_compaction_at_a_time(root: Path) -> None:
    import fcntl

    from zoospectra.errors import ResultsError

    fd = os.open(root / "_index" / ".compact.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another compaction holds it
        with pytest.raises(ResultsError, match="another compaction"):
            compact(root)
    finally:
        os.close(fd)
    assert compact(root).units == 6


def test_units_of_an_older_schema_are_compacted_with_the_new_columns_as_nulls(tmp_path: Path) -> None:
    """A root written by an older zoospectra (fewer columns) still compacts after an upgrade; the
    views answer the same before and after. A unit of a newer, unknown version stays loose."""
    import json

    import pyarrow.parquet as pq

    from zoospectra.run.integrity import file_record, success_marker

    zoo = build_zoo()
    store = ResultsStore(tmp_path)
    for unit_id, tables, done in zoo.units:
        store.commit_unit(unit_id, tables, done)
    old, newer = (tmp_path / "units" / zoo.units[i][0] for i in (0, 1))
    added = ["warnings", "component", "kernel_shape"]  # matrices columns of schema 1.1 and 1.3
    pq.write_table(pq.read_table(old / "matrices.parquet").drop_columns(added), old / "matrices.parquet")
    for folder, version in ((old, "1.0"), (newer, "99.0")):  # as those versions commit them
        manifest = json.loads((folder / "_done.json").read_text())
        manifest["files"]["matrices.parquet"] = file_record((folder / "matrices.parquet").read_bytes())
        manifest["schema_version"] = version
        done = json.dumps(manifest).encode()
        (folder / "_done.json").write_bytes(done)
        (folder / "_SUCCESS").write_bytes(success_marker(done))
    query = ("SELECT unit_id, count(*), count(warnings), sum(intruders_u), list(component ORDER BY model_uid) "
             "FROM matrices GROUP BY ALL ORDER BY 1")

    def ask() -> list[tuple]:
        con = connect(tmp_path)
        try:
            return con.execute(query).fetchall()
        finally:
            con.close()

    before = ask()
    result = compact(tmp_path)
    assert result.units == len(zoo.units) - 1                       # all but the newer-version unit
    assert sorted(p.name for p in (tmp_path / "units").iterdir()) == [newer.name]
    after = ask()
    assert after == before and len(after) == len(zoo.units)
    assert [r for r in after if r[0] == old.name][0][2] == 0      # the old unit has no warnings column
