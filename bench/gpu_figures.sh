#!/usr/bin/env bash
# Every GPU check in one run, for a single CUDA machine (an H100/H200 with 16 CPU cores): about 5 minutes at worst
# (an overall deadline skips what is left), no network, nothing installed beyond the wheels it is given (.whl/,
# from scripts/gpu-wheels.sh, listed in .whl/MANIFEST).
#
#   here:  bash scripts/gpu-wheels.sh
#   there: OUT=/some/dir bash bench/gpu_figures.sh          (the device tool: carry .whl, OUT is set for you)
#   CPU dry run (tests/bench/test_gpu_figures_dry_run.py, .ci/run):
#          GPU_FIGURES_DEVICE=cpu PYTHON=/venv/bin/python OUT=/tmp/x bash bench/gpu_figures.sh
#
# What comes back under $OUT (the device tool returns at most 8 files): summary.txt (every step's output),
# pytest.log (the whole log of step 4) and figures.tar.gz (the steps' JSON and PNG, machine.txt), re-packed after
# each step so a run cut short still returns what it measured.
#
# Steps (each bounded by its own time-out and by what is left of the deadline):
#   0. fail fast: the carried wheels install (a missing one is an error), every module the steps import imports,
#      torch.cuda.is_available() (on a GPU run)
#   1. the machine: nvidia-smi, torch/torchvision versions
#   2. bf16 / int8 matmul peak (bench/matmul_peak.py): the ceiling the model is a fraction of
#   3. ViT-B/16 224 px forward, bf16, batch 256, eager and compiled, as a fraction of the measured peak
#      (target >= 50 %, about 11,000 img/s on an H200)
#   4. the CUDA-only tests (pytest -m gpu; on the CPU dry run: collected only, since they need CUDA)
#   5. end-to-end HTTP: `petvit serve` on the GPU (bf16, GPU JPEG decode) under real ~500x375 JPEGs from load
#      generators on the same box (target >= 2,000 img/s with p99 <= 250 ms). The 16 cores are split with taskset:
#      the service on cores 0-5, the load generators on 6-15.
# Exit status: 0 when every step ran and passed; 1 when a step failed or was skipped for the deadline; 2 when the
# fail-fast checks failed (nothing long was started).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
DEVICE=${GPU_FIGURES_DEVICE:-cuda}
DEADLINE_S=${GPU_FIGURES_DEADLINE_S:-$([[ $DEVICE == cpu ]] && echo 900 || echo 300)}
SITE=${GPU_FIGURES_SITE:-/tmp/site}
WHL=${GPU_FIGURES_WHEELS:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 MPLBACKEND=Agg
T0=$(date +%s)
FAILED=()
say() { printf '[gpu-figures %4ss] %s\n' "$(($(date +%s) - T0))" "$*" | tee -a "$OUT/summary.txt"; }
bundle() { tar -czf "$OUT/figures.tar.gz" -C "$WORK" . 2>/dev/null; }

# step NAME BUDGET_S COMMAND...: runs COMMAND under min(BUDGET_S, what is left of the deadline), output to the
# summary; records a failure or a skip.
step() {
  local name=$1 budget=$2 left
  shift 2
  left=$((T0 + DEADLINE_S - $(date +%s)))
  if ((left < 15)); then
    say "$name: SKIPPED, ${left} s left of the ${DEADLINE_S} s deadline"
    FAILED+=("$name (skipped)")
    return
  fi
  ((budget > left)) && budget=$left
  say "$name (at most ${budget} s)"
  timeout --kill-after 10 "$budget" "$@" 2>&1 | tee -a "$OUT/summary.txt"
  local rc=${PIPESTATUS[0]}
  ((rc == 124 || rc == 137)) && say "$name: TIMED OUT after ${budget} s"
  ((rc != 0)) && FAILED+=("$name (exit $rc)")
  bundle
}

case $DEVICE in
  cuda)  # the real run: ViT-B/16, big batches, the GPU's own sizes
    MATMUL=(--size 8192) MODEL=(--variants b16 --batch-sizes 256 --repeats 5 --warmup 2)
    SERVICE=(--variant b16 --dtypes bfloat16 --max-batch-size 128 --concurrency 128 256 --seconds 15 --clients 10
      --server-cpus 0-5 --client-cpus 6-15 --peak-size 8192)
    BUDGETS=(40 45 90 60 90) TESTS=(-m gpu) COMPILE=() ;;
  cpu)  # the dry run: the same steps and arguments' shapes, tiny sizes, CUDA tests collected only
    MATMUL=(--size 128 --repeats 2 --warmup 1) MODEL=(--variants ti16 --batch-sizes 2 --repeats 1 --warmup 1
      --min-time 0.01)
    SERVICE=(--variant ti16 --dtypes float32 --max-batch-size 4 --concurrency 2 --seconds 1 --clients 2
      --server-cpus 0 --client-cpus 1 --peak-size 128)
    COMPILE=(--compile-backend eager)  # dynamo traces the model as on the GPU; inductor's C++ build takes minutes
    # Generous budgets: the dry run checks that every step runs, not how fast (a shared CI machine is slow).
    BUDGETS=(120 180 180 180 240) TESTS=(-m gpu --collect-only) ;;
  *) say "GPU_FIGURES_DEVICE must be cuda or cpu, not $DEVICE"; exit 2 ;;
