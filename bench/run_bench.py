"""Fast engine vs the paper's method, timed in one run on the same matrices (docs/architecture.md#engines).

    python -m bench.run_bench                       # full: widths 1024 2048 4096 + 4096x11008, e2e zoo
    python -m bench.run_bench --quick               # widths <= 2048, smaller zoo
    python -m bench.run_bench --device cuda --out bench/RESULTS-gpu.md

Paper's method, per (adapter, matrix): torch.linalg.svd of W0 and of Wt (float32, thin), then
max |U_t[:, :k]^T U0| (as in the paper's code and PEFT's reduce_intruder_dimension).
zoospectra fast: one base SVD per matrix shared by the batch (amortized over --amortize adapters;
the unamortized figure is reported too), then analyze_batch(mode="fast") per adapter.
End to end: a Llama-shaped zoo of real PEFT-format LoRA adapters on disk, analysed with the
planner and the unit code the executors run (loading and Parquet included, Ray excluded); the
baseline is timed on one (adapter, matrix) per shape and scaled by the pair counts.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from zoospectra.config import AnalysisConfig
from zoospectra.spectral import analyze_batch, base_svd
from zoospectra.updates import MatrixUpdate

LLAMA_MODULES = {  # name -> (out, in) for hidden 2048, intermediate 5632 (TinyLlama-1.1B widths)
    "self_attn.q_proj": (2048, 2048), "self_attn.k_proj": (2048, 2048),
    "self_attn.v_proj": (2048, 2048), "self_attn.o_proj": (2048, 2048),
    "mlp.gate_proj": (5632, 2048), "mlp.up_proj": (5632, 2048), "mlp.down_proj": (2048, 5632),
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str) -> tuple[float, object]:
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t, out


def realistic_base(m: int, n: int, seed: int, device: str = "cpu") -> torch.Tensor:
    """A [m, n] float32 matrix with a trained-weight-like spectrum: power-law decay plus spikes."""
    g = torch.Generator().manual_seed(seed)
    p = min(m, n)
    s = torch.arange(1, p + 1, dtype=torch.float64) ** -0.5
    s[:4] *= torch.tensor([6.0, 3.0, 2.0, 1.5], dtype=torch.float64)
    left = torch.randn(m, p, generator=g, dtype=torch.float64) / m**0.5   # near-orthonormal columns
    right = torch.randn(p, n, generator=g, dtype=torch.float64) / n**0.5
    return ((left * s) @ right).float().to(device)


def lora(m: int, n: int, r: int, seed: int, scale: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(m, r, generator=g) * scale / m**0.5
    a = torch.randn(r, n, generator=g) / n**0.5
    return b, a


def paper_method(w0: torch.Tensor, wt: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Shuttleworth et al.'s code: two full float32 SVDs and the cosine max over base vectors."""
    u0, _, _ = torch.linalg.svd(w0, full_matrices=False)
    ut, _, _ = torch.linalg.svd(wt, full_matrices=False)
    return (ut[:, :k].T @ u0).abs().max(dim=1).values


@dataclass
class MatrixRow:
    shape: tuple[int, int]
    r: int
    paper_s: float
    base_s: float
    adapter_s: float
    amortize: int
    agree: bool

    @property
    def amortized(self) -> float:
        return self.paper_s / (self.base_s / self.amortize + self.adapter_s)

    @property
    def unamortized(self) -> float:
        return self.paper_s / (self.base_s + self.adapter_s)


BATCH = 8  # adapters per analyze_batch call when timing the fast path per adapter


def bench_matrix(shape: tuple[int, int], ranks: list[int], device: str, amortize: int,
                 reps: int, log) -> list[MatrixRow]:
    m, n = shape
    w0 = realistic_base(m, n, seed=m + n, device=device)
    cfg = AnalysisConfig(mode="fast")                     # float32, like the paper
    base_s, base = _timed(lambda: base_svd(w0, cfg, device), device)
    rows = []
    for r in ranks:
        # a batch of distinct adapters of this rank, as a unit of the pipeline holds them
        upds = []
        for i in range(BATCH):
            b, a = lora(m, n, r, seed=1000 * r + i)
            upds.append(MatrixUpdate(tensor="w", kind="lora", shape=shape, B=b.to(device),
                                     A=a.to(device), rank=r))
        upd = upds[0]
        paper_s, cos = _timed(lambda upd=upd: paper_method(w0, w0 + upd.B @ upd.A), device)
        times, item = [], None
        for _ in range(reps):
            dt, batch = _timed(lambda upds=upds: analyze_batch(w0, upds, cfg, device, base=base), device)
            times.append(dt / BATCH)
            item = batch.items[0]
        agree = all(int((cos < e).sum()) == item.u.intruders(10, e) for e in (0.3, 0.5, 0.7))
        row = MatrixRow(shape, r, paper_s, base_s, statistics.median(times), amortize, agree)
        log(f"  {m}x{n} r={r}: paper {paper_s:.2f}s  base SVD {base_s:.2f}s  per adapter "
            f"{row.adapter_s:.3f}s  -> {row.amortized:.0f}x amortized, {row.unamortized:.1f}x not")
        rows.append(row)
    return rows


