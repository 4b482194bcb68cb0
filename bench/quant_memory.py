"""Memory of reading one quantised base weight, as ratios to the float32 matrix it yields.

    python -m bench.quant_memory [--rows 11008 --cols 4096]

Writes one [rows, cols] weight four ways: bf16 safetensors (today's float read, the baseline),
bitsandbytes NF4 with double quant (bitsandbytes' own quantize_4bit and QuantState.as_dict(packed=True),
the layout transformers saves), LLM.int8 (int8_vectorwise_quant) and GGUF Q8_0 (gguf's writer).
Each is read with open_base(...).get() in a fresh process; printed: the peak RSS (VmHWM, reset just
before get() through /proc/self/clear_refs, Linux) above the RSS just before get(), divided by the
size of the float32 result (1.0 = the result alone).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

KEY = "model.layers.0.mlp.up_proj.weight"

_CHILD = r"""
import json, sys
from zoospectra.io.checkpoint import LocalFileSource
from zoospectra.io.quantized import open_base

def status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
base = open_base(LocalFileSource(sys.argv[1]))
base.info(sys.argv[2])
with open("/proc/self/clear_refs", "w") as f:   # "5": reset the peak RSS (VmHWM) to the current RSS
    f.write("5")
before = status_kb("VmRSS")
w = base.get(sys.argv[2])
print(json.dumps({"above_kb": status_kb("VmHWM") - before, "out_bytes": w.numel() * 4,
                  "quant": base.quantization_of(sys.argv[2]), "bytes_read": base.bytes_read}))
"""


def write_all(root: Path, rows: int, cols: int) -> dict[str, Path]:
    import bitsandbytes.functional as F
    import gguf
    from safetensors.torch import save_file

    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) / cols**0.5
    out = {}
    for name in ("bf16", "nf4", "int8", "gguf"):
        (root / name).mkdir()
        out[name] = root / name
    save_file({KEY: w.to(torch.bfloat16)}, str(root / "bf16" / "model.safetensors"))
    q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    save_file({KEY: q, **{f"{KEY}.{k}": v.contiguous() for k, v in state.as_dict(packed=True).items()}},
              str(root / "nf4" / "model.safetensors"))
    q8, scb, _ = F.int8_vectorwise_quant(w.half())
    save_file({KEY: q8, KEY[: -len("weight")] + "SCB": scb}, str(root / "int8" / "model.safetensors"))
    g = gguf.GGUFWriter(str(root / "gguf" / "m.gguf"), "llama")
    g.add_head_count(32)
    g.add_tensor("blk.0.ffn_up.weight", gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=11008)
    ap.add_argument("--cols", type=int, default=4096)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = write_all(Path(tmp), args.rows, args.cols)
        print(f"one [{args.rows}, {args.cols}] weight: peak RSS above the RSS before get(), / float32 result size")
        for name, path in dirs.items():
            proc = subprocess.run([sys.executable, "-c", _CHILD, str(path), KEY], capture_output=True, text=True,
                                  check=True)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            ratio = r["above_kb"] * 1024 / r["out_bytes"]
            print(f"  {name:5s} {r['quant'] or 'bf16 (plain read)':45s} ratio {ratio:5.2f}  "
                  f"(read {r['bytes_read'] / 2**20:7.1f} MiB of data)")


if __name__ == "__main__":
    main()
