"""The repository stands on its own: docs/ is complete, its links resolve, and it matches the schemas.

- No file in the repository cites the external design reference or a sibling `shared` folder.
- Every link and backticked repo path in docs/*.md names a file or folder that exists, and every
  `docs/<page>.md#<anchor>` citation anywhere in the repository names a real page and anchor.
- docs/data-model.md lists exactly the columns of schemas/tables.py, table by table, in schema
  order, with the same type and nullability.
- Help texts and docs name only extras that pyproject.toml declares.

Each check reports every offending file:line, so a failure says what to fix.
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
from pathlib import Path

import pytest

from zoospectra.schemas.tables import TABLES

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = ("README.md", "science.md", "adapters.md", "data-model.md", "architecture.md")
TOP_DIRS = ("pipeline", "schemas", "jobs", "deploy", "tests", "bench", "docs")
# Spelled in pieces so that this file does not match its own patterns.
FORBIDDEN = (re.compile(r"\bDES" + r"IGN\b"), re.compile(r"\.\./" + r"shared\b"))
_SKIP_DIRS = {".git", ".venv", "__pycache__", "build", "results", ".zoospectra-cache", ".whl",
              ".pytest_cache", "node_modules"}
_MAX_BYTES = 2 << 20


def repo_files() -> list[Path]:
    """Tracked and new (not ignored) files; a plain walk where git is unavailable."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, check=True).stdout.decode()
        return [ROOT / p for p in out.split("\0") if p and (ROOT / p).is_file()]
    except (OSError, subprocess.CalledProcessError):
        found = []
        for d, dirs, files in os.walk(ROOT):
            dirs[:] = [x for x in dirs if x not in _SKIP_DIRS and not x.endswith(".egg-info")]
            found += [Path(d) / f for f in files]
        return found


def text_lines(path: Path) -> list[str]:
    """The file's lines, or none for binary / very large files."""
    if path.stat().st_size > _MAX_BYTES:
        return []
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        return []


def anchors(page: Path) -> set[str]:
    """Explicit `<a id="...">` anchors and GitHub heading slugs of a markdown page."""
    text = page.read_text(encoding="utf-8")
    found = set(re.findall(r'<a id="([^"]+)"', text))
    for heading in re.findall(r"^#+\s+(.+)$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


def test_docs_pages_exist() -> None:
    missing = [p for p in PAGES if not (DOCS / p).is_file()]
    assert not missing, f"docs/ lacks {missing}"


def test_nothing_cites_an_external_design_file() -> None:
    bad = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
           for p in repo_files() for n, line in enumerate(text_lines(p), 1)
           if any(rx.search(line) for rx in FORBIDDEN)]
    assert not bad, "cite docs/ instead:\n" + "\n".join(bad)


_LINK = re.compile(r"\]\(([^)\s]+)\)")
_TICKED = re.compile(r"`((?:" + "|".join(TOP_DIRS) + r")/[^`\s]*)`")


def _link_problems(page: Path) -> list[str]:
    problems = []
    for n, line in enumerate(text_lines(page), 1):
        for target in _LINK.findall(line):
            if re.match(r"[a-z]+:", target):          # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                problems.append(f"{page.name}:{n}: link to missing {target}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{page.name}:{n}: no anchor #{anchor} in {dest.name}")
        for ref in _TICKED.findall(line):
            if "<" in ref:                           # a pattern such as units/<unit_id>/...
                continue
            if not glob.glob(str(ROOT / ref.rstrip("/"))):
                problems.append(f"{page.name}:{n}: `{ref}` does not exist")
    return problems


def test_docs_links_and_paths_resolve() -> None:
    problems = [p for page in sorted(DOCS.glob("*.md")) for p in _link_problems(page)]
    assert not problems, "\n".join(problems)


_CITATION = re.compile(r"\bdocs/([\w-]+\.md)(?:#([\w-]+))?")


def test_every_docs_citation_resolves() -> None:
    problems, n_cited = [], 0
    for path in repo_files():
        for n, line in enumerate(text_lines(path), 1):
            for page, anchor in _CITATION.findall(line):
                n_cited += 1
                target = DOCS / page
                if not target.is_file():
                    problems.append(f"{path.relative_to(ROOT)}:{n}: no docs/{page}")
                elif anchor and anchor not in anchors(target):
                    problems.append(f"{path.relative_to(ROOT)}:{n}: no anchor #{anchor} in docs/{page}")
    assert not problems, "\n".join(problems)
    assert n_cited >= 10, "the code is expected to cite docs/ pages"


def documented_columns() -> dict[str, list[tuple[str, str, str]]]:
    """table -> [(column, type, null)] from the `### `table`` sections of docs/data-model.md."""
    tables: dict[str, list[tuple[str, str, str]]] = {}
    current = None
    for line in (DOCS / "data-model.md").read_text(encoding="utf-8").splitlines():
        heading = re.match(r"^###\s+`(\w+)`\s*$", line)
        if heading:
            current = tables.setdefault(heading[1], [])
        elif line.startswith("#"):
            current = None
        elif current is not None:
            row = re.match(r"^\|\s*`(\w+)`\s*\|\s*([^|]+?)\s*\|\s*(yes|no)\s*\|", line)
            if row:
                current.append((row[1], row[2], row[3]))
    return tables


def _type_name(t: object) -> str:
    """pyarrow's type string in the docs' spelling: list<string>, timestamp[us, UTC]."""
    return str(t).replace("list<item: ", "list<").replace("tz=", "")


def test_data_model_documents_every_column_and_no_other() -> None:
    docs = documented_columns()
    assert set(docs) == set(TABLES), (
        f"tables only in the schemas: {sorted(set(TABLES) - set(docs))}; "
        f"only in docs/data-model.md: {sorted(set(docs) - set(TABLES))}")
    problems = []
    for name, schema in TABLES.items():
        want = [(f.name, _type_name(f.type), "yes" if f.nullable else "no") for f in schema]
        got = docs[name]
        if [c for c, _, _ in got] != [c for c, _, _ in want]:
            problems.append(f"{name}: documented {[c for c, _, _ in got]}\n  schema     {[c for c, _, _ in want]}")
            continue
        problems += [f"{name}.{w[0]}: documented {g[1:]} but the schema says {w[1:]}"
                     for g, w in zip(got, want, strict=True) if g != w]
    assert not problems, "\n".join(problems)


def declared_extras() -> set[str]:
    """Keys of [project.optional-dependencies] in pyproject.toml (no toml parser on 3.10)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([A-Za-z0-9_-]+)\s*=", section, flags=re.M))


def test_only_declared_extras_are_named() -> None:
    extras = declared_extras()
    assert {"demo", "plot", "dev"} <= extras
    said = re.compile(r"\bthe `?([A-Za-z0-9_-]+)`? extra\b|zoospectra\[([A-Za-z0-9_,-]+)\]")
    problems = []
    for path in repo_files():
        if path.suffix not in (".py", ".md", ".toml", ".yaml", ".sql"):
            continue
        for n, line in enumerate(text_lines(path), 1):
            for one, many in said.findall(line):
                for name in filter(None, [one, *many.split(",")]):
                    if name not in extras:
                        problems.append(f"{path.relative_to(ROOT)}:{n}: extra {name!r} is not declared")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES)
def test_docs_pages_name_the_code_they_describe(page: str) -> None:
    """Each page points into the code (so the path checks above have something to check)."""
    text = (DOCS / page).read_text(encoding="utf-8")
    assert _TICKED.search(text) or re.search(r"\]\(\.\./", text), f"docs/{page} names no repo path"
