"""Every analysis default lives in AnalysisConfig: the CLI options, job specs, mitigation and the
report's summary query take theirs from it, so they cannot drift apart."""
from __future__ import annotations

import inspect
from dataclasses import fields

from zoospectra.cli import analyze, crawl, mitigate
from zoospectra.config import ALL, AnalysisConfig
from zoospectra.jobs.spec import CrawlSpec
from zoospectra.mitigate import MitigationParams
from zoospectra.study.report import SUMMARY_SQL

D = AnalysisConfig()
CLI_NAME = {"include_embeddings": "embeddings"}


def _option_default(command, name: str) -> object:
    value = inspect.signature(command).parameters[name].default.default
    if name in ("k_store", "k_spec"):
        return ALL if value == "all" else int(value)
    return value


def test_analyze_options_default_to_the_config() -> None:
    names = [f.name for f in fields(AnalysisConfig) if f.name != "pair_max"]   # pair_max: spec only
    assert {n: _option_default(analyze, CLI_NAME.get(n, n)) for n in names} == {n: getattr(D, n) for n in names}


def test_other_entry_points_default_to_the_config() -> None:
    assert (_option_default(crawl, "mode"), _option_default(crawl, "k_store")) == (D.mode, D.k_store)
    assert (_option_default(mitigate, "k"), _option_default(mitigate, "eps")) == (D.k, D.eps)
    assert (MitigationParams().k, MitigationParams().eps) == (D.k, D.eps)
    spec = CrawlSpec.from_dict({"name": "x", "base_models": ["org/base"], "out": "/tmp/r", "analysis": {}})
    assert spec.analysis == D
    assert f"eps := {D.eps}, k := {D.k}" in SUMMARY_SQL
