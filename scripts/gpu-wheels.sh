#!/usr/bin/env bash
# Fetch the wheels the GPU machine lacks into .whl/ (git-ignored), for the device tool to carry there, and write
# .whl/MANIFEST (one distribution name a line) so bench/gpu_figures.sh can refuse to start when one is missing.
#
#   bash scripts/gpu-wheels.sh                      # cp312 manylinux wheels for the GPU machine
#   GPU_WHEELS_PYTHON=3.11 GPU_WHEELS_DIR=/tmp/w bash scripts/gpu-wheels.sh    # the CPU dry run's interpreter
#
# Stands alone: any python3 with pip will do (no .venv needed). Where this checkout's .venv exists, its versions
# are the pins, so what runs there is what the tests ran here; without it, pip resolves the newest that fit.
#
# The GPU image (device README, KINDS.md) has torch, torchvision, numpy, pillow, safetensors, httpx, h11, anyio,
# prometheus-client, pytest, matplotlib, scikit-image, tqdm and typing-extensions (version unknown), but not the
# service's web stack, torchao, asgi-lifespan or pytest-asyncio. The ROOTS below are resolved *with* their
# dependencies (fastapi -> starlette, pydantic -> typing-extensions >= 4.16 for `Sentinel`, annotated-doc,
# opentelemetry-api, sniffio, ...), so a new transitive import cannot go missing there again; what the image
# already has in a build of its own (torch and its CUDA libraries, numpy, pillow) is left out.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TARGET_PYTHON=${GPU_WHEELS_PYTHON:-3.12}
DIR=${GPU_WHEELS_DIR:-.whl}
ROOTS=(fastapi starlette pydantic pydantic-settings python-multipart "uvicorn" httptools torchao asgi-lifespan
  pytest-asyncio typing-extensions annotated-doc opentelemetry-api sniffio)
# Binary builds the image has and must keep (a second torch or numpy on PYTHONPATH would shadow the CUDA one).
LEAVE_OUT='^(torch|torchvision|triton|numpy|pillow|nvidia-.*|cuda-.*|setuptools|pip|wheel)$'

pins=()
if [[ -x .venv/bin/python ]]; then
  while read -r line; do pins+=("$line"); done < <(.venv/bin/python - "${ROOTS[@]}" <<'EOF'
import importlib.metadata as m, re, sys

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

# Pin every root and every distribution it needs, transitively, to this checkout's .venv versions.
todo, seen = [norm(n) for n in sys.argv[1:]], set()
while todo:
    name = todo.pop()
    if name in seen:
        continue
    seen.add(name)
    try:
        dist = m.distribution(name)
    except m.PackageNotFoundError:
        continue
    print(f"{name}=={dist.version}")
    for req in dist.requires or []:
        if "extra ==" not in req:
            todo.append(norm(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0]))
EOF
)
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
printf '%s\n' "${pins[@]}" | grep -Ev "^($(sed 's/[$^]//g' <<<"$LEAVE_OUT"))==" >"$constraints" || true

rm -rf "$DIR"
mkdir -p "$DIR"
PLATFORMS=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${tag}_x86_64")
done
# Resolve with dependencies for the target interpreter, then drop what the image has. PIP_CONSTRAINT is cleared: a
# machine-wide constraints file (torch caps) must not decide what the GPU machine gets.
PIP_CONSTRAINT='' "$PY" -m pip download -q --only-binary=:all: --python-version "$TARGET_PYTHON" --implementation cp \
  "${PLATFORMS[@]}" -c "$constraints" -d "$DIR" "${ROOTS[@]}" 2> >(grep -v '^WARNING: Location' >&2)
manifest=()
for wheel in "$DIR"/*.whl; do
  name=$(basename "$wheel" | cut -d- -f1 | tr '_.' '--' | tr '[:upper:]' '[:lower:]')
  if [[ $name =~ $LEAVE_OUT ]]; then
    rm -f "$wheel"
  else
    manifest+=("$name")
  fi
done
for root in "${ROOTS[@]}"; do  # fail here, not on the GPU machine, when a root did not download
  grep -qx "$(tr '_.' '--' <<<"$root")" < <(printf '%s\n' "${manifest[@]}") || { echo "no wheel for $root" >&2; exit 1; }
done
printf '%s\n' "${manifest[@]}" >"$DIR/MANIFEST"
ls -1 "$DIR"
du -sh "$DIR"
