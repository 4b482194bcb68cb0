"""Bootstrap intervals and effect sizes (study/uncertainty.py, reviewer.py) against slow references
on a fixed sample: a plain-Python loop drawing the same resamples one at a time, and scipy's
own percentile bootstrap (other resamples: agreement within Monte Carlo error)."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import scipy.stats

from zoospectra.errors import ConfigError
from zoospectra.study.reviewer import GROUPS_SCHEMA, groups_post, layer_map_post
from zoospectra.study.uncertainty import effect, mean_ci, rng_for

SAMPLE = [0.0, 1.0, 1.0, 2.0, 3.0, 3.0, 4.0, 7.0, 9.0, 12.0, 0.5, 2.5]
OTHER = [5.0, 6.5, 8.0, 9.0, 11.0, 4.0, 7.5]


def quantile_linear(values: list[float], q: float) -> float:
    """numpy's default (Hyndman & Fan type 7) quantile, by hand."""
    xs = sorted(values)
    h = (len(xs) - 1) * q
    lo = math.floor(h)
    return xs[lo] + (h - lo) * (xs[min(lo + 1, len(xs) - 1)] - xs[lo])


def slow_means(x: list[float], rng: np.random.Generator, n_boot: int) -> list[float]:
    out = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(x), size=len(x))
        out.append(sum(x[i] for i in idx) / len(x))
    return out


def slow_d(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((v - ma) ** 2 for v in a) / (len(a) - 1)
    vb = sum((v - mb) ** 2 for v in b) / (len(b) - 1)
    pooled = math.sqrt(((len(a) - 1) * va + (len(b) - 1) * vb) / (len(a) + len(b) - 2))
    return (ma - mb) / pooled if pooled > 0 else float("nan")


def test_mean_interval_matches_a_slow_loop() -> None:
    ci = mean_ci(SAMPLE, "fixed", n_boot=700, level=0.9, seed=3)
    means = slow_means(SAMPLE, rng_for(3, "fixed"), 700)
    assert ci.n == len(SAMPLE) and ci.mean == pytest.approx(sum(SAMPLE) / len(SAMPLE))
    assert ci.lo == pytest.approx(quantile_linear(means, 0.05), abs=1e-12)
    assert ci.hi == pytest.approx(quantile_linear(means, 0.95), abs=1e-12)


def test_mean_interval_agrees_with_scipy() -> None:
    ci = mean_ci(SAMPLE, "scipy", n_boot=20_000)
    ref = scipy.stats.bootstrap((np.array(SAMPLE),), np.mean, n_resamples=20_000, method="percentile",
                                confidence_level=0.95, random_state=np.random.default_rng(11))
    width = ref.confidence_interval.high - ref.confidence_interval.low
    assert ci.lo == pytest.approx(ref.confidence_interval.low, abs=0.03 * width)
    assert ci.hi == pytest.approx(ref.confidence_interval.high, abs=0.03 * width)


def test_effect_matches_a_slow_loop() -> None:
    e = effect(OTHER, SAMPLE, "fx", n_boot=500, level=0.95, seed=1)
    rng = rng_for(1, "fx")
    ra = [[OTHER[i] for i in rng.integers(0, len(OTHER), size=len(OTHER))] for _ in range(500)]
    rb = [[SAMPLE[i] for i in rng.integers(0, len(SAMPLE), size=len(SAMPLE))] for _ in range(500)]
    diffs = [sum(a) / len(a) - sum(b) / len(b) for a, b in zip(ra, rb, strict=True)]
    ds = [d for d in (slow_d(a, b) for a, b in zip(ra, rb, strict=True)) if math.isfinite(d)]
    assert e.diff == pytest.approx(sum(OTHER) / len(OTHER) - sum(SAMPLE) / len(SAMPLE))
    assert e.d == pytest.approx(slow_d(OTHER, SAMPLE))
    assert (e.diff_lo, e.diff_hi) == pytest.approx((quantile_linear(diffs, 0.025), quantile_linear(diffs, 0.975)))
    assert (e.d_lo, e.d_hi) == pytest.approx((quantile_linear(ds, 0.025), quantile_linear(ds, 0.975)))
    assert e.diff_lo < e.diff < e.diff_hi and e.d_lo < e.d < e.d_hi


def test_degenerate_groups_have_no_interval() -> None:
    one = mean_ci([4.0], "one")
    assert (one.n, one.mean, one.lo, one.hi) == (1, 4.0, None, None)
    flat = effect([2.0, 2.0], [2.0, 2.0, 2.0], "flat")
    assert flat.diff == 0.0 and flat.d is None and flat.d_lo is None
    single = effect([1.0], [2.0, 3.0], "single")
    assert single.diff == -1.5 and single.diff_lo is None


def test_intervals_are_seeded_per_label() -> None:
    a = mean_ci(SAMPLE, "g1", n_boot=300)
    assert a == mean_ci(SAMPLE, "g1", n_boot=300)
    assert (a.lo, a.hi) != (mean_ci(SAMPLE, "g2", n_boot=300).lo, mean_ci(SAMPLE, "g2", n_boot=300).hi)


def _per_model(rows: list[dict]) -> pa.Table:
    keys = ["kind", "r", "alpha", "alpha_rule", "model_uid", "model_id", "n_matrices", "n_intruders",
            "intruders_per_matrix", "intruder_share_w0", "eff_rank_mean", "eps", "k"]
    return pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])