esac

say "0. fail fast: wheels, imports, device"
if [[ -f $WHL/MANIFEST ]]; then
  # A wheel's file name starts with its distribution name, "-." folded to "_" (normalised as in the MANIFEST).
  missing=($(comm -23 <(sort -u "$WHL/MANIFEST") <(for wheel in "$WHL"/*.whl; do basename "$wheel" | cut -d- -f1 \
    | tr '_.' '--' | tr '[:upper:]' '[:lower:]'; done | sort -u)))
  ((${#missing[@]} == 0)) || { say "wheels listed in $WHL/MANIFEST but not carried: ${missing[*]}"; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHL"/*.whl \
    2>&1 | tee -a "$OUT/summary.txt"
  ((PIPESTATUS[0] == 0)) || { say "installing the carried wheels failed"; exit 2; }
  export PYTHONPATH=$SITE:$PWD
elif [[ ${GPU_FIGURES_NO_WHEELS:-0} == 1 ]]; then
  export PYTHONPATH=$PWD
else
  say "no $WHL/MANIFEST: run scripts/gpu-wheels.sh here and carry .whl (or GPU_FIGURES_NO_WHEELS=1)"; exit 2
fi
# Every module a step imports, the steps' own scripts (imported, not run), and the device, in one interpreter (a
# start costs seconds), before anything long starts. Step 1's machine facts come from the same process.
"$PY" - "$DEVICE" "$WORK/machine.txt" <<'EOF' 2>&1 | tee -a "$OUT/summary.txt"
import importlib, importlib.util, os, sys
import torch
for name in ("torchvision", "fastapi", "starlette", "pydantic", "pydantic_settings", "multipart", "uvicorn",
             "httpx", "prometheus_client", "safetensors", "PIL", "numpy", "skimage", "matplotlib", "tqdm",
             "asgi_lifespan", "pytest", "pytest_asyncio", "app.main", "cli.main", "model.inference"):
    importlib.import_module(name)
for script in ("bench/matmul_peak.py", "bench/model_throughput.py", "bench/service_load.py"):
    spec = importlib.util.spec_from_file_location(os.path.basename(script)[:-3], script)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit("torch.cuda.is_available() is False: no GPU to measure")
import torchvision
with open(sys.argv[2], "w") as machine:
    print(sys.version.split()[0], "torch", torch.__version__, "torchvision", torchvision.__version__,
          "cpus", os.cpu_count(), file=machine)
    if torch.cuda.is_available():
        print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0), file=machine)
print("imports ok; torch", torch.__version__, "cuda", torch.cuda.is_available())
EOF
((PIPESTATUS[0] == 0)) || { say "fail-fast check failed: nothing long was started"; exit 2; }

say "1. machine"
if [[ $DEVICE == cuda ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >>"$WORK/machine.txt" 2>&1
fi
tee -a "$OUT/summary.txt" <"$WORK/machine.txt"

step "2. matmul peak" "${BUDGETS[0]}" "$PY" bench/matmul_peak.py --device "$DEVICE" --dtypes bfloat16 int8 \
  "${MATMUL[@]}" --out "$WORK/matmul"
PEAK=$("$PY" -c "
import json, sys
rows = json.load(open(sys.argv[1]))['results']
print(next(r['ops_per_s'] / 1e12 for r in rows if r['dtype'] == 'bfloat16'))" "$WORK/matmul.json" 2>/dev/null \
  || echo 790)
say "measured bf16 peak: $PEAK TFLOP/s"

step "3a. forward, bf16, eager" "${BUDGETS[1]}" "$PY" bench/model_throughput.py --device "$DEVICE" \
  --dtype bfloat16 "${MODEL[@]}" --peak-tflops "$PEAK" --out "$WORK/model_eager"
step "3b. forward, bf16, compiled" "${BUDGETS[2]}" "$PY" bench/model_throughput.py --device "$DEVICE" \
  --dtype bfloat16 "${MODEL[@]}" --peak-tflops "$PEAK" --compile "${COMPILE[@]}" --out "$WORK/model_compiled"

# Only the files that hold gpu tests: collecting the whole suite would import test-only libraries (schemathesis,
# scikit-learn, ...) this machine need not have. The whole log comes back as pytest.log.
step "4. CUDA-only tests" "${BUDGETS[3]}" bash -c '"$0" -m pytest -p no:cacheprovider -rA "${@:2}" \
  tests/app/test_gpu_decode.py tests/app/test_cuda_paths.py >"$1" 2>&1; rc=$?; tail -n 25 "$1"; exit $rc' \
  "$PY" "$OUT/pytest.log" "${TESTS[@]}"

# PETVIT_DEVICE is left at auto: the service and the bench's raw-model timing both take the GPU.
step "5. end-to-end HTTP" "${BUDGETS[4]}" "$PY" bench/service_load.py "${SERVICE[@]}" --max-wait-ms 5 \
  --no-comparisons --out "$WORK"

bundle
if ((${#FAILED[@]})); then
  say "done in $(($(date +%s) - T0)) s with failures: ${FAILED[*]}"
  exit 1
fi
say "done in $(($(date +%s) - T0)) s; every step passed; files: $(ls "$OUT" | tr '\n' ' ')"
