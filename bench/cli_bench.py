"""The whole `zoospectra analyze` CLI (default flags, Ray start included) vs the paper's method,
timed in one run on a Llama-shaped zoo (issue 13).

    python -m bench.cli_bench                              # hidden 1024, inter 2816, 2 layers, 30 LoRAs
    python -m bench.cli_bench --adapters 10 --paper-pairs 2   # quick: paper timed on 2 pairs per shape
    python -m bench.cli_bench --local                      # also the in-process executor (no Ray)
    python -m bench.cli_bench --sizes 10 60 100            # also zoos of 10, 60, 100 adapters: fixed
                                                           # and per-adapter cost, where 20x is reached

The zoo: a synthetic base (realistic decaying spectra) and PEFT-format LoRA adapters of ranks
4..64 on all 7 linear modules. The CLI runs as a subprocess exactly as a user types it, into a
fresh results root (its base cache starts empty, so the base SVDs are in the figure). A second
CLI run over new adapters of the same base into the same root shows the stored base SVDs reused.
The paper's method: per (adapter, matrix), two full float32 thin SVDs (W0 and Wt = W0 + dW) and
the max |cos| of the top-k singular vectors of Wt against every base vector, both sides; its
intruder totals are compared with the CLI's (`matrices` table). By default every pair is timed;
`--paper-pairs N` times N pairs per shape and scales by the pair counts (totals then not compared).
`--sizes` runs the CLI again on the first N adapters of a larger zoo (fresh root each) and fits
CLI seconds = fixed + N x per-adapter: the paper's method costs the same per adapter whatever N,
so the ratio grows with the zoo towards paper / per-adapter, and the fit says from which N on the
CLI is 20x.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.run_bench import llama_modules, machine, write_adapters, write_base

K, EPS = 10, 0.5


WORK_MARKER = ".zs-cli-bench"


def claim_work(work: Path) -> None:
    """The bench rewrites work/zoo and work/results: only in a folder that is new, empty or its own."""
    if work.exists() and any(work.iterdir()) and not (work / WORK_MARKER).is_file():
        raise SystemExit(f"--work {work} holds files this bench did not write; pass a new or empty folder")
    work.mkdir(parents=True, exist_ok=True)
    (work / WORK_MARKER).write_text("zoospectra cli_bench work folder\n")


def fresh_dir(work: Path, name: str) -> Path:
    """work/name emptied for a new zoo or results root: `work` is a folder claim_work accepted (new,
    empty or this bench's own), so what is removed here is what an earlier run of it wrote."""
    path = work / name
    if path.is_symlink():
        raise SystemExit(f"{path} is a symlink; this bench only replaces folders it made")
    if path.exists():
        shutil.rmtree(path)
    return path


def run_cli(base: Path, adapters: list[Path], out: Path, *extra: str) -> float:
    """Wall seconds of one `zoospectra analyze` process (interpreter and Ray start included)."""
    cmd = [sys.executable, "-m", "zoospectra.cli", "analyze", "--base", str(base), *map(str, adapters),
           "--out", str(out), *extra]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"zoospectra analyze failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return dt


def cli_counts(out: Path) -> dict[tuple[str, str], tuple[int, int]]:
    """(model_id, tensor) -> (intruders_u, intruders_v) from the `matrices` table."""
    import pyarrow.parquet as pq

    got = {}
    for path in (out / "units").glob("*/matrices.parquet"):
        for r in pq.read_table(path, columns=["model_id", "tensor", "intruders_u", "intruders_v"]).to_pylist():
            got[(r["model_id"], r["tensor"])] = (r["intruders_u"], r["intruders_v"])
    return got


def cli_totals(counts: dict) -> tuple[int, int, int]:
    return len(counts), sum(u for u, _ in counts.values()), sum(v for _, v in counts.values())


def last_run(out: Path) -> dict:
    runs = sorted((out / "runs").glob("*.json"))
    return json.loads(runs[-1].read_text())


def paper_counts(w0: torch.Tensor, wt: torch.Tensor) -> tuple[int, int]:
    """Shuttleworth et al.: full SVDs of W0 and Wt; top-k vectors of Wt with max |cos| < eps."""
    u0, _, vh0 = torch.linalg.svd(w0, full_matrices=False)
    ut, _, vht = torch.linalg.svd(wt, full_matrices=False)
    cu = (ut[:, :K].T @ u0).abs().max(dim=1).values
    cv = (vht[:K] @ vh0.T).abs().max(dim=1).values
    return int((cu < EPS).sum()), int((cv < EPS).sum())


def best_of_threads(w0: torch.Tensor, wt: torch.Tensor) -> tuple[float, tuple[int, int]]:
    """The paper's pair timed on 1 and on all BLAS threads; the faster one counts (on a shared,
    oversubscribed machine multi-threaded LAPACK can be several times slower than one thread)."""
    best, counts = float("inf"), (0, 0)
    n = torch.get_num_threads()
    for threads in sorted({1, n}):
        torch.set_num_threads(threads)
        t = time.perf_counter()
        counts = paper_counts(w0, wt)
        best = min(best, time.perf_counter() - t)
    torch.set_num_threads(n)
    return best, counts


def paper_method(base: Path, adapters: list[Path], per_shape: int | None, log) -> dict:
    """Time the paper's method over every (adapter, matrix) pair, or per_shape pairs per shape."""
    from safetensors import safe_open

    with safe_open(str(base / "model.safetensors"), "pt") as f:
        w0s = {k: f.get_tensor(k).float() for k in f.keys()}
    seconds, timed, counts, shape_s, per_pair = 0.0, 0, [0, 0], {}, {}
    n_pairs: dict[tuple, int] = {}
    for d in adapters:
        timed_before = timed
        cfg = json.loads((d / "adapter_config.json").read_text())
        scale = cfg["lora_alpha"] / cfg["r"]
        with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
            for key in sorted(w0s):
                stem = "base_model.model." + key.removesuffix(".weight")
                w0 = w0s[key]
                shape = tuple(w0.shape)
                n_pairs[shape] = n_pairs.get(shape, 0) + 1
                if per_shape is not None and len(shape_s.get(shape, [])) >= per_shape:
                    continue
                b, a = f.get_tensor(f"{stem}.lora_B.weight"), f.get_tensor(f"{stem}.lora_A.weight")
                wt = w0 + scale * (b @ a)
                dt, (cu, cv) = best_of_threads(w0, wt)
                seconds += dt
                timed += 1
                counts[0] += cu
                counts[1] += cv
                per_pair[(d.name, key)] = (cu, cv)
                shape_s.setdefault(shape, []).append(dt)
        if timed > timed_before:  # an adapter whose pairs were all skipped (--paper-pairs) says nothing
            log(f"  paper: {timed} pairs timed, {seconds:.0f}s so far")
    if per_shape is not None:  # scale each shape's mean by its pair count
        seconds = sum(sum(v) / len(v) * n_pairs[s] for s, v in shape_s.items())
    return {"seconds": seconds, "timed_pairs": timed, "pairs": sum(n_pairs.values()),
            "intruders_u": counts[0], "intruders_v": counts[1], "per_pair": per_pair,
            "per_shape": {f"{s[0]}x{s[1]}": sum(v) / len(v) for s, v in shape_s.items()}}


def fit_sizes(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(fixed, per_adapter): least squares CLI seconds = fixed + n x per_adapter (numpy.polyfit)."""
    import numpy as np

    per, fixed = np.polyfit([n for n, _ in points], [t for _, t in points], 1)
    return float(fixed), float(per)


def sizes_report(sizes: dict[int, float], paper_per_adapter: float, tensors: int, main_n: int,
                 target: float = 20.0) -> list[str]:
    lines = ["", "Zoo size (the same zoo's first N adapters, fresh results root each; paper's method "
             "scaled per adapter from the pairs timed above):", "",
             "| adapters | pairs | CLI seconds | paper seconds | ratio |", "|---|---|---|---|---|"]
    for n, t in sorted(sizes.items()):
        lines.append(f"| {n} | {n * tensors} | {t:.1f} | {paper_per_adapter * n:.1f} | "
                     f"{paper_per_adapter * n / t:.1f}x |")
    if len(sizes) < 2:
        return lines
    fixed, per = fit_sizes(sorted(sizes.items()))
    lines += ["", f"Fit: CLI seconds = {fixed:.1f} + {per:.3f} x adapters (fixed: interpreter, Ray start "
              f"and worker imports, the {tensors} base SVDs, exit); paper {paper_per_adapter:.2f} s per adapter."]
    if per <= 0:
        lines.append("The per-adapter cost is below these runs' noise: time larger zoos (--sizes).")
        return lines
    lines[-1] += f" The ratio tends to {paper_per_adapter / per:.0f}x for large zoos."
    if paper_per_adapter <= target * per:
        lines.append(f"{target:.0f}x is not reached at any size: the per-adapter cost alone is too high.")
        return lines
    need = target * fixed / (paper_per_adapter - target * per)
    room = paper_per_adapter * main_n / target - fixed
    lines.append(f"{target:.0f}x from about {need:.0f} adapters on. A zoo of {main_n} is {target:.0f}x only if "
                 + (f"each adapter costs at most {room / main_n:.3f} s ({per:.3f} s measured)."
                    if room > 0 else f"the fixed cost drops below {paper_per_adapter * main_n / target:.1f} s."))
    return lines


def report(args, zoo: dict, cli: dict, second: dict | None, paper: dict, local: dict | None = None,
           sizes: dict[int, float] | None = None) -> str:
    ratio = paper["seconds"] / cli["seconds"]
    exact_totals = paper["timed_pairs"] == paper["pairs"]
    timed = "all pairs timed" if exact_totals else f"scaled from {paper['timed_pairs']} timed pairs"
    lines = [
        "## Whole CLI vs the paper's method (issue 13, `python -m bench.cli_bench "
        f"{' '.join(args.argv)}`, {time.strftime('%Y-%m-%d %H:%M')})", "",
        *machine("cpu"), "",
        f"Llama-shaped zoo: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers x 7 "
        f"modules, {args.adapters} LoRA adapters of ranks 4..64 = {zoo['pairs']} (adapter, matrix) pairs. "
        "`zoospectra analyze BASE ADAPTERS... --out R` with default flags (fast mode, batch 32), "
        "wall time of the process, Ray start included, fresh results root and base cache.", "",
        f"Load average before / after: {args.load_before} / {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
        "(the 2 cores are shared with other jobs: absolute seconds are noisy, the ratio is of one run).", "",
        "| | seconds |", "|---|---|",
        f"| zoospectra analyze (default flags, whole process) | {cli['seconds']:.1f} |",
        f"| paper's method, two float32 SVDs per pair, best of 1 and {torch.get_num_threads()} threads ({timed}) "
        f"| {paper['seconds']:.0f} |",
        f"| **ratio** | **{ratio:.1f}x** |",
        *([f"| zoospectra analyze --local (in-process, no Ray; whole process) | {local['seconds']:.1f} |",
           f"| **ratio, --local** | **{paper['seconds'] / local['seconds']:.1f}x** |"] if local else []),
        "",
        f"Base SVDs: {cli['run'].get('base_svd_computed')} computed, {cli['run'].get('base_svd_reused')} reused "
        f"({zoo['tensors']} base tensors touched).",
    ]
    checked = {pair: cli["counts"].get(pair) for pair in paper["per_pair"]}
    diff = sum(checked[pair] != want for pair, want in paper["per_pair"].items())
    sub = {k: cli["counts"][k] for k in paper["per_pair"] if k in cli["counts"]}
    lines.append(f"Intruder counts (k={K}, eps={EPS}, U and V) on the {len(checked)} pairs the paper's "
                 f"method ran on: CLI U {sum(u for u, _ in sub.values())}, V {sum(v for _, v in sub.values())}; "
                 f"paper U {paper['intruders_u']}, V {paper['intruders_v']}; {diff} pairs differ"
                 + (" (all pairs: totals identical)." if exact_totals and diff == 0 else "."))
    if local:
        same = "identical to" if local["totals"] == cli["totals"] else "DIFFERENT from"
        lines.append(f"--local run: intruders U {local['totals'][1]}, V {local['totals'][2]} over "
                     f"{local['totals'][0]} pairs, {same} the default run's.")
    if second:
        lines.append(f"Second run, {second['adapters']} new adapters into the same root: "
                     f"{second['seconds']:.1f}s, base SVDs {second['run'].get('base_svd_computed')} computed, "
                     f"{second['run'].get('base_svd_reused')} reused.")
    lines.append("Paper seconds per pair: " + ", ".join(f"{k}: {v:.2f}" for k, v in paper["per_shape"].items()))
    if sizes:
        lines += sizes_report({args.adapters: cli["seconds"], **sizes}, paper["seconds"] / args.adapters,
                             zoo["tensors"], args.adapters)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--adapters", type=int, default=30)
    ap.add_argument("--second", type=int, default=10, help="new adapters for the second run (0: none)")
    ap.add_argument("--paper-pairs", type=int, default=None, help="time N pairs per shape and scale")
    ap.add_argument("--local", action="store_true", help="also time the CLI with --local (in-process)")
    ap.add_argument("--sizes", type=int, nargs="*", default=[],
                    help="also time the CLI on zoos of these many adapters and fit fixed + per-adapter cost")
    ap.add_argument("--work", default=None, help="zoo + results directory (default: a temp dir)")
    ap.add_argument("--out", default=None, help="append the section to this Markdown file")
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if any(n < 1 for n in args.sizes) or args.adapters < 1:
        ap.error("--adapters and --sizes take positive adapter counts")

    def log(msg: str) -> None:
        print(msg, flush=True)

    args.load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    work = Path(args.work or tempfile.mkdtemp(prefix="zs-cli-bench-"))
    claim_work(work)
    modules = llama_modules(args.hidden, args.intermediate)
    zoo_dir = fresh_dir(work, "zoo")
    base = zoo_dir / "base"
    write_base(base, args.layers, modules)
    adapters = write_adapters(zoo_dir, base, range(args.adapters), args.layers, modules)
    fresh = write_adapters(zoo_dir, base, range(args.adapters, args.adapters + args.second),
                           args.layers, modules)
    top = args.adapters + args.second
    extra = write_adapters(zoo_dir, base, range(top, max([top, *args.sizes])), args.layers, modules)
    pool = adapters + fresh + extra          # --sizes N: the first N of these
    zoo = {"pairs": args.adapters * args.layers * 7, "tensors": args.layers * 7}
    log(f"zoo: {args.adapters} + {args.second} adapters x {zoo['tensors']} matrices under {zoo_dir}")

    out = fresh_dir(work, "results")
    cli = {"seconds": run_cli(base, adapters, out)}
    log(f"cli: {cli['seconds']:.1f}s")
    cli["counts"], cli["run"] = cli_counts(out), last_run(out)
    cli["totals"] = cli_totals(cli["counts"])
    log(f"cli: {cli['seconds']:.1f}s, {cli['totals'][0]} pairs, intruders U {cli['totals'][1]} "
        f"V {cli['totals'][2]}, base SVDs computed {cli['run'].get('base_svd_computed')}")
    local = None
    if args.local:  # the same zoo in-process (--local: no Ray), fresh root and base cache
        local_out = fresh_dir(work, "results-local")
        local = {"seconds": run_cli(base, adapters, local_out, "--local")}
        local["totals"] = cli_totals(cli_counts(local_out))
        log(f"cli --local: {local['seconds']:.1f}s, intruders U {local['totals'][1]} V {local['totals'][2]}")
    second = None
    if args.second:
        second = {"seconds": run_cli(base, fresh, out), "adapters": args.second}
        second["run"] = last_run(out)
        log(f"second run: {second['seconds']:.1f}s, base SVDs computed "
            f"{second['run'].get('base_svd_computed')} reused {second['run'].get('base_svd_reused')}")
    sizes: dict[int, float] = {}
    for n in sorted(set(args.sizes) - {args.adapters}):
        size_out = fresh_dir(work, f"results-{n}")
        sizes[n] = run_cli(base, pool[:n], size_out)
        log(f"cli, {n} adapters: {sizes[n]:.1f}s")
    paper = paper_method(base, adapters, args.paper_pairs, log)
    log(f"paper: {paper['seconds']:.0f}s -> {paper['seconds'] / cli['seconds']:.1f}x")
    text = report(args, zoo, cli, second, paper, local, sizes)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
