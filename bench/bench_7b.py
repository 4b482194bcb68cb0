"""7B-shaped zoo benchmark (issue 13): hidden 4096, intermediate 11008, the 7 Llama modules,
LoRA adapters of mixed ranks, through the real pipeline (plan, base SVD store, units, Parquet).

    python -m bench.bench_7b                                    # 1 layer x 7 modules, 100 adapters
    python -m bench.bench_7b --device cuda --out bench/RESULTS-7b-gpu.md
    python -m bench.bench_7b --adapters 12 --modules q_proj down_proj   # reduced, for a 2-core CPU

Run 1 analyses the zoo into a fresh results root (every touched base matrix decomposed once and
stored); run 2 analyses new adapters of the same base into the same root (0 decompositions).
Reported: seconds per base decomposition per shape (as stored with each decomposition), seconds
per adapter-matrix (run 1's wall time minus its decompositions, over its pairs: loading,
analysis and Parquet included), base SVDs computed / reused per run, whole-run times, and the
projection to a 32-layer 7B model (224 matrices) x 500 adapters on the same device:
224 decompositions (by shape) + 500 x 224 adapter-matrices (by shape).
Synthetic bases have a realistic decaying spectrum (bench.run_bench.realistic_base).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.run_bench import llama_modules, machine, write_adapters, write_base

SEVEN_B = llama_modules(4096, 11008)
LAYERS_7B, ADAPTERS_TARGET = 32, 500


def run(base: Path, adapters: list[Path], out: Path, device: str, executor: str, batch: int) -> dict:
    from zoospectra.cli import run_analysis
    from zoospectra.config import AnalysisConfig
    from zoospectra.io.refs import local_ref

    t = time.perf_counter()
    s = run_analysis(local_ref(base, "base-7b"), [local_ref(a) for a in adapters], AnalysisConfig(),
                     str(out), quiet=True, executor=executor, device=device, batch_size=batch)
    return {"seconds": time.perf_counter() - t, "computed": s.base_svd_computed,
            "reused": s.base_svd_reused, "failed": s.n_failed + s.n_member_errors}


def stored_base_seconds(bases: Path) -> dict[str, list[float]]:
    """shape 'mxn' -> seconds of each stored decomposition (safetensors metadata)."""
    from safetensors import safe_open

    out: dict[str, list[float]] = {}
    for f in bases.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            meta = st.metadata()
        key = json.loads(meta["zoospectra.key"])
        out.setdefault(f"{key['shape'][0]}x{key['shape'][1]}", []).append(float(meta["zoospectra.seconds"]))
    return out


def pair_seconds(out: Path) -> dict[str, float]:
    """shape -> mean engine seconds per adapter-matrix (matrices.seconds)."""
    import pyarrow.parquet as pq

    acc: dict[str, list[float]] = {}
    for p in (out / "units").glob("*/matrices.parquet"):
        for r in pq.read_table(p, columns=["m", "n", "seconds"]).to_pylist():
            acc.setdefault(f"{r['m']}x{r['n']}", []).append(r["seconds"])
    return {k: sum(v) / len(v) for k, v in acc.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--second", type=int, default=10, help="new adapters in run 2")
    ap.add_argument("--modules", nargs="+", default=None, help="subset, e.g. q_proj down_proj")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--executor", default="local", choices=("local", "ray"))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=None, help="append the report to this Markdown file")
    args = ap.parse_args(argv)
    argv_s = " ".join(sys.argv[1:] if argv is None else argv)
    modules = {k: v for k, v in SEVEN_B.items()
               if not args.modules or k.split(".")[-1] in args.modules}
    load0 = " ".join(f"{x:.1f}" for x in os.getloadavg())

    def log(msg: str) -> None:
        print(msg, flush=True)

    work = Path(args.work or tempfile.mkdtemp(prefix="zs-7b-"))
    zoo = work / "zoo"
    t = time.perf_counter()
    write_base(zoo / "base", args.layers, modules) if not (zoo / "base").exists() else None
    adapters = write_adapters(zoo, zoo / "base", range(args.adapters), args.layers, modules) \
        if not (zoo / "lora_000_r4").exists() else sorted(zoo.glob("lora_*"))[: args.adapters]
    fresh = [p for p in sorted(zoo.glob("lora_*")) if int(p.name.split("_")[1]) >= args.adapters]
    if not fresh and args.second:
        fresh = write_adapters(zoo, zoo / "base", range(args.adapters, args.adapters + args.second),
                               args.layers, modules)
    log(f"zoo: {len(adapters)} + {len(fresh)} adapters x {args.layers * len(modules)} matrices "
        f"({time.perf_counter() - t:.0f}s to write)")
    out = work / "results"
    r1 = run(zoo / "base", adapters, out, args.device, args.executor, args.batch_size)
    log(f"run 1: {r1}")
    r2 = run(zoo / "base", fresh, out, args.device, args.executor, args.batch_size) if fresh else None
    log(f"run 2: {r2}")

    base_s = stored_base_seconds(out / "bases")
    engine_s = pair_seconds(out)
    base_total = sum(sum(v) for v in base_s.values())
    pairs = len(adapters) * args.layers * len(modules)
    per_pair = (r1["seconds"] - base_total) / pairs
    shape_of = {k: f"{m}x{n}" for k, (m, n) in SEVEN_B.items()}
    mean_base = {s: sum(v) / len(v) for s, v in base_s.items()}
    # 7B: per layer 4 x (4096x4096) + 2 x (11008x4096) + 1 x (4096x11008); an unmeasured shape
    # takes the measured one of the same size (the SVD cost is symmetric in m, n)
    def base_for(shape: str) -> float:
        m, n = shape.split("x")
        return mean_base.get(shape, mean_base.get(f"{n}x{m}", float("nan")))
    proj_base = LAYERS_7B * sum(base_for(shape_of[k]) for k in SEVEN_B)
    engine_total = sum(engine_s.values()) / max(len(engine_s), 1)
    # per adapter-matrix wall: measured mean; scaled per shape by the engine's own per-shape times
    per_shape_wall = {s: per_pair * engine_s[s] / engine_total for s in engine_s}

    def pair_for(shape: str) -> float:
        m, n = shape.split("x")
        return per_shape_wall.get(shape, per_shape_wall.get(f"{n}x{m}", per_pair))
    proj_pairs = ADAPTERS_TARGET * LAYERS_7B * sum(pair_for(shape_of[k]) for k in SEVEN_B)
    proj = proj_base + proj_pairs
    lines = [
        f"## 7B-shaped zoo (`python -m bench.bench_7b {argv_s}`, {time.strftime('%Y-%m-%d %H:%M')})", "",
        *machine(args.device), f"- load average before / after: {load0} / "
        + " ".join(f"{x:.1f}" for x in os.getloadavg()), "",
        f"{len(adapters)} LoRA adapters (ranks 4..64) x {args.layers} layer(s) x modules "
        f"{', '.join(k.split('.')[-1] for k in modules)} = {pairs} adapter-matrices; executor "
        f"{args.executor}, batch {args.batch_size}, fast mode (default), float32.", "",
        "| | value |", "|---|---|",
        f"| run 1: whole run (plan, base SVDs, load, analyse, Parquet) | {r1['seconds']:.1f} s |",
        f"| run 1: base SVDs computed / reused | {r1['computed']} / {r1['reused']} |",
        *(f"| base SVD {s} (per decomposition) | {v:.1f} s |" for s, v in sorted(mean_base.items())),
        f"| per adapter-matrix, wall (run 1 minus its base SVDs, / {pairs}) | {per_pair * 1000:.0f} ms |",
        *(f"| per adapter-matrix {s}, engine only | {v * 1000:.0f} ms |" for s, v in sorted(engine_s.items())),
    ]
    if r2:
        lines.append(f"| run 2 ({len(fresh)} new adapters, same root): whole run; base SVDs computed / reused "
                     f"| {r2['seconds']:.1f} s; {r2['computed']} / {r2['reused']} |")
    lines += [
        f"| **projection: 500 adapters x 224 matrices (32 layers), this device** | "
        f"**{proj / 60:.0f} min** ({proj_base / 60:.0f} min base SVDs once + {proj_pairs / 60:.0f} min adapters) |",
        "", "Failed pairs: " + str(r1["failed"] + (r2["failed"] if r2 else 0)) + ".",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
