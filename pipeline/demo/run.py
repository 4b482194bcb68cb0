"""`zoospectra demo`: a real sample zoo on the shipped MiniLM base, analysed on local Ray, offline.

First run: trains the zoo (a full fine-tune and PEFT adapters, a few dozen steps each on a
small sentiment task) into the cache, then analyses it. Later runs reuse the cached zoo, and
units already in the results root are skipped.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from rich.console import Console

from ..config import AnalysisConfig

BASE_ID = "sentence-transformers/all-MiniLM-L6-v2"
DEMO_STEPS = 60
DEMO_NULL_DRAWS = 19   # random-direction null draws per matrix (docs/science.md#null): p_tail >= 1/20
console = Console(stderr=True)

SQL_EXAMPLE = """\
zoospectra sql {out} "
  SELECT model_id, sum(n_intruders) AS intruders_top10_eps05
  FROM intruders(0.5, 10) GROUP BY model_id ORDER BY intruders_top10_eps05 DESC"
zoospectra sql {out} "SELECT * FROM intruder_curve(10) WHERE model_id LIKE 'lora_r8%'"
zoospectra sql {out} "SELECT module, avg(eff_rank) FROM matrices GROUP BY ALL ORDER BY ALL"
zoospectra sql {out} "SELECT * FROM model_vs_null(0.5, 10)"   # observed vs random-direction null
zoospectra report {out} --out {out}-report
zoospectra shell {out}        # an interactive DuckDB shell with the same views and macros"""


NULL_SQL = ("SELECT model_id, n_intruders AS \"intruders at eps {eps}\", null_mean, null_lo, null_hi, p_tail, "
            "n_matrices "
            "FROM model_vs_null({eps}, {k}) ORDER BY model_id")


def _quiet_libraries() -> None:
    """Offline, and no progress bars or deprecation chatter from the fixture builders."""
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # transformers is only needed to build the zoo
        pass


def claim_cache(cache: str) -> Path:
    """The zoo cache as a `demo-cache` output (outputs.claim_output). A cache from before the
    marker existed is adopted when everything in it is the zoo builder's own output."""
    from ..outputs import MARKER, claim_output, read_marker
    from .zoo import is_zoo_output

    path = Path(cache).expanduser()
    if path.is_dir() and read_marker(path) is None and any(path.iterdir()):
        entries = list(path.iterdir())
        bases = path / "_bases"
        legacy = all(is_zoo_output(e) or (e == bases and e.is_dir() and all(is_zoo_output(b) for b in e.iterdir()))
                     for e in entries)
        if legacy:
            (path / MARKER).write_text('{"command": "demo-cache", "created": "adopted"}\n', encoding="utf-8")
    return claim_output(path, "demo-cache", option="--cache")


def run_demo(out: str = "results/demo", cache: str = ".zoospectra-cache/zoo",
             steps: int | None = None, quiet: bool = False) -> None:
    from ..console import run_analysis
    from ..io.refs import local_ref
    from ..outputs import check_not_input, claim_results_root
    from ..study.sql import format_table, query
    from .zoo import build_zoo, demo_specs, minilm_dir

    claim_results_root(out, inputs=[cache])
    cache_dir = claim_cache(cache)
    check_not_input(cache_dir, [out], "--cache")
    _quiet_libraries()
    specs = demo_specs()
    t0 = time.perf_counter()
    console.print(f"[bold]zoo[/]: {len(specs)} artifacts on {BASE_ID} (cached in {cache})")

    def tick(i: int, n: int, name: str, built: bool) -> None:
        if not quiet:  # one line per artifact: a first build takes minutes
            console.print(f"  zoo {i}/{n} {name}: {'trained' if built else 'cached'} "
                          f"({time.perf_counter() - t0:.0f}s)")

    paths = build_zoo(cache_dir, specs, steps=steps or DEMO_STEPS, on_progress=tick)
    console.print(f"[bold]zoo[/]: ready in {time.perf_counter() - t0:.1f}s")

    base = local_ref(minilm_dir(), BASE_ID)
    refs = [local_ref(p, spec.name) for p, spec in zip(paths, specs, strict=True)]
    cfg = AnalysisConfig(pairs=True, null_draws=DEMO_NULL_DRAWS)
    run_analysis(base, refs, cfg, out, quiet=quiet)

    summary = query(out, f"SELECT * FROM model_summary({cfg.eps}, {cfg.k}) ORDER BY kind, r NULLS FIRST, model_id")
    print(format_table(summary, "table", None))
    print(f"\nAgainst the null ({DEMO_NULL_DRAWS} draws of random directions with each update's "
          "singular values; p_tail = P(null >= observed), docs/science.md#null):")
    print(format_table(query(out, NULL_SQL.format(eps=cfg.eps, k=cfg.k)), "table", None))
    print(f"\nTry it yourself (views and macros are loaded by `zoospectra sql`):\n{SQL_EXAMPLE.format(out=out)}")
    console.print(f"[bold]demo[/]: done in {time.perf_counter() - t0:.1f}s; results in {Path(out).resolve()}")
