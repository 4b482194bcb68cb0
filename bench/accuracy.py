"""Accuracy sweep of the fast engine at full width (issue 6 acceptance, docs/architecture.md#engines).

    python -m bench.accuracy                          # 4096 x 4096, 2 bases x 60 adapters
    python -m bench.accuracy --bases 3 --adapters 100 --shape 4096 4096 --out bench/ACCURACY.md

For each synthetic base (a 4096-wide float32 matrix with a trained-weight-like decaying spectrum,
bench.run_bench.realistic_base) and each LoRA update of a mix of ranks and scales (few intruders
to many), the fast engine (float64 and float32 runs, base SVD shared as in the pipeline) is
compared with an independent float64 reference written here:

  W0      numpy's full float64 SVD (LAPACK gesdd), once per base
  Wt      scipy's ARPACK (svds on the dense float64 Wt): the top K_store + 1 triplets to 1e-14,
          independent of the engine's block Davidson solver and of its reduced operator

Rule (the same as tests/test_fast.py, where CI checks it at small sizes): per-vector max |cos|
within 1e-4 of the reference wherever Wt's relative singular-value gap on both sides of j is at
least 1e-3; intruder counts identical for every eps in 0.1..0.9 and k in {10, K_store}. A
matrix whose counts differ is an exception and is listed with the cosine's distance to eps and
the gap. The float32 run is held to the same counts, and its cosine error is reported: a float32
base SVD resolves a cosine only to ~eps32 ||W|| / gap, like the paper's own float32 method.
"""
from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from zoospectra.config import AnalysisConfig
from zoospectra.spectral import analyze_batch, base_svd
from zoospectra.updates import MatrixUpdate

from .run_bench import realistic_base

EPS_SWEEP = [round(0.1 * i, 1) for i in range(1, 10)]
COS_TOL, GAP_MIN = 1e-4, 1e-3
RANKS = (1, 4, 8, 16, 32, 64)
SCALES = (0.05, 0.2, 0.5, 1.0, 2.0)        # ||B A|| relative to a typical base singular value


@dataclass
class Tally:
    matrices: int = 0
    vectors_checked: int = 0
    worst_cos_err: float = 0.0          # over vectors with gap >= GAP_MIN
    count_checks: int = 0
    count_mismatches: int = 0
    matrices_with_mismatch: int = 0
    exceptions: list[str] = field(default_factory=list)


def reference_wt(w0: np.ndarray, b: np.ndarray, a: np.ndarray, k: int, u0: np.ndarray,
                 v0h: np.ndarray, rng: np.random.Generator):
    """Top-k triplets of Wt = W0 + B A in float64 by ARPACK, with the max-|cos| records."""
    from scipy.sparse.linalg import svds

    wt = w0 + b @ a
    v_start = rng.standard_normal(min(wt.shape))
    ut, st, vth = svds(wt, k=k + 1, tol=1e-14, v0=v_start, which="LM", solver="arpack")
    order = np.argsort(st)[::-1]
    ut, st, vth = ut[:, order], st[order], vth[order]
    cu = np.abs(ut[:, :k].T @ u0)
    cv = np.abs(vth[:k] @ v0h.T)
    rel = np.abs(np.diff(st)) / st[:-1]                        # gap between j and j + 1
    gap = np.minimum(np.r_[np.inf, rel][:k], rel[:k])          # st has k + 1 values
    return cu.max(1), cv.max(1), gap


