"""Extra time of the random-direction null (docs/science.md#null) in the fast engine, measured as
a ratio in one run on a Llama-shaped zoo (issue 15: on by default only if under 20%).

    python -m bench.null_bench                          # hidden 1024, inter 2816, 10 LoRAs r 4..64
    python -m bench.null_bench --draws 1 8 --adapters 5 --reps 1

Per module of one Llama block: the base SVD is computed once and passed in (runs reuse stored
base SVDs, architecture.md#base-cache), then analyze_batch(fast) on the batch of adapters is
timed with null_draws = 0 and with each N of --draws, interleaved over --reps rounds so a load
change on the machine hits every setting alike. The figure is the ratio of the summed times.
"""
from __future__ import annotations

import argparse
import time

import torch

from bench.run_bench import llama_modules, lora, machine, realistic_base
from zoospectra.config import AnalysisConfig
from zoospectra.spectral import analyze_batch, base_svd
from zoospectra.updates import MatrixUpdate

RANKS = (4, 8, 16, 32, 64)


def updates(tensor: str, m: int, n: int, count: int) -> list[MatrixUpdate]:
    out = []
    for k in range(count):
        r = RANKS[k % len(RANKS)]
        b, a = lora(m, n, r, seed=1000 * k)
        out.append(MatrixUpdate(tensor, "lora", (m, n), B=b, A=a, rank=r, null_key=f"adapter-{k}"))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2816)
    ap.add_argument("--adapters", type=int, default=10)
    ap.add_argument("--draws", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args(argv)

    settings = [0, *args.draws]
    totals = dict.fromkeys(settings, 0.0)
    batches = []
    for i, (name, (m, n)) in enumerate(llama_modules(args.hidden, args.inter).items()):
        tensor = f"model.layers.0.{name}.weight"
        w0 = realistic_base(m, n, seed=i)
        batches.append((w0, base_svd(w0, AnalysisConfig()), updates(tensor, m, n, args.adapters)))
    for _ in range(args.reps):
        for draws in settings:
            cfg = AnalysisConfig(null_draws=draws)
            for w0, base, ups in batches:
                t = time.perf_counter()
                analyze_batch(w0, ups, cfg, base=base)
                totals[draws] += time.perf_counter() - t
    print(f"null_bench: hidden {args.hidden}, inter {args.inter}, {args.adapters} LoRAs (r {RANKS}) "
          f"x 7 modules, fast engine, base SVDs precomputed, {args.reps} interleaved rounds")
    print("; ".join(machine("cpu")))
    for draws in settings:
        extra = totals[draws] / totals[0] - 1.0
        print(f"null_draws={draws:3d}: {totals[draws]:8.2f} s  extra {100 * extra:+6.1f}%")


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