def test_groups_compare_with_the_reference_group() -> None:
    rows = [{"kind": "lora", "r": r, "alpha": 2.0 * r, "alpha_rule": "alpha = 2r", "model_uid": f"l{i}",
             "model_id": f"l{i}", "intruders_per_matrix": v, "intruder_share_w0": v / 100,
             "eff_rank_mean": float(r)} for i, (r, v) in enumerate([(4, 1.0), (4, 2.0), (8, 3.0), (8, 5.0)])]
    rows += [{"kind": "full", "model_uid": f"f{i}", "model_id": f"f{i}", "intruders_per_matrix": v,
              "intruder_share_w0": 0.0, "eff_rank_mean": 300.0 + v} for i, v in enumerate([0.0, 0.5])]
    out = groups_post(_per_model(rows), {"n_boot": 400, "level": 0.95, "seed": 0}).to_pylist()
    assert pa.Table.from_pylist(out, schema=GROUPS_SCHEMA).num_rows == len(out)
    lora = next(r for r in out if (r["grouping"], r["grp"], r["metric"]) == ("kind", "lora", "intruders_per_matrix"))
    assert lora["reference"] == "full" and lora["n_artifacts"] == 4 and lora["mean"] == 2.75
    ref = mean_ci([1.0, 2.0, 3.0, 5.0], "kind/lora/intruders_per_matrix", n_boot=400)
    assert (lora["lo"], lora["hi"]) == (ref.lo, ref.hi)
    e = effect([1.0, 2.0, 3.0, 5.0], [0.0, 0.5], "kind/lora/intruders_per_matrix vs full", n_boot=400)
    assert (lora["diff"], lora["diff_lo"], lora["cohen_d"], lora["d_hi"]) == (e.diff, e.diff_lo, e.d, e.d_hi)
    full = next(r for r in out if (r["grouping"], r["grp"], r["metric"]) == ("kind", "full", "eff_rank_mean"))
    assert full["diff"] is None and full["mean"] == 300.25
    ranks = [r for r in out if r["grouping"] == "rank" and r["metric"] == "intruders_per_matrix"]
    assert [r["grp"] for r in ranks] == ["r=4", "r=8"] and ranks[1]["reference"] == "r=4"
    assert ranks[1]["diff"] == pytest.approx(2.5)
    with pytest.raises(ConfigError, match="n_boot"):
        groups_post(_per_model(rows), {"n_boot": 5})


def test_layer_map_groups_are_means_over_artifacts() -> None:
    rows = [{"kind": "lora", "r": 4, "model_uid": f"m{i}", "model_id": f"m{i}", "layer": 0,
             "module": "attention.self.query", "n_intruders": n, "eff_rank": 4.0 + i, "eps": 0.5, "k": 10}
            for i, n in enumerate([1, 3, 2])]
    out = layer_map_post(pa.Table.from_pylist(rows), {"n_boot": 300}).to_pylist()
    group = [r for r in out if r["level"] == "group"]
    assert len(out) == 4 and len(group) == 1
    ref = mean_ci([1.0, 3.0, 2.0], "layer-map/lora/0/attention.self.query/intruders", n_boot=300)
    assert (group[0]["intruders"], group[0]["intruders_lo"], group[0]["intruders_hi"]) == (2.0, ref.lo, ref.hi)
    assert group[0]["eff_rank"] == 5.0 and group[0]["n_models"] == 3
