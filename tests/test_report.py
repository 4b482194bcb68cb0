"""`zoospectra report`: one self-contained HTML page, rendered by headless Chromium offline."""
from __future__ import annotations

import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from fixtures_studies import BASE_ID, StudyZoo

from zoospectra.study.report import build_report
from zoospectra.study.studies import STUDIES

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def report(study_zoo: StudyZoo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_report(study_zoo.root, tmp_path_factory.mktemp("report"))


def test_report_is_self_contained(report: Path) -> None:
    text = report.read_text(encoding="utf-8")
    # the page and the marker that makes the directory a report output (zoospectra.outputs)
    assert report.name == "index.html"
    assert sorted(p.name for p in report.parent.iterdir()) == [".zoospectra-output.json", "index.html"]
    # nothing to fetch: no scripts, stylesheets or frames; links are in-page (#id) or inline
    # data (matplotlib embeds heatmaps as data:image/png)
    assert not re.search(r"<(script|link|img|iframe|object|embed)\b", text, re.I)
    assert not re.search(r"""(src|href)\s*=\s*["'](?!#|data:)""", text, re.I)
    assert not re.search(r"url\((?!#)", text) and "@import" not in text
    for study in STUDIES.values():
        assert f'id="{study.name}"' in text
        assert study.sql() in text.replace("&#x27;", "'")           # the SQL behind the figure


def test_report_embeds_one_valid_svg_per_study(report: Path) -> None:
    text = report.read_text(encoding="utf-8")
    svgs = re.findall(r"<svg\b.*?</svg>", text, re.S)
    assert len(svgs) == len(STUDIES)                      # every study has rows in this zoo
    ids: list[str] = []
    for svg in svgs:
        root = ET.fromstring(svg)
        ids += [el.get("id") for el in root.iter() if el.get("id")]
    assert len(ids) == len(set(ids)), "element ids collide between inline figures"
    assert "lora_r8_a16" in text and "full_ft" in text     # the model summary table


def test_cli_scoped_report_and_plot(study_zoo: StudyZoo, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from zoospectra.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["report", str(study_zoo.root), "--out", str(tmp_path / "r"),
                              "--kind", "full", "--base-model", BASE_ID])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "r" / "index.html").read_text(encoding="utf-8")
    assert f"base = {BASE_ID}; kinds = full" in page
    assert "lora_r8_a16" not in page and "full_ft" in page
    # a full fine-tune alone has no checkpoints, pairs, alpha sweep or A/B norms: said, not drawn
    assert page.count('class="note"') == 4
    assert len(re.findall(r"<svg\b", page)) == len(STUDIES) - 4
    res = runner.invoke(app, ["plot", str(study_zoo.root), "intruders-eps", "--out",
                              str(tmp_path / "f5.svg"), "--param", "k=5"])
    assert res.exit_code == 0, res.output
    assert "intruders in top 5" in (tmp_path / "f5.svg").read_text()   # the parameter reached the plot
    res = runner.invoke(app, ["plot", str(study_zoo.root), "list"])
    assert res.exit_code == 0 and all(name in res.output for name in STUDIES)


@pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                    reason=f"headless Chromium not installed at {CHROMIUM} (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium_offline(report: Path, tmp_path: Path) -> None:
    import matplotlib.image as mpimg

    shot = tmp_path / "report.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
           "--window-size=1200,2000", report.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    img = mpimg.imread(shot)
    assert img.shape[:2] == (2000, 1200)
    rgb = (img[..., :3] * 255).round().astype(np.uint8).reshape(-1, 3)
    assert len(np.unique(rgb, axis=0)) > 50, "the screenshot is (nearly) blank"
    assert np.mean(np.any(rgb < 200, axis=1)) > 0.02          # text, tables and a figure drawn
    # the first figure's colours (matplotlib's tab10 blue) made it to the screen
    assert np.any(np.all(np.abs(rgb.astype(int) - [31, 119, 180]) < 12, axis=1))


def test_a_failing_study_is_reported_not_fatal(study_zoo: StudyZoo) -> None:
    from zoospectra.study.report import Report, _section, render_html
    from zoospectra.study.studies import Scope, connect_scoped

    con = connect_scoped(study_zoo.root)
    try:  # k = 40 is more than the 32 vectors stored per matrix: the macro refuses
        section = _section(con, STUDIES["intruders-eps"], {"k": 40})
    finally:
        con.close()
    assert section.svg is None and "--k-store" in section.error
    page = render_html(Report(root=str(study_zoo.root), scope=Scope(), sections=[section]))
    assert page.count('class="error"') == 1 and "k := 40" in page
