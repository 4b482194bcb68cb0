"""The DuckDB study layer on real Parquet: every macro against a plain-Python count."""
from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import stat
import sys
import uuid
from collections import defaultdict
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from fixtures_store import MODELS, RUN_ID, TENSORS, Zoo, build_zoo, one_unit, unit_id_for

from zoospectra.errors import ConfigError, ResultsError
from zoospectra.run.store import TABLE_GLOBS, ResultsStore
from zoospectra.schemas.tables import TABLES, schema_for
from zoospectra.study import sql

EPS_GRID = [i / 10 for i in range(1, 10)]


@pytest.fixture(scope="module")
def zoo() -> Zoo:
    return build_zoo()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, zoo: Zoo) -> Path:
    root = tmp_path_factory.mktemp("results")
    store = ResultsStore(root)
    for unit_id, tables, done in zoo.units:
        assert store.commit_unit(unit_id, tables, done)
    store.write_models(zoo.models)
    store.start_run(RUN_ID, "{}", "test")
    store.finish_run(RUN_ID, "finished", n_units=3, n_done=3)
    return root


@pytest.fixture(scope="module")
def con(root: Path):
    con = sql.connect(root)
    yield con
    con.close()


def _one(con, query: str):
    return con.sql(query).fetchall()[0][0]


def _rows(con, query: str, params: list | None = None) -> list[dict]:
    return con.sql(query, params=params).to_arrow_table().to_pylist()


# --- plain-Python references ------------------------------------------------------------------
def ref_intruders(zoo: Zoo, eps: float, k: int) -> dict[tuple[str, str], tuple[int, int]]:
    counts: dict[tuple[str, str], list[int]] = {(m["model_uid"], m["tensor"]): [0, 0] for m in zoo.matrices}
    for v in zoo.vectors:
        if v["j"] <= k and v["max_cos"] < eps:
            counts[v["model_uid"], v["tensor"]][v["side"] == "V"] += 1
    return {key: (u, w) for key, (u, w) in counts.items()}


