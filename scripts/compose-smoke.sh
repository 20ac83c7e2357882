#!/usr/bin/env bash
# Compose smoke test: the image and docker-compose.yml, end to end, on any machine with a Docker engine.
#
#   1. docker-compose config accepts the files; promtool accepts the Prometheus config and passes the alert tests
#   2. build the image (classic builder)
#   3. place a small untrained artifact in the artifacts volume (`petvit export`), so `train --if-missing` skips
#   4. `up api prometheus` (train runs first and exits 0), wait until the api container is healthy (/readyz)
#   5. POST /classify a real photo (scikit-image's chelsea, as a JPEG); check the answer
#   6. ask Prometheus's HTTP API that the api target is up and that petvit_requests_total{route="/classify"} grew
# Everything it started is removed on exit, pass or fail (containers, network, volumes).
#
# Uses `docker compose` (v2) or `docker-compose` (v1.29+), whichever exists. Settings (environment):
#   DOCKER_BUILD        build command prefix (default "docker build"; e.g. a wrapper adding mirrors/--network)
#   SMOKE_BUILD_ARGS    extra build arguments, e.g. "--build-arg PIP_INDEX_URL=https://mirror/simple"
#   SMOKE_IMAGE         image tag to build and run (default petvit:smoke)
#   SMOKE_SKIP_BUILD=1  use SMOKE_IMAGE as it is
#   SMOKE_READY_TIMEOUT seconds to wait for readiness (default 300)
#   PYTHON              a Python with scikit-image (default .venv/bin/python, as scripts/test.sh makes it)
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${SMOKE_IMAGE:-petvit:smoke}
DOCKER_BUILD=${DOCKER_BUILD:-docker build}
READY_TIMEOUT=${SMOKE_READY_TIMEOUT:-300}
PYTHON=${PYTHON:-.venv/bin/python}
[[ -x $PYTHON ]] || PYTHON=python3
PROJECT=petvit-smoke-$$
WORK=$(mktemp -d)
T0=$(date +%s)
say() { printf 'compose-smoke [%4ss]: %s\n' "$(($(date +%s) - T0))" "$*" >&2; }
fail() { say "FAIL: $*"; exit 1; }

if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then
  COMPOSE=(docker-compose)
else
  fail "neither 'docker compose' nor 'docker-compose' is installed"
fi
# Free host ports, so the smoke never collides with a petvit (or anything) already on 8000/9090.
read -r API_PORT PROM_PORT < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
export PETVIT_IMAGE=$IMAGE PETVIT_PORT=$API_PORT PROMETHEUS_PORT=$PROM_PORT
# Serve exactly what this script places: ignore the caller's own artifact settings.
unset PETVIT_ARTIFACTS_DIR PETVIT_ARTIFACT_FILE PETVIT_DEVICE PETVIT_API_KEY
compose() { "${COMPOSE[@]}" -p "$PROJECT" -f docker-compose.yml "$@"; }

