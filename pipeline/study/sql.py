"""The DuckDB study layer: views over a results root (schemas/views.sql) and table macros
(schemas/macros.sql) such as intruders(eps, k), so that each paper figure is one SELECT.

The unit views (matrices, vectors, spectra, similarity, pairs, units) read the explicit list of
files found at connect(): those of compaction generations (run/compact.py) and of committed,
undamaged loose units (run/integrity.py says why and how cheaply): units committed later appear
on the next connect(). models, runs, errors and catalog follow their globs.
A table that had no file at connect() is an empty typed view until the next connect().
A remote root (s3://, gs://, memory://, ...) is read through the store's own filesystem as Arrow
datasets registered in the connection, never through a DuckDB extension (see _session).
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import IO, TYPE_CHECKING, Any, Literal

import pyarrow as pa

from ..errors import ConfigError, ResultsError
from ..run.store import TABLE_GLOBS, UNIT_TABLES, ResultsStore
from ..schemas.tables import SCHEMA_VERSION, TABLES

if TYPE_CHECKING:
    import duckdb

Format = Literal["table", "csv", "json", "parquet"]
FORMATS: tuple[str, ...] = ("table", "csv", "json", "parquet")
# Loaded after the views, in this order: later files may use earlier macros.
MACRO_FILES: tuple[str, ...] = ("macros.sql", "studies.sql")
GLOB_TABLES: tuple[str, ...] = ("models", "runs", "errors", "catalog")  # read by glob on local roots
_VIEW_MARK = re.compile(r"^-- view: ([a-z_]+)\s*$", re.MULTILINE)


def _sql_file(name: str) -> str:
    return resources.files("zoospectra.schemas").joinpath(name).read_text(encoding="utf-8")


def _quoted_root(uri: str) -> str:
    """The root as the body of a '...' SQL literal; glob characters would be expanded, so refuse."""
    if any(c in uri for c in "*?[]{}"):
        raise ResultsError(
            f"results root {uri!r} contains glob characters (* ? [ ] {{ }}) that DuckDB would "
            "expand; use a root path without them", root=uri,
        )
    return uri.replace("'", "''")  # a standard SQL literal: '' is the only escape


@cache
def _duckdb_types(table: str) -> tuple[tuple[str, str], ...]:
    """(column, DuckDB type) of a table, as DuckDB maps its Arrow schema."""
    import duckdb

    con = duckdb.connect()
    try:
        con.register("_empty", TABLES[table].empty_table())
        return tuple((r[0], r[1]) for r in con.execute("DESCRIBE _empty").fetchall())
    finally:
        con.close()


def empty_view_sql(table: str) -> str:
    """CREATE VIEW of zero rows with exactly the table's columns and types."""
    cols = ", ".join(
        f'CAST(NULL AS {typ}) AS "{name}"' for name, typ in _duckdb_types(table)
    )
    return f"CREATE OR REPLACE VIEW {table} AS SELECT {cols} WHERE false;"


def _view_blocks(text: str) -> list[tuple[str | None, str]]:
    """views.sql split at its `-- view: <name>` lines: [(name or None for the header, sql)]."""
    parts = _VIEW_MARK.split(text)
    blocks: list[tuple[str | None, str]] = [(None, parts[0])]
    blocks += [(parts[i], parts[i + 1]) for i in range(1, len(parts), 2)]
    return blocks


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _unit_files(store: ResultsStore) -> tuple[dict[str, list[str]], str | None]:
    """Per unit table, its files relative to the root (no entry: no file): the files of every live
    compaction generation, then those of the committed, undamaged loose units (a unit whose rows a
    generation holds is never loose: no double count); and the VALUES rows of all those units'
    ids (None: no unit). Stray, temp, copied, half-written and damaged folders are not in them
    (integrity.py), so they never reach or break a query; nor is a generation whose files are
    not the recorded sizes (compact.check_generation; `verify` checks them in full)."""
    from ..run.index import check_generation

    units = store.committed()
    lists: dict[str, list[str]] = {t: [] for t in UNIT_TABLES}
    where = {u: f"{store.uri}/units/{u}" for u in units}
    for gen_id, gen in store.generations().items():
        if check_generation(store._fs, gen, full=False):
            continue
        where |= {u: f"{store.uri}/compacted/{gen_id}" for u in gen.units}
        for rel, rec in sorted(gen.manifest.get("files", {}).items()):
            lists[rec["table"]].append(f"compacted/{gen_id}/{rel}")
    for table in UNIT_TABLES:
        lists[table] += [f"units/{u}/{f}" for u, c in sorted(units.items()) if (f := c.table_file(table))]
    values = ", ".join(f"({_literal(u)}, {_literal(p)})" for u, p in sorted(where.items())) or None
    return {t: fs for t, fs in lists.items() if fs}, values


