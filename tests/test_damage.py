"""A damaged results root (issue 12 B): one test per class of damage, on a real analysed root.

Each test copies one real root (three tiny LoRAs on MiniLM, analysed by plan + execute), damages
the copy, and checks that: `zoospectra verify` names the damaged unit / entry and exits 4; every
view and macro still answers, without the damaged unit's rows (counted independently from the
undamaged root's files); a rerun moves the damage to quarantine/ byte for byte (nothing deleted)
and recomputes it; `sql` then answers exactly as on the undamaged root, and the plain glob of the
README gives the same rows as the views.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import duckdb
import pytest
import torch
from fixtures_store import build_zoo, memory_zoo_root
from rows import VOLATILE
from typer.testing import CliRunner

from zoospectra.cli import VERIFY_DAMAGED, app, run_analysis
from zoospectra.config import AnalysisConfig
from zoospectra.io.refs import local_ref
from zoospectra.run.execute import run_plan
from zoospectra.run.plan import build_plan
from zoospectra.run.store import UNIT_TABLES, ResultsStore
from zoospectra.study.sql import connect

torch.set_num_threads(1)
IDS = ("tiny_a", "tiny_b", "tiny_c")
BATCH = 64  # one unit per query matrix: 6 units of 3 members
VIEWS = ("units", *UNIT_TABLES, "models", "runs", "errors", "catalog", "open_errors")
MACROS = ("intruders()", "intruder_curve()", "intruder_fraction_curve(fractions := [0.02, 0.05])",
          "effective_rank_summary()",
          "model_summary()")


def refs(paths: list[Path]) -> list:
    return [local_ref(p, n) for n, p in zip(IDS, paths, strict=True)]


def plan_and_run(minilm: Path, paths: list[Path], out: Path) -> None:
    """The library path (as the fixtures and test_faults use it): no full checksum pass."""
    plan = build_plan(local_ref(minilm), refs(paths), AnalysisConfig(), batch_size=BATCH,
                      done_pairs=ResultsStore(out).done_pairs())
    assert run_plan(plan, str(out), executor="local", device="cpu").n_failed == 0


def analyze(minilm: Path, paths: list[Path], out: Path, executor: str = "local") -> None:
    """What `zoospectra analyze` runs (repair with checksums, then plan + execute)."""
    s = run_analysis(local_ref(minilm), refs(paths), AnalysisConfig(), str(out), batch_size=BATCH,
                     executor=executor, quiet=True, device="cpu")
    assert s.n_failed == 0 and s.n_member_errors == 0


@pytest.fixture(scope="module")
def clean(minilm_dir: Path, tiny_loras: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "results"
    plan_and_run(minilm_dir, tiny_loras, out)
    assert len(ResultsStore(out).done_units()) == 6
    return out


@pytest.fixture
def root(clean: Path, tmp_path: Path) -> Path:
    out = tmp_path / "results"
    shutil.copytree(clean, out)
    return out


def units_of(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "units").iterdir())


# --- what the tests compare ---------------------------------------------------------------------
def _rows(con: duckdb.DuckDBPyConnection, sql: str) -> list[tuple]:
    rel = con.sql(sql)
    cols = [c for c in rel.columns if c not in VOLATILE]
    return sorted(rel.select(", ".join(f'"{c}"' for c in cols)).fetchall(), key=repr)


def answers(root: Path) -> dict[str, list[tuple]]:
    """Every view and macro of `sql`, bookkeeping columns (run and unit ids, timings) dropped."""
    con = connect(root)
    try:
        got = {v: _rows(con, f"SELECT * FROM {v}") for v in VIEWS if v not in ("runs", "units")}
        got |= {m: _rows(con, f"SELECT * FROM {m}") for m in MACROS}
        got["units"] = [(n,) for (n,) in con.sql("SELECT count(*) FROM units").fetchall()]
        return got
    finally:
        con.close()


def assert_same_answers(got: dict, want: dict, exact: bool = True) -> None:
    """Equal answers. In-process reruns reproduce every stored number bit for bit, but aggregates
    may sum in another order (DuckDB's threads); Ray workers vs in-process: float32 SVDs agree
    to rounding."""
    rel = 1e-12 if exact else 1e-4
    assert got.keys() == want.keys()
    for q in want:
        assert len(got[q]) == len(want[q]), q
        for g, w in zip(got[q], want[q], strict=True):
            assert all(a == pytest.approx(b, rel=rel, abs=rel * 1e-2) if isinstance(a, float) else a == b
                       for a, b in zip(g, w, strict=True)), (q, g, w)


def every_query_works(root: Path) -> dict[str, int]:
    """Row counts of every view and macro: none may fail, whatever lies in units/."""
    con = connect(root)
    try:
        return {q: con.sql(f"SELECT count(*) FROM {q}").fetchall()[0][0] for q in (*VIEWS, *MACROS)}
    finally:
        con.close()


def rows_without(clean: Path, table: str, skip: set[str]) -> int:
    """Independent count: the undamaged root's files of `table`, minus the units in `skip`."""
    files = [str(p) for p in sorted((clean / "units").glob(f"*/{table}.parquet")) if p.parent.name not in skip]
    return duckdb.sql(f"SELECT count(*) FROM read_parquet({files!r})").fetchall()[0][0] if files else 0


def plain_glob(root: Path, table: str) -> int:
    """What a plain DuckDB reader gets from the documented glob."""
    return duckdb.sql(f"SELECT count(*) FROM read_parquet('{root}/units/*/{table}.parquet', "
                      "union_by_name = true)").fetchall()[0][0]


def verify_cli(root: Path) -> tuple[int, str, dict]:
    """`zoospectra verify ROOT` (text) and `--json`: exit code, text, record."""
    runner = CliRunner()
    text = runner.invoke(app, ["verify", str(root)])
    as_json = runner.invoke(app, ["verify", str(root), "--json"])
    assert text.exit_code == as_json.exit_code, (text.output, as_json.output)
    return text.exit_code, text.output, json.loads(as_json.output)


def assert_named(root: Path, names: dict[str, str]) -> dict:
    """verify exits 4 and names each entry of units/ in `names` with the expected problem text."""
    code, text, record = verify_cli(root)
    assert code == VERIFY_DAMAGED, text
    assert "rerun analyze/crawl to recompute; damaged files will be moved to quarantine/" in text
    found = {d["unit"]: " ".join(d["problems"]) for d in record["damaged"] + record["stray"]}
    assert set(found) == set(names), found
    for name, problem in names.items():
        assert problem in found[name], (name, found[name])
        assert f"units/{name}: " in text
    assert not record["healthy"] and json.loads((root / "_verify.json").read_text()) == record
    assert ResultsStore(root).status()["last_verify"]["healthy"] is False
    return record


def digest_tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def assert_repaired(root: Path, clean: Path, moved: dict[str, dict[str, str]], exact: bool = True) -> None:
    """After the rerun: each damaged entry sits whole in quarantine/, the root verifies healthy,
    `sql` answers as on the undamaged root, and the plain glob agrees with the views."""
    quarantined = {p.name.rsplit("-", 1)[0]: p for p in (root / "quarantine").iterdir()}
    for name, files in moved.items():
        safe = name.replace(" ", "_").lstrip(".")
        assert safe in quarantined, (name, sorted(quarantined))
        assert digest_tree(quarantined[safe]) == files, f"{name} was not moved byte for byte"
    assert units_of(root) == units_of(clean)
    code, text, record = verify_cli(root)
    assert code == 0 and record["healthy"] and record["units_ok"] == 6, text
    assert_same_answers(answers(root), answers(clean), exact)
    con = connect(root)
    try:
        for table in UNIT_TABLES:
            n = con.sql(f"SELECT count(*) FROM {table}").fetchall()[0][0]
            if any((root / "units").glob(f"*/{table}.parquet")):
                assert n == plain_glob(root, table), table
            else:
                assert n == 0, table
    finally:
        con.close()


# --- one test per class of damage -------------------------------------------------------------
def test_truncated_file(root: Path, clean: Path, minilm_dir: Path, tiny_loras: list[Path]) -> None:
    victim = units_of(root)[0]
    path = root / "units" / victim / "matrices.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    moved = {victim: digest_tree(root / "units" / victim)}
    with pytest.raises(duckdb.Error):  # what a plain reader of the glob gets: the bug of the issue
        plain_glob(root, "matrices")
    assert_named(root, {victim: "matrices.parquet is"})
    counts = every_query_works(root)
    for table in ("matrices", "vectors", "spectra", "similarity"):
        assert counts[table] == rows_without(clean, table, {victim}) > 0, table
    assert counts["units"] == 5
    con = connect(root)
    assert victim not in {u for u, in con.sql("SELECT unit_id FROM units").fetchall()}
    con.close()
    plan_and_run(minilm_dir, tiny_loras, root)  # the cheap check alone catches a size change
    assert_repaired(root, clean, moved)


def test_flipped_bytes_keep_the_size(root: Path, clean: Path, minilm_dir: Path, tiny_loras: list[Path]) -> None:
    victim = units_of(root)[1]
    path = root / "units" / victim / "vectors.parquet"
    data = bytearray(path.read_bytes())
    for i in range(6):  # six bytes in the middle of the data pages
        data[len(data) // 3 + i] ^= 0x5A
    path.write_bytes(bytes(data))
    moved = {victim: digest_tree(root / "units" / victim)}
    assert ResultsStore(root).done_units() == set(units_of(clean))  # sizes agree: only hashing sees it
    assert_named(root, {victim: "vectors.parquet checksum differs"})
    counts = every_query_works(root)  # the last verify's finding keeps the unit out of the views
    assert counts["vectors"] == rows_without(clean, "vectors", {victim}) > 0
    assert victim not in ResultsStore(root).done_units()
    plan_and_run(minilm_dir, tiny_loras, root)
    assert_repaired(root, clean, moved)


def test_flipped_bytes_found_by_a_rerun_without_verify(root: Path, clean: Path, minilm_dir: Path,
                                                       tiny_loras: list[Path]) -> None:
    victim = units_of(root)[2]
    path = root / "units" / victim / "spectra.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit
    path.write_bytes(bytes(data))
    moved = {victim: digest_tree(root / "units" / victim)}
    analyze(minilm_dir, tiny_loras, root)  # analyze verifies in full before planning
    record = json.loads((root / "_verify.json").read_text())
    assert [q["unit"] for q in record["quarantined"]] == [victim]
    assert "spectra.parquet checksum differs" in " ".join(record["quarantined"][0]["problems"])
    assert_repaired(root, clean, moved)


@pytest.mark.parametrize("marker", ["_SUCCESS", "_done.json", "both"])
def test_deleted_markers(marker: str, root: Path, clean: Path, minilm_dir: Path,
                         tiny_loras: list[Path]) -> None:
    victim = units_of(root)[3]
    for name in (["_SUCCESS", "_done.json"] if marker == "both" else [marker]):
        (root / "units" / victim / name).unlink()
    moved = {victim: digest_tree(root / "units" / victim)}
    problem = "no _SUCCESS marker" if marker != "_done.json" else "_done.json is missing"
    assert_named(root, {victim: problem})
    counts = every_query_works(root)
    assert counts["vectors"] == rows_without(clean, "vectors", {victim}) > 0
    assert counts["units"] == 5
    analyze(minilm_dir, tiny_loras, root)
    assert_repaired(root, clean, moved)


@pytest.mark.slow
def test_deleted_marker_repaired_on_local_ray(root: Path, clean: Path, minilm_dir: Path,
                                              tiny_loras: list[Path]) -> None:
    """The rerun on a real local Ray (the default executor of analyze)."""
    victim = units_of(root)[4]
    (root / "units" / victim / "_SUCCESS").unlink()
    moved = {victim: digest_tree(root / "units" / victim)}
    assert_named(root, {victim: "no _SUCCESS marker"})
    analyze(minilm_dir, tiny_loras, root, executor="ray")
    assert_repaired(root, clean, moved, exact=False)


def test_stray_and_temp_folders(root: Path, clean: Path, minilm_dir: Path, tiny_loras: list[Path]) -> None:
    some = root / "units" / units_of(root)[0]
    tmp = root / "units" / ".tmp-partial"
    tmp.mkdir()
    (tmp / "matrices.parquet").write_bytes((some / "matrices.parquet").read_bytes()[:100])
    junk = root / "units" / "scratch"  # a valid unit id, but nothing zoospectra committed
    junk.mkdir()
    shutil.copy(some / "vectors.parquet", junk / "vectors.parquet")
    (root / "units" / "notes.txt").write_text("my notes")
    moved = {".tmp-partial": digest_tree(tmp), "scratch": digest_tree(junk)}
    with pytest.raises(duckdb.Error):
        plain_glob(root, "matrices")
    assert_named(root, {".tmp-partial": "not a unit id", "scratch": "no _SUCCESS marker",
                        "notes.txt": "a file"})
    assert_same_answers(answers(root), answers(clean))  # nothing stray reaches or breaks a query
    analyze(minilm_dir, tiny_loras, root)
    assert (root / "quarantine").is_dir() and any(p.name.startswith("notes.txt-") for p in
                                                  (root / "quarantine").iterdir())
    assert_repaired(root, clean, moved)


def test_copied_unit(root: Path, clean: Path, minilm_dir: Path, tiny_loras: list[Path]) -> None:
    original = units_of(root)[5]
    for name in (f"{original}.bak", f"{original} copy"):
        shutil.copytree(root / "units" / original, root / "units" / name)
    moved = {n: digest_tree(root / "units" / n) for n in (f"{original}.bak", f"{original} copy")}
    total, one = rows_without(clean, "vectors", set()), rows_without(clean, "vectors", {original})
    assert plain_glob(root, "vectors") == total + 2 * (total - one)  # the plain glob double counts
    assert_named(root, {f"{original}.bak": f"holds unit '{original}'",
                        f"{original} copy": f"a copy of unit '{original}'"})
    assert_same_answers(answers(root), answers(clean))  # no double count
    analyze(minilm_dir, tiny_loras, root)
    assert_repaired(root, clean, moved)
    assert (root / "units" / original / "_SUCCESS").exists()  # the original stays where it was


def test_swapped_files_between_two_units(root: Path, clean: Path, minilm_dir: Path,
                                         tiny_loras: list[Path]) -> None:
    a, b = units_of(root)[:2]
    fa, fb = root / "units" / a / "similarity.parquet", root / "units" / b / "similarity.parquet"
    da, db = fa.read_bytes(), fb.read_bytes()
    fa.write_bytes(db)
    fb.write_bytes(da)
    moved = {a: digest_tree(root / "units" / a), b: digest_tree(root / "units" / b)}
    problem = "similarity.parquet checksum differs" if len(da) == len(db) else "similarity.parquet is"
    assert_named(root, {a: problem, b: problem})
    counts = every_query_works(root)
    assert counts["similarity"] == rows_without(clean, "similarity", {a, b}) > 0
    analyze(minilm_dir, tiny_loras, root)
    assert_repaired(root, clean, moved)


# --- the store's side: markers, older units, remote roots ---------------------------------------
def test_commit_records_sizes_and_checksums(tmp_path: Path) -> None:
    unit_id, tables, done = build_zoo().units[0]
    ResultsStore(tmp_path).commit_unit(unit_id, tables, done)
    folder = tmp_path / "units" / unit_id
    manifest = json.loads((folder / "_done.json").read_text())
    for name, rec in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert rec == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert sorted(manifest["files"]) == sorted(p.name for p in folder.iterdir() if p.suffix == ".parquet")
    done_raw = (folder / "_done.json").read_bytes()
    assert json.loads((folder / "_SUCCESS").read_text())["_done.json"] == {
        "size": len(done_raw), "sha256": hashlib.sha256(done_raw).hexdigest()}
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(folder / "vectors.parquet")  # page checksums are on: they verify
    assert pq.read_table(folder / "vectors.parquet", page_checksum_verification=True).num_rows == \
        meta.metadata.num_rows == manifest["rows"]["vectors"]


def test_units_written_before_checksums_still_count(tmp_path: Path) -> None:
    zoo = build_zoo()
    store = ResultsStore(tmp_path)
    for unit_id, tables, done in zoo.units:
        store.commit_unit(unit_id, tables, done)
    for folder in (tmp_path / "units").iterdir():  # as an older zoospectra wrote them
        manifest = json.loads((folder / "_done.json").read_text())
        del manifest["files"]
        (folder / "_done.json").write_text(json.dumps(manifest))
        (folder / "_SUCCESS").write_bytes(b"")
    code, text, record = verify_cli(tmp_path)
    assert code == 0 and record["units_ok"] == len(zoo.units), text
    assert ResultsStore(tmp_path).status()["units_done"] == len(zoo.units)
    assert every_query_works(tmp_path)["vectors"] == len(zoo.vectors)
    victim = zoo.units[0][0]  # without checksums, a truncated file is still found by reading it
    path = tmp_path / "units" / victim / "vectors.parquet"
    path.write_bytes(path.read_bytes()[:-40])
    code, text, record = verify_cli(tmp_path)
    assert code == VERIFY_DAMAGED and [d["unit"] for d in record["damaged"]] == [victim], text
    assert "not readable Parquet" in text


def test_memory_root_verify_and_quarantine() -> None:
    pytest.importorskip("fsspec")
    with memory_zoo_root() as (uri, name, mem, zoo):
        victim = zoo.units[1][0]
        path = f"/{name}/units/{victim}/vectors.parquet"
        data = bytearray(mem.cat_file(path))
        data[len(data) // 2] ^= 0xFF
        mem.pipe_file(path, bytes(data))
        with mem.open(f"/{name}/units/u-inflight/vectors.parquet", "wb") as f:  # a writer not done yet
            f.write(b"PAR1")
        record = ResultsStore(uri).verify()
        assert [d["unit"] for d in record["damaged"]] == [victim] and record["in_flight"] == ["u-inflight"]
        n = sum(1 for v in zoo.vectors if v["unit_id"] != victim)
        con = connect(uri)
        assert con.sql("SELECT count(*) FROM vectors").fetchall()[0][0] == n
        con.close()
        moved = ResultsStore(uri).repair()
        assert [m["unit"] for m in moved] == [victim]
        assert mem.cat_file(f"/{name}/{moved[0]['to']}/vectors.parquet") == bytes(data)  # moved, whole
        assert not mem.exists(f"/{name}/units/{victim}")
        assert mem.exists(f"/{name}/units/u-inflight/vectors.parquet")  # in flight: left alone
        assert ResultsStore(uri).done_units() == {u for u, _, _ in zoo.units} - {victim}


def test_verify_of_a_missing_root_is_one_line_exit_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "zoospectra.cli", "verify", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no results root" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "nope").exists()  # checking never creates a root


def test_units_of_an_older_schema_are_read_with_the_new(tmp_path: Path) -> None:
    """Units of another schema version (fewer columns) switch the views to union_by_name."""
    import pyarrow.parquet as pq

    zoo = build_zoo()
    store = ResultsStore(tmp_path)
    for unit_id, tables, done in zoo.units:
        store.commit_unit(unit_id, tables, done)
    old = tmp_path / "units" / zoo.units[0][0]  # rewrite one unit as an older zoospectra wrote it
    pq.write_table(pq.read_table(old / "vectors.parquet").drop_columns(["base_sigma"]), old / "vectors.parquet")
    manifest = json.loads((old / "_done.json").read_text())
    del manifest["files"]
    manifest["schema_version"] = "0"
    (old / "_done.json").write_text(json.dumps(manifest))
    (old / "_SUCCESS").write_bytes(b"")
    con = connect(tmp_path)
    try:
        got = con.execute("SELECT unit_id, count(*), count(base_sigma) FROM vectors GROUP BY ALL").fetchall()
    finally:
        con.close()
    want = {u: sum(1 for v in zoo.vectors if v["unit_id"] == u) for u, _, _ in zoo.units}
    assert {u: (n, nb) for u, n, nb in got} == {u: (n, 0 if u == old.name else n) for u, n in want.items()}


def test_an_edited_manifest_is_damage(tmp_path: Path) -> None:
    """_SUCCESS records _done.json: a manifest changed after commit (here: a pair it never did)
    is named, and its pairs do not count as done."""
    zoo = build_zoo()
    store = ResultsStore(tmp_path)
    for unit_id, tables, done in zoo.units:
        store.commit_unit(unit_id, tables, done)
    victim = zoo.units[0][0]
    path = tmp_path / "units" / victim / "_done.json"
    manifest = json.loads(path.read_text())
    manifest["done"].append(["zz", "never.analysed"])
    path.write_text(json.dumps(manifest, indent=1))
    code, text, record = verify_cli(tmp_path)
    assert code == VERIFY_DAMAGED and [d["unit"] for d in record["damaged"]] == [victim], text
    assert "_done.json differs from the checksum recorded in _SUCCESS" in text
    assert ("zz", "never.analysed") not in ResultsStore(tmp_path).done_pairs()
    assert victim not in ResultsStore(tmp_path).done_units()


def test_a_rerun_hashes_only_what_is_new_and_verify_hashes_everything(
        root: Path, minilm_dir: Path, tiny_loras: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's repair costs what is new, not the size of the root (a nightly no-op crawl of a
    census would otherwise read every byte of it): units hashed before keep only the cheap checks,
    which still catch a changed size; a same-size change is `verify`'s (or an old hash's) to find."""
    def last() -> dict:
        return json.loads((root / "_verify.json").read_text())

    analyze(minilm_dir, tiny_loras, root)
    assert last()["incremental"] and last()["units_hashed"] == 6 and last()["units_ok"] == 6
    analyze(minilm_dir, tiny_loras, root)
    assert last()["units_hashed"] == 0 and last()["units_ok"] == 6 and last()["healthy"]

    truncated, flipped, later = units_of(root)[:3]

    def flip(unit: str) -> None:
        path = root / "units" / unit / "vectors.parquet"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))

    path = root / "units" / truncated / "matrices.parquet"
    path.write_bytes(path.read_bytes()[:-7])
    flip(flipped)
    analyze(minilm_dir, tiny_loras, root)  # the cheap checks see the size; the flip is trusted
    assert [q["unit"] for q in last()["quarantined"]] == [truncated] and last()["units_hashed"] == 0

    # a run re-hashes what was hashed longer ago than ZOOSPECTRA_REHASH_AFTER_DAYS
    with monkeypatch.context() as m:
        m.setattr("zoospectra.run.integrity.REHASH_AFTER_S", 0.0)
        analyze(minilm_dir, tiny_loras, root)
    assert [q["unit"] for q in last()["quarantined"]] == [flipped] and last()["units_hashed"] == 6

    flip(later)  # and `verify` hashes everything, whenever it was hashed before
    code, text, record = verify_cli(root)
    assert code != 0 and [d["unit"] for d in record["damaged"]] == [later], text
    assert record["incremental"] is False and record["units_hashed"] == 6
