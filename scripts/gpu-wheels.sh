#!/usr/bin/env bash
# Fetch the wheels the GPU machine lacks into .whl/ (git-ignored), for the device tool to carry there.
#
#   bash scripts/gpu-wheels.sh            # then run bench/gpu_figures.sh there with .whl carried
#
# The H200 image has torch, torchvision, numpy, pillow, safetensors, httpx, prometheus-client, anyio and h11, but
# not the service's web stack (fastapi, starlette, pydantic, pydantic-settings, python-multipart, uvicorn) nor
# torchao. Its Python is 3.12, so the wheels are fetched for cp312 manylinux whatever this machine runs. The
# versions are the ones this checkout's .venv holds, so what runs there is what the tests ran here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PACKAGES=(fastapi starlette pydantic pydantic_core pydantic-settings python-dotenv typing-inspection annotated-types
  python-multipart uvicorn httptools torchao asgi-lifespan)
pins=()
for name in "${PACKAGES[@]}"; do
  version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
  pins+=("$name==$version")
done
rm -rf .whl
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${pins[@]}"
ls -1 .whl
du -sh .whl