# --- end to end -----------------------------------------------------------------------------
def llama_modules(hidden: int, intermediate: int) -> dict[str, tuple[int, int]]:
    """The 7 linear modules of a Llama block: name -> (out, in)."""
    h, i = hidden, intermediate
    return {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h),
            "mlp.down_proj": (h, i)}


def write_base(base_dir: Path, layers: int, modules: dict[str, tuple[int, int]]) -> None:
    """A Llama-shaped base checkpoint with realistic (decaying) spectra."""
    from safetensors.torch import save_file

    base_dir.mkdir(parents=True)
    tensors = {}
    for i in range(layers):
        for j, (name, (m, n)) in enumerate(modules.items()):
            tensors[f"model.layers.{i}.{name}.weight"] = realistic_base(m, n, seed=100 * i + j)
    save_file(tensors, str(base_dir / "model.safetensors"))
    hidden = min(min(s) for s in modules.values())          # any subset of the 7 modules
    inter = max(max(s) for s in modules.values())
    (base_dir / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "architectures": ["LlamaForCausalLM"]}))


def write_adapters(root: Path, base_dir: Path, names: range, layers: int,
                   modules: dict[str, tuple[int, int]]) -> list[Path]:
    """PEFT-format LoRA adapters lora_<k>_r<r> of ranks cycling 4..64, one per k in `names`."""
    from safetensors.torch import save_file

    ranks = [4, 8, 16, 32, 64]
    adapters = []
    for k in names:
        r = ranks[k % len(ranks)]
        d = root / f"lora_{k:03d}_r{r}"
        d.mkdir()
        weights = {}
        for i in range(layers):
            for name, (m, n) in modules.items():
                b, a = lora(m, n, r, seed=1000 * k + i)
                key = f"base_model.model.model.layers.{i}.{name}"
                weights[f"{key}.lora_A.weight"] = a.contiguous()
                weights[f"{key}.lora_B.weight"] = (b * (r**0.5)).contiguous()   # undo alpha/r below
        save_file(weights, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": r, "lora_alpha": r**0.5 * 1.0, "task_type": "CAUSAL_LM",
            "target_modules": [n.split(".")[-1] for n in modules],
            "base_model_name_or_path": str(base_dir), "init_lora_weights": True}))
        adapters.append(d)
    return adapters


def write_zoo(root: Path, n_adapters: int, layers: int, log) -> tuple[Path, list[Path]]:
    """A Llama-shaped base checkpoint and n PEFT-format LoRA adapters of mixed ranks."""
    base_dir = root / "base"
    write_base(base_dir, layers, LLAMA_MODULES)
    adapters = write_adapters(root, base_dir, range(n_adapters), layers, LLAMA_MODULES)
    log(f"  zoo: {n_adapters} adapters x {layers * len(LLAMA_MODULES)} matrices under {root}")
    return base_dir, adapters


def bench_e2e(n_adapters: int, layers: int, device: str, log) -> dict:
    from zoospectra.io.refs import local_ref
    from zoospectra.run.execute import new_run_id
    from zoospectra.run.plan import build_plan
    from zoospectra.run.store import ResultsStore
    from zoospectra.run.unit import process_unit

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base_dir, adapters = write_zoo(root / "zoo", n_adapters, layers, log)
        cfg = AnalysisConfig(mode="fast")
        results = root / "results"
        t0 = time.perf_counter()
        plan = build_plan(local_ref(base_dir, "base"), [local_ref(a) for a in adapters], cfg,
                          batch_size=max(64, n_adapters))
        store = ResultsStore(results)
        run_id = new_run_id()
        store.start_run(run_id, cfg.to_json(), "bench")
        store.write_models([dict(mrow, run_id=run_id) for mrow in plan.models])
        outcomes = [process_unit(u, cfg, run_id, str(results), device=device) for u in plan.units]
        fast_s = time.perf_counter() - t0
        n_pairs = sum(o.n_done for o in outcomes)
        failed = sum(o.n_failed for o in outcomes)
        log(f"  fast end to end: {fast_s:.1f}s for {n_pairs} (adapter, matrix) pairs, {failed} failed")

        # baseline: one (adapter, matrix) per distinct shape, scaled by how many pairs have it
        paper_s, per_shape = 0.0, {}
        for shape in sorted(set(LLAMA_MODULES.values())):
            w0 = realistic_base(*shape, seed=7).to(device)
            b, a = lora(*shape, 16, seed=7)
            dt, _ = _timed(lambda w0=w0, b=b, a=a: paper_method(w0, w0 + b.to(device) @ a.to(device)), device)
            count = n_adapters * layers * sum(1 for s in LLAMA_MODULES.values() if s == shape)
            per_shape[f"{shape[0]}x{shape[1]}"] = dt
            paper_s += dt * count
        log(f"  paper (scaled from one pair per shape): {paper_s:.0f}s -> {paper_s / fast_s:.0f}x")
        return {"fast_s": fast_s, "paper_s": paper_s, "pairs": n_pairs, "failed": failed,
                "per_shape": per_shape, "adapters": n_adapters, "layers": layers}


