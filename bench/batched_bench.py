"""Batched same-rank LoRA solves vs the per-adapter path, timed in one run (issue 13).

    python -m bench.batched_bench                       # CPU, 1024x1024, 16 adapters, ranks 8 and 64
    python -m bench.batched_bench --device cuda --size 4096 --adapters 64

Both paths analyse the same batch against one shared base SVD (analyze_fast with batched=False
and batched=True); reported: seconds per adapter-matrix for each, their ratio, and whether
every intruder count and argmax index agrees.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from bench.run_bench import _sync, lora, machine, realistic_base
from zoospectra.config import AnalysisConfig
from zoospectra.spectral import base_svd
from zoospectra.spectral.fast import analyze_fast
from zoospectra.updates import MatrixUpdate


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args(argv)
    n = args.size
    w0 = realistic_base(n, n, seed=1, device=args.device)
    cfg = AnalysisConfig()
    base = base_svd(w0, cfg, args.device)
    print("\n".join(machine(args.device)))
    print("| shape | r | adapters | unbatched ms/adapter | batched ms/adapter | batched speed-up | counts agree |")
    print("|---|---|---|---|---|---|---|")
    for r in args.ranks:
        ups = []
        for i in range(args.adapters):
            b, a = lora(n, n, r, seed=100 * r + i)
            ups.append(MatrixUpdate(tensor="w", kind="lora", shape=(n, n), B=b.to(args.device),
                                    A=a.to(args.device), rank=r))
        times, out = {}, {}
        for batched in (False, True):
            best = float("inf")
            for _ in range(args.reps):
                _sync(args.device)
                t = time.perf_counter()
                out[batched] = analyze_fast(w0, ups, cfg, args.device, base=base, batched=batched)
                _sync(args.device)
                best = min(best, time.perf_counter() - t)
            times[batched] = best / args.adapters
        agree = all((a.intruders_u, a.intruders_v) == (b.intruders_u, b.intruders_v)
                    and np.array_equal(a.u.argmax, b.u.argmax)
                    for a, b in zip(out[False].items, out[True].items, strict=True))
        print(f"| {n}x{n} | {r} | {args.adapters} | {times[False] * 1000:.1f} | {times[True] * 1000:.1f} | "
              f"{times[False] / times[True]:.2f}x | {agree} |")


if __name__ == "__main__":
    main()
