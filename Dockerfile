# petvit: one image for `petvit serve` (default) and `petvit train` (the compose `train` service, the k8s Job).
#
#   docker build -t petvit:cpu .                                 # CPU-only torch (default): no NVIDIA libraries
#   docker build -t petvit:cuda --build-arg TORCH_FLAVOR=cuda .  # CUDA torch wheels (runs on CPU too, ~6 GB bigger)
# (docker-compose.yml builds the first, with docker-compose.gpu.yml the second; README gives sizes and build times.)
#   docker build --build-arg PIP_INDEX_URL=https://mirror.example/simple --build-arg PIP_FIND_LINKS=http://host/w/ ...
#   (mirrors are URLs: a path on the host is not visible inside the build)
#
# Classic builder only (no BuildKit syntax). Layers are ordered so that editing model/, training/, app/ or cli/ rebuilds only
# the last, small layers: the dependency venv is installed from pyproject.toml + constraints.txt alone.
# Mirrors: PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS are passed to pip when given.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------------------------
# build: the petvit wheel. The build backend (setuptools, wheel) and the sources stay in this stage.
FROM ${PYTHON_IMAGE} AS build

ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# A build venv in its own layer (cached for good), so each code change builds the wheel in seconds, offline.
RUN python -m venv /opt/build && /opt/build/bin/pip install "setuptools>=68" wheel
COPY pyproject.toml README.md /src/
COPY model /src/model
COPY training /src/training
COPY app /src/app
COPY cli /src/cli
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation -w /dist /src

# ---------------------------------------------------------------------------------------------------------------
# runtime: the dependency venv, then the petvit wheel on top. The dependencies are installed here rather than in
# the build stage and copied over: every one of them ships as a wheel (nothing to compile), and copying a ~6 GB
# CUDA venv between stages cost ~2 min per cold build here, and a second copy on disk, for no gain.
FROM ${PYTHON_IMAGE} AS runtime

# pip reads these from the environment; they stay unset unless passed (an empty PIP_INDEX_URL would break pip).
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
# cpu:  torch/torchvision from TORCH_CPU_INDEX_URL (+cpu builds, no NVIDIA libraries: a far smaller image)
# cuda: torch/torchvision wheels from the package index (CUDA builds, NVIDIA libraries as pip deps, run on CPU too)
ARG TORCH_FLAVOR=cpu
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu

# A fixed numeric uid so Kubernetes `runAsNonRoot` can verify it and volume permissions are predictable.
RUN set -eux; \
    groupadd --system --gid 10001 petvit; \
    useradd --system --uid 10001 --gid petvit --home-dir /home/petvit --create-home --shell /usr/sbin/nologin petvit; \
    mkdir -p /artifacts /data /cache/torch; \
    chown -R petvit:petvit /artifacts /data /cache

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# 1. Dependencies only, from pyproject.toml + constraints.txt (cached until either changes). torch/torchvision
#    versions come from constraints.txt in both flavours ("torch==X" also matches the CPU index's "X+cpu").
#    The service's dependencies plus the [train] extra: this one image also runs `petvit train` (compose's train
#    service, the k8s Job); plus the [int8] extra (torchao), so PETVIT_DTYPE=int8 works, and the [import] extra
#    (huggingface_hub), so `petvit import hf-hub:ORG/NAME` works inside the container too, and [zero-shot]
#    (transformers: a CLIP text tower for `petvit import ... --zero-shot`, compose's PETVIT_ZERO_SHOT).
COPY pyproject.toml constraints.txt /tmp/deps/
RUN set -eux; \
    python -m venv /opt/venv; \
    cd /tmp/deps; \
    python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = p['optional-dependencies']; \
print('\n'.join(p['dependencies'] + extras['train'] + extras['int8'] + extras['import'] + extras['zero-shot']))" > requirements.txt; \
    case "$TORCH_FLAVOR" in \
      cuda) ;; \
      cpu) pip install -c constraints.txt --index-url "$TORCH_CPU_INDEX_URL" torch torchvision ;; \
      *) echo "TORCH_FLAVOR must be cuda or cpu, got '$TORCH_FLAVOR'" >&2; exit 2 ;; \
    esac; \
    pip install -c constraints.txt -r requirements.txt; \
    python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"; \
    rm -rf /tmp/deps

# 2. petvit itself: small and quick, the only layers a code change rebuilds.
COPY --from=build /dist /tmp/dist
RUN pip install --no-deps /tmp/dist/*.whl && rm -rf /tmp/dist && petvit --help >/dev/null

ENV PYTHONDONTWRITEBYTECODE=1 \
    TORCH_HOME=/cache/torch \
    MPLCONFIGDIR=/tmp/matplotlib \
    PETVIT_CHECKPOINT=/artifacts/petvit.safetensors \
    PETVIT_DEVICE=auto \
    PETVIT_IN_IMAGE=1

USER petvit
WORKDIR /home/petvit
# /artifacts, /data and /cache exist owned by petvit, so a named volume mounted there starts writable by it.
# A bind-mounted host folder keeps its owner: `docker run --user "$(id -u):$(id -g)" ...` writes into yours, and
# without it petvit says so in one line (PETVIT_IN_IMAGE: cli/messages.py). compose switches to the folder's
# owner by itself (deploy/compose/entrypoint.py).
EXPOSE 8000

# Ready = model loaded and warmed (GET /readyz answers 200; urlopen raises on 503). No curl in slim images.
# The start period is generous: warming a b16 up on a busy CPU takes minutes; the first 200 ends it early.
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]

ENTRYPOINT ["petvit"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