def ref_fraction(zoo: Zoo, eps: float, fraction: float) -> dict[str, tuple[int, int]]:
    """(intruders, vectors tested) per model with k = max(1, ceil(fraction * min(m, n)))."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for tensor, (_, _, m, n, _) in TENSORS.items():
        k = max(1, math.ceil(fraction * min(m, n)))
        for uid in MODELS:
            out[uid][1] += k
            out[uid][0] += sum(1 for v in zoo.vectors if v["model_uid"] == uid and v["tensor"] == tensor
                               and v["side"] == "U" and v["j"] <= k and v["max_cos"] < eps)
    return {uid: (a, b) for uid, (a, b) in out.items()}


# --- macros -----------------------------------------------------------------------------------
@pytest.mark.parametrize("eps,k", [(0.5, 10), (0.3, 5), (0.9, 12), (0.5, 1), (0.1, 8)])
def test_intruders_match_python(con, zoo: Zoo, eps: float, k: int) -> None:
    got = _rows(con, "SELECT * FROM intruders(eps := ?, k := ?)", [eps, k])
    want = ref_intruders(zoo, eps, k)
    assert {(r["model_uid"], r["tensor"]): (r["n_intruders"], r["n_intruders_v"]) for r in got} == want
    assert len(got) == len(want) == 9  # every matrix, those with 0 intruders included
    assert {r["model_id"] for r in got} == {m[0] for m in MODELS.values()}
    assert sum(u for u, _ in want.values()) > 0  # the data does contain intruders


def test_intruders_defaults_are_the_paper_defaults(con, zoo: Zoo) -> None:
    got = _rows(con, "SELECT model_uid, tensor, n_intruders FROM intruders()")
    want = ref_intruders(zoo, 0.5, 10)
    got_u = {(r["model_uid"], r["tensor"]): r["n_intruders"] for r in got}
    assert got_u == {key: u for key, (u, _) in want.items()}
    assert all(r["n_intruders"] == 0 for r in got if r["model_uid"] == "c3")


def test_k_beyond_the_stored_vectors_is_refused(con) -> None:
    # enc.0.ffn stores 12 of 16 vectors: k = 13 cannot be answered; t0/t2 store all, so they can
    with pytest.raises(duckdb.Error, match=r"k = 13 exceeds the 12 .*enc\.0\.ffn\.weight.*--k-store"):
        con.sql("SELECT * FROM intruders(k := 13)").fetchall()
    with pytest.raises(duckdb.Error, match="exceeds"):
        con.sql("SELECT * FROM intruder_curve(k := 13)").fetchall()
    with pytest.raises(duckdb.Error, match="exceeds"):
        con.sql("SELECT * FROM intruder_fraction_curve(fractions := [1.0])").fetchall()
    ok = _rows(con, "SELECT * FROM intruders(k := 12) WHERE tensor <> 'enc.0.ffn.weight'")
    assert len(ok) == 6


@pytest.mark.parametrize("k", [3, 10])
def test_intruder_curve_matches_python(con, zoo: Zoo, k: int) -> None:
    got = _rows(con, "SELECT * FROM intruder_curve(k := ?)", [k])
    assert len(got) == 9 * len(MODELS)
    for r in got:
        ref = ref_intruders(zoo, r["eps"], k)
        assert r["eps"] in EPS_GRID
        assert r["n_intruders"] == sum(u for (uid, _), (u, _) in ref.items() if uid == r["model_uid"])
        assert r["n_intruders_v"] == sum(w for (uid, _), (_, w) in ref.items() if uid == r["model_uid"])
    curve = [r["n_intruders"] for r in got if r["model_uid"] == "a1"]
    assert curve == sorted(curve) and curve[-1] > curve[0]  # more intruders at looser eps


def test_intruder_fraction_curve_matches_python(con, zoo: Zoo) -> None:
    fractions = [0.1, 0.25, 0.5, 0.75]
    got = _rows(con, "SELECT * FROM intruder_fraction_curve(eps := 0.6, fractions := [0.1, 0.25, 0.5, 0.75])")
    assert len(got) == len(fractions) * len(MODELS)
    for r in got:
        n, tested = ref_fraction(zoo, 0.6, r["fraction"])[r["model_uid"]]
        assert (r["n_intruders"], r["n_vectors"]) == (n, tested)
        assert r["intruder_share"] == pytest.approx(n / tested) and r["eps"] == 0.6
    two = _rows(con, "SELECT DISTINCT fraction FROM intruder_fraction_curve(fractions := [0.05, 0.5]) "
                     "ORDER BY 1")
    assert [r["fraction"] for r in two] == [0.05, 0.5]


def test_effective_rank_summary_matches_python(con, zoo: Zoo) -> None:
    got = _rows(con, "SELECT * FROM effective_rank_summary()")
    groups: dict[tuple[str, str | None], list[dict]] = defaultdict(list)
    for m in zoo.matrices:
        groups[m["model_uid"], None].append(m)
        groups[m["model_uid"], m["module"]].append(m)
    assert len(got) == len(groups)
    for r in got:
        ms = groups[r["model_uid"], r["module"]]
        assert r["level"] == ("model" if r["module"] is None else "module")
        assert r["n_matrices"] == len(ms)
        assert r["eff_rank_mean"] == pytest.approx(sum(m["eff_rank"] for m in ms) / len(ms))
        assert r["eff_rank_min"] == min(m["eff_rank"] for m in ms)
        assert r["eff_rank_max"] == max(m["eff_rank"] for m in ms)
        assert r["rel_update_mean"] == pytest.approx(sum(m["rel_update"] for m in ms) / len(ms))


def test_model_summary_matches_python(con, zoo: Zoo) -> None:
    got = {r["model_uid"]: r for r in _rows(con, "SELECT * FROM model_summary(eps := 0.4, k := 6)")}
    ref = ref_intruders(zoo, 0.4, 6)
    assert set(got) == set(MODELS)
    for uid, (model_id, kind, r, alpha) in MODELS.items():
        row = got[uid]
        mats = [m for m in zoo.matrices if m["model_uid"] == uid]
        assert (row["model_id"], row["kind"], row["r"], row["alpha"]) == (model_id, kind, r, alpha)
        assert row["n_matrices"] == len(TENSORS) and (row["eps"], row["k"]) == (0.4, 6)
        assert row["n_intruders"] == sum(u for (m, _), (u, _) in ref.items() if m == uid)
        assert row["n_intruders_v"] == sum(w for (m, _), (_, w) in ref.items() if m == uid)
        assert row["eff_rank_mean"] == pytest.approx(sum(m["eff_rank"] for m in mats) / len(mats))
    assert got["c3"]["n_intruders"] == 0


def test_views_count_every_committed_row_once(con, zoo: Zoo, root: Path) -> None:
    assert _one(con, "SELECT count(*) FROM vectors") == len(zoo.vectors)
    assert _one(con, "SELECT count(*) FROM matrices") == len(zoo.matrices)
    assert _one(con, "SELECT count(*) FROM models") == len(MODELS)
    assert _one(con, "SELECT count(*) FROM similarity") == 0  # only empty tables: typed view
    assert _rows(con, "SELECT status, n_done FROM runs") == [{"status": "finished", "n_done": 3}]
    assert sorted(r["unit_id"] for r in _rows(con, "SELECT unit_id FROM units")) == sorted(
        unit_id_for(t) for t in TENSORS)
    # a rerun that commits a unit again publishes nothing new
    unit_id, tables, done = build_zoo().units[0]
    assert ResultsStore(root).commit_unit(unit_id, tables, done) is False
    assert _one(con, "SELECT count(*) FROM vectors") == len(zoo.vectors)


def test_staging_copies_are_invisible(tmp_path: Path, zoo: Zoo) -> None:
    unit_id, tables, done = zoo.units[0]
    ResultsStore(tmp_path).commit_unit(unit_id, tables, done)
    junk = tmp_path / "_staging" / f"{unit_id}.deadbeef"
    shutil.copytree(tmp_path / "units" / unit_id, junk)  # a crashed writer's complete copy
    n = sum(1 for v in zoo.vectors if v["unit_id"] == unit_id)
    assert sql.query(tmp_path, "SELECT count(*) AS n FROM vectors").column("n").to_pylist() == [n]


def test_open_errors_close_when_their_work_is_done(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    base = dict(run_id=RUN_ID, stage="load", error_type="HubUnavailableError", message="503: retry later")
    store.write_errors(RUN_ID, "u-a", [dict(base, unit_id="u-a")])  # a whole unit failed
    store.write_errors(RUN_ID, "u-b", [dict(base, unit_id="u-b")])
    store.write_errors(RUN_ID, "u-c", [dict(base, unit_id="u-c", model_uid="b2", tensor="t")])  # a member
    store.write_errors(RUN_ID, "plan", [dict(base, unit_id="plan", model_uid="c3")])  # a model

    def open_units() -> list[str]:
        got = sql.query(tmp_path, "SELECT unit_id FROM open_errors ORDER BY unit_id")["unit_id"].to_pylist()
        assert len(got) == store.status()["open_errors"]  # the Python rule agrees with the view
        return got

    assert open_units() == ["plan", "u-a", "u-b", "u-c"]
    store.commit_unit("u-a", one_unit("u-a"), done=[("a1", "t")])
    assert open_units() == ["plan", "u-b", "u-c"]
    store.commit_unit("u-c", one_unit("u-c"), done=[("a1", "t")])  # committed, but b2 still failed
    assert open_units() == ["plan", "u-b", "u-c"]
    store.commit_unit("u-d", one_unit("u-d", model_uid="b2"), done=[("b2", "t")])  # a rerun did b2
    assert open_units() == ["plan", "u-b"]
    store.commit_unit("u-e", one_unit("u-e", model_uid="c3"), done=[("c3", "t")])
    assert open_units() == ["u-b"]
    assert sql.query(tmp_path, "SELECT count(*) AS n FROM errors")["n"].to_pylist() == [4]


# --- empty roots, remote roots, unusual paths --------------------------------------------------
def test_empty_root_has_typed_empty_views(tmp_path: Path) -> None:
    con = sql.connect(tmp_path / "nothing-yet")
    for table in TABLES:
        # what DuckDB itself reads from an empty Parquet file of this schema: an independent oracle
        f = tmp_path / f"{table}.parquet"
        pq.write_table(schema_for(table).empty_table(), f)
        want = con.sql(f"DESCRIBE SELECT * FROM read_parquet('{f}')").fetchall()
        got = con.sql(f"DESCRIBE {table}").fetchall()
        assert [(c[0], c[1]) for c in got] == [(c[0], c[1]) for c in want], table
        assert _one(con, f"SELECT count(*) FROM {table}") == 0
    for macro in ("intruders()", "intruder_curve()", "intruder_fraction_curve()",
                  "effective_rank_summary()", "model_summary()"):
        assert con.sql(f"SELECT * FROM {macro}").fetchall() == []
    assert _one(con, "SELECT count(*) FROM open_errors") == 0
    con.close()


def test_root_with_quotes_is_not_sql(tmp_path: Path, zoo: Zoo) -> None:
    root = tmp_path / "it's'); DROP VIEW models; SELECT ('x"
    store = ResultsStore(root)
    unit_id, tables, done = zoo.units[0]
    store.commit_unit(unit_id, tables, done)
    store.write_models(zoo.models)
    con = sql.connect(root)
    assert _one(con, "SELECT count(*) FROM models") == len(MODELS)
    assert _one(con, "SELECT count(*) FROM matrices") == len(MODELS)
    con.close()


def test_root_with_glob_characters_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ResultsError, match="glob"):
        sql.connect(tmp_path / "results[1]")


def test_memory_root_is_queryable(zoo: Zoo) -> None:
    fsspec = pytest.importorskip("fsspec")
    name = f"zs-{uuid.uuid4().hex[:8]}"
    try:
        store = ResultsStore(f"memory://{name}")
        for unit_id, tables, done in zoo.units[:2]:
            store.commit_unit(unit_id, tables, done)
        # a unit whose writer died before _SUCCESS: its file must not be read
        with fsspec.filesystem("memory").open(f"/{name}/units/u-dead/vectors.parquet", "wb") as f:
            pq.write_table(zoo.units[2][1]["vectors"], f)
        got = sql.query(f"memory://{name}", "SELECT count(*) AS n FROM vectors")["n"].to_pylist()
        assert got == [sum(1 for v in zoo.vectors if v["unit_id"] in {zoo.units[0][0], zoo.units[1][0]})]
    finally:
        fsspec.filesystem("memory").rm(f"/{name}", recursive=True)


def test_plain_duckdb_reads_the_documented_globs(root: Path, zoo: Zoo) -> None:
    header = sql._view_blocks(sql._sql_file("views.sql"))[0][1]
    documented = set(re.findall(r"read_parquet\('RESULTS/([^']+)'", header))
    assert documented == set(TABLE_GLOBS.values())
    text = sql._sql_file("views.sql")
    for table, glob in TABLE_GLOBS.items():  # unit tables: the committed files listed at connect()
        assert (f"{{files:{table}}}" if glob.startswith("units/") else f"'{{root}}/{glob}'") in text, table
    plain = duckdb.connect()  # no zoospectra: just the glob from the comment
    glob = f"{root}/units/*/vectors.parquet"
    n = _one(plain, f"SELECT count(*) FROM read_parquet('{glob}', union_by_name = true)")
    assert n == len(zoo.vectors)


def test_query_takes_parameters(root: Path) -> None:
    got = sql.query(root, "SELECT model_id FROM models WHERE model_uid = ?", ["b2"])
    assert got.column("model_id").to_pylist() == ["org/full-ft"]


# --- output formats and the shell ----------------------------------------------------------------
@pytest.fixture(scope="module")
def result(root: Path) -> pa.Table:
    return sql.query(root, "SELECT model_uid, model_id, target_modules, created_at, alpha, "
                           "CAST('nan' AS DOUBLE) AS nan FROM models ORDER BY model_uid")


def test_format_csv_and_json_round_trip(result: pa.Table) -> None:
    back = pacsv.read_csv(io.BytesIO(sql.format_table(result, "csv").encode()))
    assert back.column("model_uid").to_pylist() == ["a1", "b2", "c3"]
    assert json.loads(back.column("target_modules")[0].as_py()) == ["query", "value"]
    rows = json.loads(sql.format_table(result, "json"))
    assert [r["model_uid"] for r in rows] == ["a1", "b2", "c3"]
    assert rows[0]["target_modules"] == ["query", "value"] and rows[0]["nan"] is None
    assert rows[1]["alpha"] is None and rows[0]["alpha"] == 16.0


def test_format_table_and_files(result: pa.Table, tmp_path: Path) -> None:
    text = sql.format_table(result, "table")
    assert "model_id" in text and "org/lora-r8" in text and "3 rows" in text
    assert "1 not shown" in sql.format_table(result, "table", max_rows=2)
    out = tmp_path / "r.parquet"
    assert sql.format_table(result, "parquet", str(out)) == ""
    back = pq.read_table(out)
    assert back.drop_columns(["nan"]).to_pylist() == result.drop_columns(["nan"]).to_pylist()
    assert math.isnan(back.column("nan")[0].as_py())
    assert sql.format_table(result, "csv", str(tmp_path / "r.csv")) == ""
    assert (tmp_path / "r.csv").read_text().startswith('"model_uid"')
    with pytest.raises(ConfigError, match="--out"):
        sql.format_table(result, "parquet")
    with pytest.raises(ConfigError, match="format"):
        sql.format_table(result, "xml")  # type: ignore[arg-type]


def test_python_shell(root: Path) -> None:
    script = io.StringIO(".tables\nSELECT count(*) AS n_matrices\n  FROM matrices;\n.mode csv\n"
                         "SELECT model_uid, n_intruders FROM model_summary() ORDER BY 1;\n"
                         "SELECT * FROM no_such_view;\nSELECT 2 AS after_error;\n.quit\nSELECT 3;\n")
    out = io.StringIO()
    sql.shell(root, stdin=script, stdout=out, use_cli=False)
    text = out.getvalue()
    assert "matrices" in text and "intruders()" in text and "_k_ok" not in text  # .tables
    assert "n_matrices" in text and "9" in text
    assert '"model_uid","n_intruders"\n"a1",' in text
    assert "Error:" in text and "no_such_view" in text and "after_error" in text
    assert "3\n" not in text.split("after_error")[1]  # nothing runs after .quit


@pytest.mark.skipif(sys.platform == "win32", reason="a shell-script stand-in for the duckdb CLI")
def test_shell_hands_the_views_to_the_duckdb_cli(root: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # a stand-in `duckdb` on PATH that records the init file it is given
    fake = tmp_path / "bin" / "duckdb"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\n[ "$1" = "-init" ] && cp "$2" "{tmp_path}/init.sql"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    sql.shell(root)
    init = (tmp_path / "init.sql").read_text()
    con = duckdb.connect()  # the init file alone sets up a working session
    con.execute(init)
    assert _one(con, "SELECT count(*) FROM intruders()") == 9