def _glob_files(store: ResultsStore, table: str) -> list[str]:
    """The files of a glob table (models, runs, errors, catalog) relative to the root, from one
    listing of its folder."""
    fs = store._fs
    assert not fs.local  # local roots: DuckDB's own glob
    top, _, rest = TABLE_GLOBS[table].partition("/")
    out = []
    for name, entry in sorted(fs.tree(top).items()):
        if rest.count("/") == 0 and entry is None and name.endswith(".parquet"):
            out.append(f"{top}/{name}")                                   # models/<file>.parquet
        elif rest.count("/") == 1 and isinstance(entry, dict):
            out += [f"{top}/{name}/{f}" for f, size in sorted(entry.items())
                    if size is not None and f.endswith(".parquet")]        # errors/<run>/<file>.parquet
    return out


def _union_by_name(store: ResultsStore) -> str:
    """'true' when committed units span schema versions (older files have fewer columns), else
    'false': commit_unit casts every table to its declared schema, so units of one version share
    it exactly, and DuckDB binds a list of files 30x faster without unifying their schemas."""
    versions = {(c.manifest or {}).get("schema_version") for c in store.committed().values()}
    return "false" if versions <= {SCHEMA_VERSION} else "true"


def _arrow_name(table: str) -> str:
    return f"_zs_{table}"


@dataclass
class _Session:
    """What a DuckDB session over a root needs: the SQL script, and for a remote root the Arrow
    datasets its views read (registered under _arrow_name(table) before the script runs)."""

    script: str
    datasets: dict[str, Any]


def _session(root: str | os.PathLike) -> _Session:
    """Views over `root`, then the macros.

    A local root's views read its files by path. A remote root's views (s3://, gs://, memory://,
    any fsspec root) read Arrow datasets over the same files through the store's own filesystem,
    that is the same client and credentials (AWS_* variables, AWS_ENDPOINT_URL, ...) that wrote
    them: DuckDB would otherwise need its httpfs extension, which it downloads on first use and
    which an offline cluster cannot fetch, and credentials of its own (CREATE SECRET)."""
    store = ResultsStore(root)
    quoted = _quoted_root(store.uri)
    files, units = _unit_files(store)
    remote = not store.is_local
    union = _union_by_name(store)
    datasets: dict[str, Any] = {}
    if remote:
        files |= {t: fs for t in GLOB_TABLES if (fs := _glob_files(store, t))}
        datasets = {_arrow_name(t): _dataset(store, t, fs) for t, fs in files.items()}
    out = []
    for name, block in _view_blocks(_sql_file("views.sql")):
        if name in TABLES and remote:
            block = (f"\nCREATE OR REPLACE VIEW {name} AS SELECT * FROM {_arrow_name(name)};\n\n"
                     if name in files else f"\n{empty_view_sql(name)}\n\n")
        elif name in UNIT_TABLES and name in files:
            listed = "[" + ", ".join(f"'{quoted}/{rel}'" for rel in files[name]) + "]"
            block = block.replace(f"{{files:{name}}}", listed).replace("{union_by_name}", union)
        elif name == "units" and units:
            block = block.replace("{units}", units)
        elif name == "units":
            block = "\nCREATE OR REPLACE VIEW units AS SELECT CAST(NULL AS VARCHAR) AS unit_id, " \
                    "CAST(NULL AS VARCHAR) AS path WHERE false;\n\n"
        elif name in TABLES and (name in UNIT_TABLES or not store.has_files(name)):
            block = f"\n{empty_view_sql(name)}\n\n"
        out.append(block if name is None else f"-- view: {name}{block.replace('{root}', quoted)}")
    script = "".join(out) + "".join("\n" + _sql_file(name) for name in MACRO_FILES)
    return _Session(script, datasets)