cleanup() {
  local rc=$?
  if ((rc != 0)); then
    say "logs of the failed run:"
    compose logs --no-color --tail 80 train api prometheus >&2 || true
  fi
  compose down -v --remove-orphans >/dev/null 2>&1 || true
  rm -rf "$WORK"
  say "$( ((rc == 0)) && echo PASSED || echo "FAILED (exit $rc)") in $(($(date +%s) - T0)) s; torn down"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 1. static checks with the real tools --------------------------------------------------------------------------
say "using ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null || "${COMPOSE[@]}" version | head -1))"
compose config -q || fail "compose rejects docker-compose.yml"
"${COMPOSE[@]}" -f docker-compose.yml -f docker-compose.gpu.yml config -q || fail "compose rejects the GPU override"
PROM_IMAGE=$(compose config | sed -n 's#^ *image: *\(.*prom/prometheus.*\)$#\1#p' | head -1)
[[ -n $PROM_IMAGE ]] || fail "no prometheus image in docker-compose.yml"
promtool() { docker run --rm -v "$PWD/deploy/prometheus:/etc/prometheus:ro" -w /etc/prometheus --entrypoint promtool "$PROM_IMAGE" "$@"; }
promtool check config /etc/prometheus/prometheus.yml >/dev/null || fail "promtool rejects prometheus.yml"
promtool test rules alerts.test.yml >/dev/null || fail "alert rule unit tests fail (promtool test rules)"
say "compose files, prometheus config and alert rule tests OK"

# 2. build --------------------------------------------------------------------------------------------------------
if [[ ${SMOKE_SKIP_BUILD:-0} != 1 ]]; then
  say "building $IMAGE with: $DOCKER_BUILD"
  b0=$(date +%s)
  # shellcheck disable=SC2086  # DOCKER_BUILD and SMOKE_BUILD_ARGS are word lists on purpose
  $DOCKER_BUILD -t "$IMAGE" ${SMOKE_BUILD_ARGS:-} . >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log" >&2; fail "image build failed"; }
  BUILD_S=$(($(date +%s) - b0))
else
  BUILD_S=skipped
fi
SIZE=$(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1 / 1e9}')
say "image $IMAGE: build ${BUILD_S} s, size $SIZE"

# 3. a small artifact, so train skips -------------------------------------------------------------------------------
compose run --rm --no-deps train export --variant ti16 --init random --out /artifacts/petvit.safetensors \
  >"$WORK/export.log" 2>&1 || { cat "$WORK/export.log" >&2; fail "petvit export failed"; }
say "placed an untrained ti16 artifact: $(tail -1 "$WORK/export.log")"

# 4. up, wait ready ------------------------------------------------------------------------------------------------
u0=$(date +%s)
compose up -d --no-build api prometheus >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; fail "compose up failed"; }
train_id=$(compose ps -a -q train)
[[ -n $train_id ]] || fail "train did not run"
[[ $(docker inspect -f '{{.State.ExitCode}}' "$train_id") == 0 ]] || fail "train exited non-zero"
api_id=$(compose ps -q api)
[[ -n $api_id ]] || fail "api container was not created"
while :; do
  health=$(docker inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$api_id")
  [[ $health == "running healthy" ]] && break
  [[ $health == running* ]] || fail "api is $health"
  (($(date +%s) - u0 < READY_TIMEOUT)) || fail "api not healthy after ${READY_TIMEOUT} s ($health)"
  sleep 1
done
READY_S=$(($(date +%s) - u0))
say "api healthy (GET /readyz 200) ${READY_S} s after 'up' (train skip + model load + warm-up + healthcheck)"

# 5. classify a real photo; 6. Prometheus saw it ------------------------------------------------------------------
"$PYTHON" -c '
import sys
import numpy as np
from PIL import Image
from skimage import data
Image.fromarray(np.asarray(data.chelsea())).save(sys.argv[1], quality=90)' "$WORK/chelsea.jpg" \
  || fail "could not write the photo (PYTHON=$PYTHON needs scikit-image and pillow)"

python3 - "$API_PORT" "$PROM_PORT" "$WORK/chelsea.jpg" <<'PY' || fail "end-to-end check failed"
import json, sys, time, urllib.parse, urllib.request, uuid

api, prom, photo = f"http://127.0.0.1:{sys.argv[1]}", f"http://127.0.0.1:{sys.argv[2]}", sys.argv[3]

def say(msg):
    print(f"compose-smoke: {msg}", file=sys.stderr, flush=True)

def query(expr):
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.load(urllib.request.urlopen(url, timeout=10))
    assert body["status"] == "success", body
    return body["data"]["result"]

def wait_for(what, fn, timeout=90):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = fn()
            if value:
                return value
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(1)

CLASSIFY = 'sum(petvit_requests_total{job="petvit-api", route="/classify", status="200"})'
wait_for("Prometheus to scrape the api (up == 1)",
         lambda: any(r["value"][1] == "1" for r in query('up{job="petvit-api"}')))
before = float((query(CLASSIFY) or [{"value": [0, "0"]}])[0]["value"][1])
say(f"Prometheus: api target up; classify requests so far: {before:g}")

boundary = uuid.uuid4().hex
image = open(photo, "rb").read()
body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"chelsea.jpg\"\r\n"
        f"Content-Type: image/jpeg\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
request = urllib.request.Request(f"{api}/classify?top_k=3", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
t = time.perf_counter()
with urllib.request.urlopen(request, timeout=60) as response:
    assert response.status == 200, response.status
    answer = json.load(response)
(result,) = answer["results"]
assert (result["width"], result["height"]) == (451, 300), result
predictions = result["predictions"]
assert len(predictions) == 3 and all({"label", "score", "species", "index"} <= set(p) for p in predictions)
assert predictions == sorted(predictions, key=lambda p: -p["score"])
say(f"POST /classify chelsea.jpg -> {[(p['label'], round(p['score'], 3)) for p in predictions]} "
    f"in {1000 * (time.perf_counter() - t):.0f} ms (untrained model: labels are noise)")

after = wait_for("petvit_requests_total{route=\"/classify\"} to grow in Prometheus",
                 lambda: [float(r["value"][1]) for r in query(CLASSIFY) if float(r["value"][1]) >= before + 1])
say(f"Prometheus: classify requests {before:g} -> {after[0]:g}")
PY

say "SUMMARY build=${BUILD_S}s size=${SIZE} ready=${READY_S}s total=$(($(date +%s) - T0))s"
