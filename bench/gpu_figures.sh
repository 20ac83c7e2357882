#!/usr/bin/env bash
# Every GPU check in one run, for a single CUDA machine (an H200 with 16 CPU cores here): at most ~8 minutes, no
# network, nothing installed beyond the wheels it is given (.whl/, from scripts/gpu-wheels.sh). Figures go to $OUT.
#
#   here:  bash scripts/gpu-wheels.sh
#   there: OUT=/some/dir bash bench/gpu_figures.sh          (the device tool: carry .whl, OUT is set for you)
#
# Steps (each bounded by its own timeout, so one slow step cannot eat the others' time):
#   1. the machine: nvidia-smi, torch/torchvision versions
#   2. bf16 / int8 matmul peak (bench/matmul_peak.py): the ceiling the model is a fraction of
#   3. ViT-B/16 224 px forward, bf16, batch 256, eager and compiled, as a fraction of the measured peak
#      (target >= 50 %, about 11,000 img/s on an H200)
#   4. the CUDA-only tests (pytest -m gpu): nvJPEG decode vs the CPU path, pinned host-to-device stacking, the
#      CUDA-graph forward padded to buckets, the reload's real GPU-memory check
#   5. end-to-end HTTP: `petvit serve` on the GPU (bf16, GPU JPEG decode) under real ~500x375 JPEGs from load
#      generators on the same box (target >= 2,000 img/s with p99 <= 250 ms). The 16 cores are split with taskset:
#      the service (its event loop, preprocess pool and inference thread) on cores 0-5, the load generators on 6-15.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
T0=$(date +%s)
say() { printf '[gpu-figures %4ss] %s\n' "$(($(date +%s) - T0))" "$*" | tee -a "$OUT/summary.txt"; }

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { say "installing the carried wheels failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi

say "1. machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; nproc;
  "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"; } \
  >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt" | tee -a "$OUT/summary.txt"

say "2. matmul peak"
timeout 90 "$PY" bench/matmul_peak.py --device cuda --dtypes bfloat16 int8 --size 8192 --out "$OUT/matmul" \
  2>&1 | tee -a "$OUT/summary.txt"
PEAK=$("$PY" -c "
import json, sys
rows = json.load(open(sys.argv[1]))['results']
print(next((r['ops_per_s'] / 1e12 for r in rows if r['dtype'] == 'bfloat16'), 790.0))" "$OUT/matmul.json" 2>/dev/null \
  || echo 790)
say "measured bf16 peak: $PEAK TFLOP/s"

say "3. ViT-B/16 forward, bf16, batch 256 (eager, then compiled)"
timeout 150 "$PY" bench/model_throughput.py --device cuda --dtype bfloat16 --batch-sizes 256 --variants b16 \
  --repeats 5 --warmup 2 --peak-tflops "$PEAK" --out "$OUT/model_eager" 2>&1 | tee -a "$OUT/summary.txt"
timeout 240 "$PY" bench/model_throughput.py --device cuda --dtype bfloat16 --batch-sizes 256 --variants b16 \
  --repeats 5 --warmup 2 --peak-tflops "$PEAK" --compile --out "$OUT/model_compiled" 2>&1 | tee -a "$OUT/summary.txt"

say "4. CUDA-only tests"
# Only the files that hold gpu tests: collecting the whole suite would import test-only libraries (schemathesis,
# scikit-learn, ...) this machine need not have.
timeout 180 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/app/test_gpu_decode.py tests/app/test_cuda_paths.py 2>&1 | tail -n 15 | tee -a "$OUT/summary.txt"

say "5. end-to-end HTTP on the GPU"
# PETVIT_DEVICE is left at auto: the service and the bench's raw-model timing both take the GPU.
timeout 200 "$PY" bench/service_load.py --dtypes bfloat16 --variant b16 --max-batch-size 128 --max-wait-ms 5 \
  --concurrency 128 256 --seconds 15 --no-comparisons --clients 10 --server-cpus 0-5 --client-cpus 6-15 \
  --out "$OUT" 2>&1 | tee -a "$OUT/summary.txt"

say "done in $(($(date +%s) - T0)) s; files: $(ls "$OUT" | tr '\n' ' ')"
