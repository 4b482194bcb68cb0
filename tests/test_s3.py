"""Results roots on a real S3 server on loopback (moto's server mode, a separate process).

Configuration is what a user sets for any S3-compatible store: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION and AWS_ENDPOINT_URL. Writes go through pyarrow's S3
filesystem (the store), reads through the same filesystem as Arrow datasets registered in DuckDB:
no DuckDB extension (httpfs) is ever loaded, so an offline cluster can query its results.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from fixtures_store import build_zoo, one_unit

from zoospectra.run.integrity import check_unit
from zoospectra.run.store import SUCCESS, ResultsStore
from zoospectra.study.sql import connect

pytest.importorskip("moto", reason="the S3 tests need moto's server (pip install 'moto[server]')")
boto3 = pytest.importorskip("boto3")

ACCESS = {"AWS_ACCESS_KEY_ID": "zoospectra-test", "AWS_SECRET_ACCESS_KEY": "zoospectra-secret",
          "AWS_DEFAULT_REGION": "us-east-1"}
# what identifies a row whatever run wrote it (run_id, unit_id, seconds, device differ per run)
VOLATILE = {"run_id", "unit_id", "seconds", "device", "created_at", "at"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on a loopback port, and the AWS_* variables pointing at it (for this
    process, and inherited by the CLI subprocesses and their Ray workers)."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "moto server did not start"
            time.sleep(0.2)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**ACCESS, "AWS_ENDPOINT_URL": endpoint}.items():
            mp.setenv(key, value)
        try:
            yield endpoint
        finally:
            proc.terminate()
            proc.wait(30)


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    """A fresh bucket: s3://<name>."""
    name = f"zs-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


def _cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "zoospectra.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _rows(root: str, table: str, key: str) -> list[tuple]:
    con = connect(root)
    try:
        rel = con.sql(f"SELECT * FROM {table}")
        cols = [c for c in rel.columns if c not in VOLATILE]
        rows = con.sql(f"SELECT {', '.join(cols)} FROM {table} ORDER BY {key}").fetchall()
        return rows
    finally:
        con.close()


def _twice(root: str, table: str, key: str) -> int:
    """Rows beyond the first per natural key."""
    con = connect(root)
    try:
        return con.sql(f"SELECT count(*) - count(DISTINCT ({key})) FROM {table}").fetchall()[0][0]
    finally:
        con.close()


def _httpfs_loaded(con) -> bool:
    rows = con.sql("SELECT loaded FROM duckdb_extensions() WHERE extension_name = 'httpfs'").fetchall()
    return bool(rows and rows[0][0])


