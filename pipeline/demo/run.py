"""`zoospectra demo`: a real sample zoo on the shipped MiniLM base, analysed on local Ray, offline.

First run: trains the zoo (a full fine-tune and PEFT adapters, a few dozen steps each on a
small sentiment task) into the cache, then analyses it. Later runs reuse the cached zoo, and
units already in the results root are skipped.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from rich.console import Console

from ..config import AnalysisConfig

BASE_ID = "sentence-transformers/all-MiniLM-L6-v2"
DEMO_STEPS = 60
console = Console(stderr=True)

SQL_EXAMPLE = """\
zoospectra sql {out} "
  SELECT model_id, sum(n_intruders) AS intruders_top10_eps05
  FROM intruders(0.5, 10) GROUP BY model_id ORDER BY intruders_top10_eps05 DESC"
zoospectra sql {out} "SELECT * FROM intruder_curve(10) WHERE model_id LIKE 'lora_r8%'"
zoospectra sql {out} "SELECT module, avg(eff_rank) FROM matrices GROUP BY ALL ORDER BY ALL"
zoospectra report {out} --out {out}-report
zoospectra shell {out}        # an interactive DuckDB shell with the same views and macros"""


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


def run_demo(out: str = "results/demo", cache: str = ".zoospectra-cache/zoo",
             steps: Optional[int] = None, quiet: bool = False) -> None:
    from ..cli import run_analysis
    from ..io.refs import local_ref
    from ..study.sql import format_table, query
    from .zoo import build_zoo, demo_specs, minilm_dir

    _quiet_libraries()
    specs = demo_specs()
    t0 = time.perf_counter()
    console.print(f"[bold]zoo[/]: {len(specs)} artifacts on {BASE_ID} (cached in {cache})")
    paths = build_zoo(cache, specs, steps=steps or DEMO_STEPS)
    console.print(f"[bold]zoo[/]: ready in {time.perf_counter() - t0:.1f}s")

    base = local_ref(minilm_dir(), BASE_ID)
    refs = [local_ref(p, spec.name) for p, spec in zip(paths, specs)]
    cfg = AnalysisConfig(pairs=True)
    run_analysis(base, refs, cfg, out, quiet=quiet)

    summary = query(out, f"SELECT * FROM model_summary({cfg.eps}, {cfg.k}) ORDER BY kind, r NULLS FIRST, model_id")
    print(format_table(summary, "table", None))
    print(f"\nTry it yourself (views and macros are loaded by `zoospectra sql`):\n{SQL_EXAMPLE.format(out=out)}")
    console.print(f"[bold]demo[/]: done in {time.perf_counter() - t0:.1f}s; results in {Path(out).resolve()}")
