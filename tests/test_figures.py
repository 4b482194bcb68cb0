"""The report's figures are readable: legend text at a readable size, one look per model across
every panel of a figure, and tick labels that do not overlap, for every study drawn from the
real study zoo."""
from __future__ import annotations

import itertools

import pyarrow as pa
import pytest
from fixtures_studies import StudyZoo

from zoospectra.study.studies import LEGEND_FONTSIZE, STUDIES, connect_scoped, plot_intruders_eps, run_study


@pytest.fixture(scope="module")
def figures(study_zoo: StudyZoo) -> dict[str, object]:
    con = connect_scoped(study_zoo.root)
    try:
        tables = {name: run_study(con, study, {}) for name, study in STUDIES.items()}
    finally:
        con.close()
    out = {}
    for name, table in tables.items():
        fig = STUDIES[name].plot(table, STUDIES[name].params({}))
        fig.canvas.draw()                              # final layout: extents are what is shown
        out[name] = fig
    yield out
    import matplotlib.pyplot as plt

    plt.close("all")


def _series_looks(fig) -> dict[str, tuple]:
    """label -> (colour, marker, line style) of every labelled line or scatter in the figure."""
    from matplotlib.colors import to_hex

    looks: dict[str, set] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            if not line.get_label().startswith("_"):
                looks.setdefault(line.get_label(), set()).add(
                    (to_hex(line.get_color()), str(line.get_marker()), line.get_linestyle()))
        for coll in ax.collections:
            if not coll.get_label().startswith("_") and len(coll.get_facecolors()):
                looks.setdefault(coll.get_label(), set()).add((to_hex(coll.get_facecolors()[0]), "", ""))
    return looks


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_legends_are_readable(figures, name: str) -> None:
    fig = figures[name]
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    for legend in legends:
        assert all(t.get_fontsize() >= LEGEND_FONTSIZE for t in legend.get_texts()), name


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_every_model_has_its_own_look(figures, name: str) -> None:
    looks = _series_looks(figures[name])
    owners: dict[tuple, str] = {}
    for label, seen in looks.items():
        assert len(seen) == 1, f"{name}: {label} drawn in {seen}"     # one look in every panel
        (look,) = seen
        assert look not in owners, f"{name}: {label} and {owners.get(look)} share {look}"
        owners[look] = label


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_tick_labels_do_not_overlap(figures, name: str) -> None:
    fig = figures[name]
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            boxes = [t.get_window_extent(renderer) for t in axis.get_ticklabels(which="both")
                     if t.get_visible() and t.get_text()]
            for a, b in itertools.combinations(boxes, 2):
                assert not a.overlaps(b), f"{name}: tick labels overlap on {ax.get_title()!r}"


def test_intruders_eps_with_many_models_keeps_looks_distinct() -> None:
    """25 models over 3 kinds (more than any palette's colours): still one look each."""
    rows = [{"kind": kind, "r": r, "model_id": f"{kind}_r{r}_{i}", "model_uid": f"{kind}{r}{i}",
             "eps": eps, "n_intruders": i + r}
            for i, (kind, r) in enumerate([(k, r) for k in ("lora", "dora", "full")
                                           for r in (1, 2, 4, 8, 16, 32, 64, 128)] + [("lora", 3)])
            for eps in (0.1, 0.5, 0.9)]
    fig = plot_intruders_eps(pa.Table.from_pylist(rows), {"k": 10})
    looks = _series_looks(fig)
    assert len(looks) == 25 and len({next(iter(v)) for v in looks.values()}) == 25


@pytest.mark.parametrize("span", [(0.31, 0.95), (0.02, 40.0), (1e-4, 10.0)])
def test_ab_balance_log_ticks_do_not_overlap_on_any_range(span: tuple[float, float]) -> None:
    """Short ranges are where matplotlib labels minor log ticks ("3x10^-1 4x10^-1 ..."), which overlapped."""
    import numpy as np

    from zoospectra.study.studies import plot_ab_balance

    values = np.geomspace(*span, 12)
    rows = [{"model_uid": f"u{i % 3}", "model_id": f"lora_{i % 3}", "norm_a": float(a), "norm_b": float(b)}
            for i, (a, b) in enumerate(zip(values, values[::-1], strict=True))]
    fig = plot_ab_balance(pa.Table.from_pylist(rows), {})
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (ax,) = fig.axes
    for axis in (ax.xaxis, ax.yaxis):
        boxes = [t.get_window_extent(renderer) for t in axis.get_ticklabels(which="both")
                 if t.get_visible() and t.get_text()]
        assert len(boxes) >= 2, f"{span}: an axis needs at least two labels to be read"
        for a, b in itertools.combinations(boxes, 2):
            assert not a.overlaps(b), f"{span}: tick labels overlap"