def _dataset(store: ResultsStore, table: str, files: list[str]) -> Any:
    """An Arrow dataset over `files` (relative to the root) with the table's declared schema:
    a column that older files lack reads as null (what union_by_name does for local roots).
    Built without I/O; DuckDB scans it lazily, pushing columns and filters down."""
    import pyarrow.dataset as pads

    fs = store._fs
    assert not fs.local
    return pads.FileSystemDataset.from_paths(
        [fs._abs(rel) for rel in files], schema=TABLES[table], format=pads.ParquetFileFormat(),
        filesystem=fs.fs)


def render(root: str | os.PathLike) -> str:
    """The SQL script that sets up a session over a local root: views, then the macros. It runs
    in any DuckDB (the `duckdb` CLI included). A remote root's views read Arrow datasets that only
    connect() provides: use connect() (or `zoospectra sql`) for those."""
    session = _session(root)
    if session.datasets:
        raise ConfigError(f"{ResultsStore(root).uri} is a remote root: its views read Arrow datasets "
                          "that only zoospectra's own connection provides; use `zoospectra sql` or "
                          "zoospectra.connect()")
    return session.script


def connect(root: str | os.PathLike, *, database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the results views and macros of `root` loaded."""
    import duckdb

    session = _session(root)
    con = duckdb.connect(database)
    try:
        for name, dataset in session.datasets.items():
            con.register(name, dataset)
        con.execute(session.script)
    except Exception:
        con.close()
        raise
    return con


def query(root: str | os.PathLike, sql: str, params: Sequence[Any] | None = None) -> pa.Table:
    """Run one SQL statement against the results of `root`; the answer as an Arrow table."""
    con = connect(root)
    try:
        rel = con.sql(sql, params=list(params) if params is not None else None)
        return rel.to_arrow_table() if rel is not None else pa.table({})  # None: not a query
    finally:
        con.close()


# --- output ------------------------------------------------------------------------------------
def format_table(table: pa.Table, fmt: Format = "table", out: str | None = None, *,
                 max_rows: int | None = 200) -> str:
    """Render a result: 'table' (rich, for terminals), 'csv', 'json' (array of records),
    'parquet' (needs `out`). With `out` the result is written there and "" is returned."""
    if fmt not in FORMATS:
        raise ConfigError(f"output format must be one of {FORMATS}, got {fmt!r}", option="format")
    if fmt == "parquet":
        if not out:
            raise ConfigError("parquet output needs a file: pass --output FILE.parquet", option="out")
        _write_parquet(table, out)
        return ""
    text = {"table": _as_rich, "csv": _as_csv, "json": _as_json}[fmt](table, max_rows)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)
        return ""
    return text


def _write_parquet(table: pa.Table, out: str) -> None:
    import pyarrow.parquet as pq

    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, out)  # never a half-written file at `out`
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _flat(table: pa.Table) -> pa.Table:
    """Nested columns (lists, structs) as JSON text, which CSV and plain cells can hold."""
    cols = []
    for col in table.columns:
        if pa.types.is_nested(col.type):
            col = pa.array([None if v is None else json.dumps(v, default=str) for v in col.to_pylist()],
                           pa.string())
        cols.append(col)
    return pa.Table.from_arrays(cols, names=table.column_names)


def _as_csv(table: pa.Table, max_rows: int | None) -> str:
    import pyarrow.csv as pacsv

    buf = io.BytesIO()
    pacsv.write_csv(_flat(table), buf)
    return buf.getvalue().decode("utf-8")


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/Inf
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json_value(x) for x in v]
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return v


def _as_json(table: pa.Table, max_rows: int | None) -> str:
    rows = [_json_value(r) for r in table.to_pylist()]
    return json.dumps(rows, indent=1, default=str) + "\n"


def _cell(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _as_rich(table: pa.Table, max_rows: int | None) -> str:
    from rich.console import Console
    from rich.table import Table

    shown = table if max_rows is None else table.slice(0, max_rows)
    view = Table(show_header=True, header_style="bold", show_lines=False)
    for name, typ in zip(table.column_names, table.schema.types, strict=True):
        numeric = pa.types.is_integer(typ) or pa.types.is_floating(typ)
        view.add_column(name, justify="right" if numeric else "left")
    for row in _flat(shown).to_pylist():
        view.add_row(*(_cell(v) for v in row.values()))
    width = max(80, shutil.get_terminal_size((160, 24)).columns)
    out = io.StringIO()
    console = Console(file=out, width=width, color_system=None, force_terminal=False)
    console.print(view)
    more = table.num_rows - shown.num_rows
    footer = f"{table.num_rows} rows" + (f" ({more} not shown; use --format csv)" if more else "")
    return out.getvalue() + footer + "\n"


# --- interactive -----------------------------------------------------------------------------
def shell(root: str | os.PathLike, *, stdin: IO[str] | None = None, stdout: IO[str] | None = None,
          use_cli: bool | None = None) -> None:
    """An interactive SQL session with the views and macros loaded.

    Uses the `duckdb` CLI when it is on PATH (and the root is one it can read), else a minimal
    Python loop: statements end with ';', `.tables` lists views and macros, `.mode table|csv|json`
    picks the output, `.quit` leaves.
    """
    remote = not ResultsStore(root).is_local
    cli = shutil.which("duckdb")
    if use_cli is None:
        use_cli = cli is not None and stdin is None and not remote
    if use_cli:
        if not cli:
            raise ConfigError("the duckdb CLI is not on PATH; install it or use the built-in shell")
        _run_cli(cli, render(root))
        return
    _repl(connect(root), stdin or sys.stdin, stdout or sys.stdout)


def _run_cli(cli: str, script: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".sql", prefix="zoospectra-", delete=False) as f:
        f.write(script)
    try:
        subprocess.run([cli, "-init", f.name], check=False)
    finally:
        os.unlink(f.name)


def _repl(con: duckdb.DuckDBPyConnection, stdin: IO[str], stdout: IO[str]) -> None:
    interactive = stdin.isatty()
    mode: Format = "table"
    pending: list[str] = []
    try:
        while True:
            if interactive:
                stdout.write("zoospectra> " if not pending else "       ...> ")
                stdout.flush()
            line = stdin.readline()
            if not line:
                break
            stripped = line.strip()
            if not pending and stripped.startswith("."):
                cmd, _, arg = stripped.partition(" ")
                if cmd in (".quit", ".exit", ".q"):
                    break
                mode = _dot_command(con, cmd, arg.strip(), mode, stdout)
                continue
            pending.append(line)
            if stripped.endswith(";"):
                _run_statement(con, "".join(pending), mode, stdout)
                pending = []
    finally:
        con.close()


def _dot_command(con: duckdb.DuckDBPyConnection, cmd: str, arg: str, mode: Format,
                 stdout: IO[str]) -> Format:
    if cmd == ".mode" and arg in ("table", "csv", "json"):
        return arg  # type: ignore[return-value]
    if cmd == ".tables":
        names = con.execute(
            "SELECT view_name FROM duckdb_views() WHERE NOT internal UNION ALL "
            "SELECT function_name || '()' FROM duckdb_functions() "
            "WHERE function_type = 'table_macro' AND NOT internal "
            "AND NOT function_name LIKE '\\_%' ESCAPE '\\' "
            "ORDER BY 1"
        ).fetchall()
        stdout.write(" ".join(n for (n,) in names) + "\n")
        return mode
    stdout.write("commands: .tables  .mode table|csv|json  .quit  (SQL statements end with ';')\n")
    return mode


def _run_statement(con: duckdb.DuckDBPyConnection, sql: str, mode: Format, stdout: IO[str]) -> None:
    import duckdb

    try:
        rel = con.sql(sql)
        table = rel.to_arrow_table() if rel is not None else None
    except duckdb.Error as err:
        stdout.write(f"Error: {err}\n")
        return
    if table is not None:
        stdout.write(format_table(table, mode))