@pytest.mark.slow
def test_analyze_to_s3_gives_the_rows_of_a_local_root_and_sql_report_verify_read_it(
        bucket: str, tiny_loras: list[Path], minilm_dir: Path, tmp_path: Path) -> None:
    root = f"{bucket}/results"
    ran = _cli("analyze", str(tiny_loras[0]), str(tiny_loras[1]), "--base", str(minilm_dir), "--out", root)
    assert ran.returncode == 0, ran.stderr
    local = tmp_path / "local"
    ran = _cli("analyze", str(tiny_loras[0]), str(tiny_loras[1]), "--base", str(minilm_dir), "--out", str(local),
               "--local")
    assert ran.returncode == 0, ran.stderr
    for table, key in [("matrices", "model_uid, tensor"), ("vectors", "model_uid, tensor, side, j"),
                       ("models", "model_uid")]:
        got, want = _rows(root, table, key), _rows(str(local), table, key)
        assert got == want and got, table

    con = connect(root)
    try:
        per_model = con.sql("SELECT model_uid, sum(intruders_u) FROM matrices GROUP BY ALL ORDER BY 1").fetchall()
        assert len(per_model) == 2
        assert con.execute("SELECT count(*) FROM runs").fetchall()[0][0] == 1
        assert not _httpfs_loaded(con)  # read through pyarrow's S3 client, not DuckDB's extension
    finally:
        con.close()

    sql = _cli("sql", root, "SELECT count(*) AS n FROM matrices", "--format", "csv")
    assert sql.returncode == 0 and sql.stdout.split() == ['"n"', "12"], sql.stderr
    verify = _cli("verify", root)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    report = _cli("report", root, "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "report" / "index.html").is_file()


def test_a_reader_never_sees_a_partial_unit(bucket: str) -> None:
    root = f"{bucket}/results"
    store = ResultsStore(root)
    zoo = build_zoo()
    per_unit = {u: tables["vectors"].num_rows for u, tables, _ in zoo.units}
    # a writer that died (or is still writing) after some of a unit's files: no _SUCCESS
    first_id, first_tables, first_done = zoo.units[0]
    store._fs.put(f"units/{first_id}/vectors.parquet", b"PAR1 half a file")
    con = connect(root)
    assert con.execute("SELECT count(*) FROM vectors").fetchall()[0][0] == 0
    con.close()
    assert check_unit(store._fs, first_id, None, full=True).state == "in_flight"

    seen: list[dict[str, int]] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            con = connect(root)
            try:
                seen.append(dict(con.sql("SELECT unit_id, count(*) FROM vectors GROUP BY ALL").fetchall()))
            finally:
                con.close()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for unit_id, tables, pairs in zoo.units:
            assert store.commit_unit(unit_id, tables, pairs)
    finally:
        done.set()
        reader.join(120)
    con = connect(root)
    seen.append(dict(con.sql("SELECT unit_id, count(*) FROM vectors GROUP BY ALL").fetchall()))
    con.close()
    assert len(seen) >= 2 and seen[-1] == per_unit
    for snapshot in seen:  # every unit a reader saw, it saw whole
        assert all(per_unit[u] == n for u, n in snapshot.items()), snapshot


def _as_run(tables: dict[str, pa.Table], run_id: str) -> dict[str, pa.Table]:
    """The same unit as another run writes it: same rows, its own run_id (other file bytes)."""
    return {name: t.set_column(t.schema.get_field_index("run_id"), "run_id", pa.array([run_id] * t.num_rows))
            for name, t in tables.items()}


@pytest.mark.slow
def test_concurrent_writers_on_s3_leave_one_whole_copy_of_each_unit(bucket: str) -> None:
    root = f"{bucket}/results"
    writers, units = 6, [f"u{i}" for i in range(4)]
    results: dict[str, list[bool]] = {u: [] for u in units}
    barrier = threading.Barrier(writers)

    def write(k: int) -> None:
        store = ResultsStore(root)  # one store per writer, as separate runs have
        barrier.wait()
        for u in units:
            tables = _as_run(one_unit(u, model_uid=f"m-{u}", n_vectors=40), f"run-{k}")
            results[u].append(store.commit_unit(u, tables, done=[(f"m-{u}", "t")]))

    threads = [threading.Thread(target=write, args=(k,)) for k in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    store = ResultsStore(root)
    for u in units:
        assert results[u].count(True) >= 1, results[u]
        check = check_unit(store._fs, u, None, full=True)  # files, manifest and marker agree
        assert check.ok, (u, check.problems)
    con = connect(root)
    try:
        got = con.sql("SELECT unit_id, count(*), count(DISTINCT run_id), count(DISTINCT j) "
                      "FROM vectors GROUP BY ALL ORDER BY 1").fetchall()
    finally:
        con.close()
    assert got == [(u, 40, 1, 40) for u in units]  # one whole copy, from one writer, no duplicates
    assert _cli("verify", root).returncode == 0


@pytest.mark.slow
def test_a_killed_writer_on_s3_loses_nothing(bucket: str, tiny_loras: list[Path], minilm_dir: Path,
                                             tmp_path: Path) -> None:
    root = f"{bucket}/results"
    args = ["analyze", *map(str, tiny_loras), "--base", str(minilm_dir), "--batch-size", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "zoospectra.cli", *args, "--out", root], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    store = ResultsStore(root)
    try:
        deadline = time.monotonic() + 240
        while not store._fs.has_match(f"units/*/{SUCCESS}"):  # the first unit is committed
            assert proc.poll() is None and time.monotonic() < deadline, "no unit landed"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray, mid-run
        proc.wait(60)
    committed = len(store.committed())
    assert 0 < committed < 18, committed  # killed part-way
    again = _cli(*args, "--out", root)
    assert again.returncode == 0, again.stderr
    local = tmp_path / "local"
    assert _cli(*args, "--out", str(local), "--local").returncode == 0
    for table, key in [("matrices", "model_uid, tensor"), ("vectors", "model_uid, tensor, side, j")]:
        got, want = _rows(root, table, key), _rows(str(local), table, key)
        assert got == want and not _twice(root, table, key), table  # nothing lost, nothing twice
    assert _cli("verify", root).returncode == 0
