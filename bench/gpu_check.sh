#!/usr/bin/env bash
# One prepared run on a lent GPU machine (device tool): the CUDA path of the engines, then the
# benchmark tables on the GPU, then the whole in-process pipeline on GPU vs its CPU.
# The GPU image has torch/peft/pyarrow but neither ray nor duckdb (nor room to carry ray's wheel),
# so the pipeline runs with the in-process executor: the same unit code a Ray task runs.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
PKG=/tmp/zs-pkg; rm -rf "$PKG"; mkdir -p "$PKG"
cp -r pipeline "$PKG/zoospectra"; cp -r schemas "$PKG/zoospectra/schemas"; cp -r jobs "$PKG/zoospectra/jobs"
export PYTHONPATH="$PKG:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0), 'cpu threads', torch.get_num_threads())" | tee -a "$OUT/gpu.txt"
echo "== gpu tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_spectral.py tests/test_fast.py 2>&1 | tail -15 | tee "$OUT/gpu-tests.txt"
echo "== bench on cuda"
timeout "${BENCH_S:-330}" python3 -m bench.run_bench --device cuda --reps 2 --out "$OUT/RESULTS-gpu.md" 2>&1 | tee "$OUT/bench-gpu.log"
echo "== pipeline on this machine's CPU (same zoo) for GPU vs CPU"
timeout 150 python3 -m bench.run_bench --device cpu --widths 2048 --ranks 8 --reps 1 --out "$OUT/RESULTS-gpu-host-cpu.md" 2>&1 | tee "$OUT/bench-host-cpu.log"