def check(tally: Tally, label: str, item, cos_u, cos_v, gap, k_store: int, cos_tol: float) -> None:
    well = gap[:k_store] >= GAP_MIN
    mismatch = False
    for side, ours, theirs in (("u", item.u, cos_u), ("v", item.v, cos_v)):
        err = np.abs(ours.max_cos[:k_store] - theirs[:k_store])
        tally.vectors_checked += int(well.sum())
        if well.any():
            tally.worst_cos_err = max(tally.worst_cos_err, float(err[well].max()))
            if float(err[well].max()) >= cos_tol:
                j = int(np.flatnonzero(well)[np.argmax(err[well])])
                tally.exceptions.append(f"{label} {side}: |cos error| {err[j]:.2e} at j={j} "
                                        f"(gap {gap[j]:.1e})")
        for eps in EPS_SWEEP:
            for kk in sorted({10, k_store}):
                tally.count_checks += 1
                mine, want = ours.intruders(kk, eps), int(np.sum(theirs[:kk] < eps))
                if mine != want:
                    mismatch = True
                    tally.count_mismatches += 1
                    j = int(np.argmin(np.abs(theirs[:kk] - eps)))
                    tally.exceptions.append(
                        f"{label} {side}: eps={eps} k={kk}: {mine} vs {want} intruders; nearest "
                        f"cosine {theirs[j]:.6f} is {abs(theirs[j] - eps):.1e} from eps, gap "
                        f"{gap[j]:.1e}")
    tally.matrices += 1
    tally.matrices_with_mismatch += int(mismatch)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=2, default=[4096, 4096])
    ap.add_argument("--bases", type=int, default=2)
    ap.add_argument("--adapters", type=int, default=60, help="LoRA updates per base")
    ap.add_argument("--batch", type=int, default=10, help="updates per analyze_batch call")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    m, n = args.shape
    k_store = AnalysisConfig().k_store
    rng = np.random.default_rng(0)
    tallies = {"float64": Tally(), "float32": Tally()}
    t_start = time.perf_counter()
    for bi in range(args.bases):
        w0 = realistic_base(m, n, seed=7000 + bi)
        w0d = w0.double().numpy()
        t = time.perf_counter()
        u0, s0, v0h = np.linalg.svd(w0d, full_matrices=False)
        print(f"base {bi}: reference SVD {time.perf_counter() - t:.1f}s", flush=True)
        bases = {dt: base_svd(w0, AnalysisConfig(dtype=dt, mode="fast")) for dt in tallies}
        typical = float(np.median(s0[:64]))
        ups, refs = [], []
        for ai in range(args.adapters):
            r = RANKS[ai % len(RANKS)]
            scale = SCALES[(ai // len(RANKS)) % len(SCALES)] * typical
            g = torch.Generator().manual_seed(10_000 * bi + ai)
            b = torch.randn(m, r, generator=g, dtype=torch.float64)
            a = torch.randn(r, n, generator=g, dtype=torch.float64)
            # ||B A||_2 from the r x r core (R_B R_A^T), not from an SVD of the m x n product
            core = torch.linalg.qr(b, mode="r")[1] @ torch.linalg.qr(a.T, mode="r")[1].T
            b = b * (scale / float(torch.linalg.matrix_norm(core, ord=2)))
            ups.append(MatrixUpdate(tensor="w", kind="lora", shape=(m, n), B=b.float(), A=a.float(),
                                    rank=r))
            t = time.perf_counter()
            # the reference sees exactly the float32 factors the engine reads
            refs.append(reference_wt(w0d, b.float().double().numpy(), a.float().double().numpy(),
                                     k_store, u0, v0h, rng))
            print(f"  adapter {ai} r={r} scale={scale / typical:.2f}: reference "
                  f"{time.perf_counter() - t:.1f}s", flush=True)
        for dt, tally in tallies.items():
            cfg = AnalysisConfig(dtype=dt, mode="fast")
            for lo in range(0, len(ups), args.batch):
                batch = analyze_batch(w0, ups[lo : lo + args.batch], cfg, base=bases[dt])
                for off, item in enumerate(batch.items):
                    cu, cv, gap = refs[lo + off]
                    check(tally, f"base {bi} adapter {lo + off} ({dt})", item, cu, cv, gap,
                          k_store, COS_TOL if dt == "float64" else 1e-3)
    report = render(args, tallies, time.perf_counter() - t_start)
    print(report)
    if args.out:
        Path(args.out).write_text(report)


def render(args, tallies: dict[str, Tally], seconds: float) -> str:
    m, n = args.shape
    lines = [
        "# Fast engine accuracy at full width",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} by `python -m bench.accuracy --shape {m} {n} "
        f"--bases {args.bases} --adapters {args.adapters}` in {seconds / 60:.0f} min "
        f"({platform.machine()}, torch {torch.__version__}).",
        "",
        f"{args.bases} synthetic {m}x{n} bases (decaying spectrum with spikes) x {args.adapters} "
        f"LoRA updates (ranks {', '.join(map(str, RANKS))}; ||dW||_2 from 0.05x to 2x the median "
        "of the top 64 base singular values). Reference: numpy float64 SVD of W0, ARPACK float64 "
        "top triplets of Wt. Intruder counts compared for eps 0.1..0.9 and k in {10, 32}, U and V.",
        "",
        "| engine run | matrices | vectors (gap >= 1e-3) | worst max-cos error | count checks "
        "| mismatches | matrices with a mismatch |",
        "|---|---|---|---|---|---|---|",
    ]
    for dt, t in tallies.items():
        share = 100.0 * (t.matrices - t.matrices_with_mismatch) / max(t.matrices, 1)
        lines.append(f"| fast, {dt} | {t.matrices} | {t.vectors_checked} | {t.worst_cos_err:.1e} "
                     f"| {t.count_checks} | {t.count_mismatches} | {t.matrices_with_mismatch} "
                     f"({share:.2f} % identical) |")
    lines += ["", "## Exceptions", ""]
    any_ = False
    for t in tallies.values():
        for e in t.exceptions:
            lines.append(f"- {e}")
            any_ = True
    if not any_:
        lines.append("None.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
