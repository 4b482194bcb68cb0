"""Peak resident memory of a Ray worker analysing a Llama-shaped checkpoint.

    python -m bench.memory [--hidden 4096 --intermediate 11008 --layers 2 --adapters 2 --mode fast]

Writes a bf16 base sharded into one file per layer (+ index), PEFT-format LoRA adapters on all 7
linear modules, runs the real pipeline on a local Ray (one worker at a time, so the figure is one
worker's), and prints the largest peak RSS any worker reported (getrusage in the task).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def llama_modules(h: int, f: int) -> dict[str, tuple[int, int]]:
    return {
        "self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
        "self_attn.o_proj": (h, h), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h),
        "mlp.down_proj": (h, f),
    }


def write_checkpoint(root: Path, h: int, f: int, layers: int, n_adapters: int, r: int,
                     modules: list[str] | None = None) -> tuple[Path, list[Path]]:
    from safetensors.torch import save_file

    base = root / "base"
    base.mkdir(parents=True)
    mods = {k: v for k, v in llama_modules(h, f).items() if not modules or k.split(".")[-1] in modules}
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i in range(layers):  # one shard per layer: reading a matrix must not load the rest
        shard = f"model-{i + 1:05d}-of-{layers:05d}.safetensors"
        tensors = {f"model.layers.{i}.{name}.weight": (torch.randn(m, n, generator=gen) / n**0.5).to(torch.bfloat16)
                   for name, (m, n) in mods.items()}
        save_file(tensors, str(base / shard))
        weight_map.update({k: shard for k in tensors})
        del tensors
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": h,
                                                  "intermediate_size": f, "num_hidden_layers": layers}))
    adapters = []
    for k in range(n_adapters):
        d = root / f"lora{k}"
        d.mkdir()
        w = {}
        for i in range(layers):
            for name, (m, n) in mods.items():
                key = f"base_model.model.model.layers.{i}.{name}"
                w[f"{key}.lora_A.weight"] = torch.randn(r, n, generator=gen).to(torch.bfloat16) / n**0.5
                w[f"{key}.lora_B.weight"] = torch.randn(m, r, generator=gen).to(torch.bfloat16) * 0.05
        save_file(w, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "task_type": "CAUSAL_LM",
            "target_modules": [n.split(".")[-1] for n in mods], "base_model_name_or_path": "llama-shaped"}))
        adapters.append(d)
    return base, adapters


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--adapters", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--mode", default="fast", choices=["exact", "fast"])
    p.add_argument("--modules", nargs="*", default=None,
                   help="only these modules (e.g. down_proj: the largest matrix sets the peak)")
    args = p.parse_args(argv)

    from zoospectra.config import AnalysisConfig
    from zoospectra.io.refs import local_ref
    from zoospectra.run.execute import ensure_ray, run_plan
    from zoospectra.run.plan import build_plan

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        base, adapters = write_checkpoint(root, args.hidden, args.intermediate, args.layers,
                                         args.adapters, args.rank, args.modules)
        size = sum(f.stat().st_size for f in base.iterdir()) / 2**30
        print(f"checkpoint: {size:.2f} GiB bf16 in {args.layers} shards, {args.adapters} adapters "
              f"(r={args.rank}), written in {time.perf_counter() - t0:.0f}s", flush=True)
        cfg = AnalysisConfig(mode=args.mode)
        plan = build_plan(local_ref(base, "llama-shaped"), [local_ref(a) for a in adapters], cfg)
        ensure_ray(num_cpus=2)
        t0 = time.perf_counter()
        # one task in flight: the figure is the peak of a single worker analysing one unit at a time
        s = run_plan(plan, str(root / "results"), max_in_flight=1)
        print(f"analysed {len(plan.units)} units ({plan.n_pairs} adapter-matrices, mode {args.mode}) in "
              f"{time.perf_counter() - t0:.0f}s: done {s.n_done}, failed {s.n_failed}; "
              f"worker peak RSS {s.peak_rss_mb:.0f} MiB ({s.peak_rss_mb / 1024:.2f} GiB)")


if __name__ == "__main__":
    main()
