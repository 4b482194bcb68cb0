"""`zoospectra report RESULTS --out DIR`: one self-contained HTML page of every study.

DIR/index.html holds everything inline: the figures as <svg> elements, the summary tables, and
the SQL behind each figure, so it opens offline and can be mailed or archived as one file. A
study without rows (no checkpoints, no pairs, ...) says what it needs instead of a figure; a
study whose query fails shows the error. Nothing is fetched from the network.
"""
from __future__ import annotations

import html
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from .._version import __version__
from ..config import AnalysisConfig
from ..errors import ResultsError
from .studies import STUDIES, Scope, Study, connect_scoped, run_study, svg_text

if TYPE_CHECKING:
    import duckdb

REPORT_FILE = "index.html"
MAX_TABLE_ROWS = 40
SUMMARY_SQL = f"SELECT * FROM model_summary(eps := {AnalysisConfig.eps}, k := {AnalysisConfig.k})"
# The closing note: each model's intruders against the random-direction null (docs/science.md#null).
NULL_NOTE_SQL = (f"SELECT model_id, n_intruders AS \"intruders at eps {AnalysisConfig.eps}\", null_mean, "
                 f"p_tail AS tail_probability, n_draws, n_matrices FROM model_vs_null(eps := {AnalysisConfig.eps}, "
                 f"k := {AnalysisConfig.k}) ORDER BY model_id")

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1150px; color: #1b1b1b; background: #ffffff; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #3465a4;
       padding-bottom: 0.2em; margin-top: 2em; } h3 { color: #3465a4; }
.meta { color: #555; font-size: 0.9em; } .note { color: #8a4b00; background: #fff4e0;
       padding: 0.6em 1em; border-left: 4px solid #f0a030; }
.error { color: #a40000; background: #fde8e8; padding: 0.6em 1em; border-left: 4px solid #cc0000; }
table { border-collapse: collapse; font-size: 0.8em; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #eef2f8; } td.s { text-align: left; }
pre { background: #f4f4f4; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
figure { margin: 0.5em 0; } figure svg { max-width: 100%; height: auto; }
nav a { margin-right: 1em; }
"""


@dataclass
class StudySection:
    study: Study
    sql: str
    rows: int = 0
    svg: str | None = None
    table: pa.Table | None = None
    error: str | None = None


@dataclass
class Report:
    root: str
    scope: Scope
    sections: list[StudySection] = field(default_factory=list)
    summary: pa.Table | None = None
    runs: pa.Table | None = None
    n_open_errors: int = 0
    open_errors: pa.Table | None = None
    null_note: pa.Table | None = None


def build_report(root: str | os.PathLike, out: str | os.PathLike, scope: Scope = Scope(),
                 params: Mapping[str, Mapping[str, Any]] | None = None, *, force: bool = False,
                 on_progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Render every study over `root` (narrowed to `scope`) into out/index.html; its path.

    params: per-study parameter overrides, e.g. {"intruders-eps": {"k": 5}}.
    `out` must be new, empty or a previous report (outputs.claim_output), checked before any
    query; `force` empties a previous report first.
    """
    from ..outputs import claim_output, replace_output

    out = claim_output(out, "report", inputs=[root], force=force)
    report = collect(root, scope, params or {}, on_progress=on_progress)
    if force:
        replace_output(out, "report")
    path = out / REPORT_FILE
    tmp = out / f".{REPORT_FILE}.tmp-{os.getpid()}"
    tmp.write_text(render_html(report), encoding="utf-8")
    os.replace(tmp, path)  # never a half-written report
    return path


def collect(root: str | os.PathLike, scope: Scope, params: Mapping[str, Mapping[str, Any]],
            on_progress: Callable[[int, int, str], None] | None = None) -> Report:
    """Run the summary queries and every study; draw the figures (on_progress after each)."""
    unknown = sorted(set(params) - set(STUDIES))
    if unknown:
        raise ResultsError(f"no such studies {unknown}; studies: {', '.join(STUDIES)}")
    con = connect_scoped(root, scope)
    try:
        report = Report(root=str(root), scope=scope)
        report.summary = con.sql(SUMMARY_SQL).to_arrow_table()
        report.runs = con.sql("SELECT run_id, status, started_at, finished_at, n_units, n_done, "
                              "n_skipped, n_failed FROM runs ORDER BY started_at").to_arrow_table()
        report.open_errors = con.sql(
            "SELECT model_id, tensor, stage, error_type, message FROM open_errors "
            "ORDER BY model_id, tensor LIMIT 50").to_arrow_table()
        report.n_open_errors = con.sql("SELECT count(*) AS n FROM open_errors").to_arrow_table()["n"][0].as_py()
        report.null_note = con.sql(NULL_NOTE_SQL).to_arrow_table()
        for i, study in enumerate(STUDIES.values(), 1):
            report.sections.append(_section(con, study, params.get(study.name, {})))
            if on_progress:
                on_progress(i, len(STUDIES), study.name)
    finally:
        con.close()
    return report


def _section(con: duckdb.DuckDBPyConnection, study: Study, overrides: Mapping[str, Any]) -> StudySection:
    section = StudySection(study, study.sql(overrides))
    try:
        table = run_study(con, study, overrides)
    except ResultsError as err:
        section.error = str(err)
        return section
    section.rows, section.table = table.num_rows, table
    if table.num_rows:
        section.svg = svg_text(study.plot(table, study.params(overrides)), salt=study.name)
    return section


# --- HTML ------------------------------------------------------------------------------------
def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _cell(value: Any) -> str:
    if value is None:
        return "<td>NULL</td>"
    if isinstance(value, float):
        return f"<td>{value:.4g}</td>"
    if isinstance(value, (int, bool)):
        return f"<td>{value}</td>"
    return f'<td class="s">{_esc(value)}</td>'


def html_table(table: pa.Table | None, max_rows: int = MAX_TABLE_ROWS) -> str:
    if table is None or table.num_rows == 0:
        return "<p class=\"meta\">(no rows)</p>"
    head = "".join(f"<th>{_esc(c)}</th>" for c in table.column_names)
    rows = "".join("<tr>" + "".join(_cell(v) for v in row.values()) + "</tr>"
                   for row in table.slice(0, max_rows).to_pylist())
    more = table.num_rows - min(max_rows, table.num_rows)
    tail = f'<p class="meta">{more} more rows (run the SQL above for all of them)</p>' if more else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>{tail}"


def _section_html(s: StudySection) -> str:
    st = s.study
    parts = [f'<h2 id="{_esc(st.name)}">{_esc(st.title)}</h2>',
             f'<p class="meta">{_esc(st.figure)} &middot; study <code>{_esc(st.name)}</code> '
             f"&middot; {s.rows} rows</p>",
             f"<p>{_esc(st.description)}</p>"]
    if s.error:
        parts.append(f'<p class="error">{_esc(s.error)}</p>')
    elif s.svg:
        parts.append(f"<figure>{s.svg}</figure>")
    else:
        parts.append(f'<p class="note">No rows in these results: this study needs {_esc(st.needs)}.</p>')
    parts.append(f"<h3>SQL</h3><pre>{_esc(s.sql)};</pre>")
    if s.rows:
        parts.append(f"<details><summary>Rows</summary>{html_table(s.table)}</details>")
    return "\n".join(parts)


def _closing_html(report: Report) -> str:
    """The closing note: intruders at the default eps against the null, per model."""
    head = '<h2 id="closing">Closing note: intruders against the null</h2>'
    if report.null_note is None or report.null_note.num_rows == 0:
        return (f'{head}<p class="note">No null draws in these results: analyse with '
                "<code>--null-draws B</code> to compare every intruder count with updates of the "
                "same singular values in random directions.</p>")
    return (f"{head}<p>Per model: intruders among the top {AnalysisConfig.k} at eps = "
            f"{AnalysisConfig.eps} (sum over matrices), the mean count of the random-direction null "
            "(same singular values, uniformly random directions) and the tail probability "
            "P(null &ge; observed) = (1 + #draws &ge; observed) / (1 + draws).</p>"
            f"<pre>{_esc(NULL_NOTE_SQL)};</pre>{html_table(report.null_note, max_rows=500)}")


def render_html(report: Report) -> str:
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = " ".join(f'<a href="#{_esc(s.study.name)}">{_esc(s.study.name)}</a>' for s in report.sections)
    errors = ""
    if report.n_open_errors:
        errors = (f'<p class="error">{report.n_open_errors} open errors (units that failed and '
                  f"were not redone since)</p>{html_table(report.open_errors)}")
    body = "\n".join([
        "<h1>zoospectra report</h1>",
        f'<p class="meta">results: <code>{_esc(report.root)}</code> &middot; scope: '
        f"{_esc(report.scope.describe())} &middot; generated {generated} by zoospectra "
        f"{_esc(__version__)}</p>",
        f"<nav>{nav}</nav>",
        '<h2 id="summary">Models</h2>',
        f"<pre>{_esc(SUMMARY_SQL)};</pre>",
        html_table(report.summary, max_rows=500),
        '<h2 id="runs">Runs</h2>', html_table(report.runs), errors,
        *(_section_html(s) for s in report.sections),
        _closing_html(report),
    ])
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>zoospectra report: {_esc(report.root)}</title><style>{_CSS}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )
