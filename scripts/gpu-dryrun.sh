#!/usr/bin/env bash
# The CPU dry run of bench/gpu_figures.sh: the same script, GPU_FIGURES_DEVICE=cpu (tiny sizes, the CUDA tests
# collected only), in a virtualenv shaped like the GPU machine's Python: only the packages its image has (the list
# below, from the device tool's KINDS.md), plus the wheels scripts/gpu-wheels.sh fetches, installed the way the
# device run installs them (pip --target, no index). An import the GPU machine would lack fails here first.
#
#   bash scripts/gpu-dryrun.sh                          # .ci/run does this; about a minute on a quiet machine
#   GPU_DRYRUN_SOURCE=/venv-torch-2.11/bin/python bash scripts/gpu-dryrun.sh   # the image's torch 2.11 / tv 0.26
#
# The image's packages are linked (not installed) from GPU_DRYRUN_SOURCE's site-packages (default: this checkout's
# .venv, torch 2.14.1 here), so the dry run costs no 3 GB torch install; give it an interpreter whose environment
# holds torch 2.11.0 + torchvision 0.26.0 to match the GPU machine's versions too. What still differs from the GPU
# machine: this machine's Python (3.11 here; the image's is 3.12 and no 3.12 is packaged for this Debian), the
# versions of the image's other packages (the source environment's), and no CUDA (steps 4 and 5 on the CPU).
# Checked 2026-12-06 with GPU_DRYRUN_SOURCE holding torch 2.11.0 + torchvision 0.26.0 (cu130 wheels, Python 3.11):
# every step passed (281 s on a 2-core machine at load ~14; 452 s with the .venv's torch 2.14.1).
set -euo pipefail
cd "$(dirname "$0")/.."
SOURCE=${GPU_DRYRUN_SOURCE:-.venv/bin/python}
OUT=${OUT:-results/gpu-dryrun}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# The GPU image's Python packages that petvit or its steps can import (KINDS.md lists ~200; the rest are not ours).
IMAGE=(torch torchvision numpy pillow safetensors httpx httpcore h11 anyio idna certifi prometheus-client
  matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil six packaging scikit-image scipy
  imageio tifffile lazy-loader networkx tqdm sympy mpmath jinja2 markupsafe fsspec filelock pytest pluggy iniconfig
  pygments pyyaml triton typing-inspect mypy-extensions typing-extensions)

"$SOURCE" -m venv "$WORK/venv"
PY=$WORK/venv/bin/python
SITE_PACKAGES=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# Each listed distribution the source environment has: its top-level files and folders (package, .dist-info,
# bundled .libs), linked into the new venv. nvidia-* (a CUDA build of torch) come along: torch needs them to load.
"$SOURCE" - "${IMAGE[@]}" <<'EOF' | while read -r path; do ln -sfn "$path" "$SITE_PACKAGES/"; done
import importlib.metadata as m, re, sys

wanted = {re.sub(r"[-_.]+", "-", n).lower() for n in sys.argv[1:]}
for dist in m.distributions():
    name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
    if name in wanted or name.startswith(("nvidia-", "cuda-")):
        tops = {f.parts[0] for f in dist.files or [] if f.parts[0] not in ("..", "bin") and not f.parts[0].endswith(".pth")}
        for top in sorted(tops):
            print(dist.locate_file(top))
EOF
"$PY" -c "import torch, torchvision; print('dry-run venv: torch', torch.__version__, 'torchvision', torchvision.__version__)"

GPU_WHEELS_PYTHON=$("$PY" -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')") \
  GPU_WHEELS_DIR="$WORK/whl" bash scripts/gpu-wheels.sh >/dev/null
mkdir -p "$OUT"
rm -f "$OUT"/*
env -u PYTHONPATH PYTHONNOUSERSITE=1 GPU_FIGURES_DEVICE=cpu GPU_FIGURES_WHEELS="$WORK/whl" \
  GPU_FIGURES_SITE="$WORK/site" PYTHON="$PY" OUT="$OUT" \
  bash bench/gpu_figures.sh