# --- report -----------------------------------------------------------------------------------
def machine(device: str) -> list[str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    lines = [f"- CPU: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
             f"- torch {torch.__version__}, Python {platform.python_version()}, device `{device}`"]
    if device.startswith("cuda"):
        lines.append(f"- GPU: {torch.cuda.get_device_name(0)}")
    return lines


def report(rows: list[MatrixRow], e2e: dict | None, device: str, args) -> str:
    out = ["# zoospectra fast engine vs the paper's method", "",
           f"Measured {time.strftime('%Y-%m-%d %H:%M')} by `python -m bench.run_bench "
           f"{' '.join(args.argv)}`; every ratio compares two timings of the same run.", "",
           "## Machine", "", *machine(device), "",
           "## Per adapter-matrix (LoRA, float32 like the paper)", "",
           "Paper = `svd(W0)` + `svd(Wt)` + cosine max, per adapter. Fast = base SVD / "
           f"{args.amortize} (shared by a batch) + the adapter's own work, timed as one "
           f"analyze_batch over {BATCH} distinct adapters / {BATCH} (the fast engine computes "
           "everything the exact one does: k_store=32 vectors per side, 64 spectrum values, "
           "stats, similarity); unamortized = full "
           "base SVD + adapter. `agree`: intruder counts at eps 0.3/0.5/0.7, k=10 equal.", "",
           "| shape | r | paper s | base SVD s | per adapter s | ratio (amortized) | ratio (unamortized) | agree |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.shape[0]}x{r.shape[1]} | {r.r} | {r.paper_s:.2f} | {r.base_s:.2f} | "
                   f"{r.adapter_s:.4f} | {r.amortized:.0f}x | {r.unamortized:.1f}x | {r.agree} |")
    if e2e:
        out += ["", "## End to end (Llama-shaped zoo, loading and Parquet included, Ray excluded)", "",
                f"{e2e['adapters']} LoRA adapters (ranks 4..64) x {e2e['layers']} layers x 7 modules = "
                f"{e2e['pairs']} (adapter, matrix) pairs ({e2e['failed']} failed).", "",
                "| | seconds |", "|---|---|",
                f"| zoospectra fast (plan + load + analyse + Parquet) | {e2e['fast_s']:.1f} |",
                f"| paper's method (scaled from one pair per shape) | {e2e['paper_s']:.0f} |",
                f"| **ratio** | **{e2e['paper_s'] / e2e['fast_s']:.0f}x** |", "",
                "Baseline seconds per pair: " + ", ".join(f"{k}: {v:.2f}" for k, v in e2e["per_shape"].items())]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    import sys

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=None)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="widths <= 2048 and a small zoo")
    ap.add_argument("--amortize", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--adapters", type=int, default=None, help="adapters in the end-to-end zoo")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--no-tall", action="store_true", help="skip the 4096x11008 matrix")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    widths = args.widths or ([1024, 2048] if args.quick else [1024, 2048, 4096])
    shapes = [(w, w) for w in widths]
    if not args.quick and not args.no_tall and max(widths) >= 4096:
        shapes.append((4096, 11008))
    n_adapters = args.adapters or (10 if args.quick else 50)
    out = Path(args.out or ("bench/RESULTS-quick.md" if args.quick else "bench/RESULTS.md"))

    def log(msg: str) -> None:
        print(msg, flush=True)

    rows: list[MatrixRow] = []
    for shape in shapes:
        log(f"matrix {shape[0]}x{shape[1]}")
        rows += bench_matrix(shape, args.ranks, args.device, args.amortize, args.reps, log)
        out.write_text(report(rows, None, args.device, args))
    e2e = None if args.no_e2e else bench_e2e(n_adapters, args.layers, args.device, log)
    out.write_text(report(rows, e2e, args.device, args))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
