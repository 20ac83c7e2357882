#!/usr/bin/env bash
# Compose smoke test: the image and docker-compose.yml, end to end, on any machine with a Docker engine.
#
#   1. docker-compose config accepts the files (with every compose it finds) and selects the CPU flavour of the
#      image by default, the CUDA flavour with docker-compose.gpu.yml; promtool accepts the Prometheus config and
#      passes the alert tests
#   2. build the image (classic builder); run the Kubernetes preStop hook's command in it
#   3. the first run without an artifact or a network, once per compose found: `up` (attached, as a person types
#      it) must show the api's explanation (train's reason with host folders, the route without training) while
#      /healthz answers 200 and /readyz 503 (its advice the compose command, with the host folder); train's own
#      message names the host folder too; then Ctrl-C (SIGINT) must leave nothing running
#   4. the route without training, into a bind-mounted host folder that belongs to an ordinary user (as root: uid
#      SMOKE_USER_UID, default 1000), with docs/deploy.md's command: `petvit export` writes the file as that user
#      and the folder Docker creates for the data goes to them too; then `up api prometheus` (train sees the file
#      and exits 0), wait until the api container is healthy (/readyz)
#   4b. `docker run -v HOST_FOLDER:/artifacts IMAGE export ...` (no compose, the image's own user) into that same
#      user's folder: one clear line naming the --user to pass, no traceback; with that --user it writes the file
#   5. POST /classify a real photo (scikit-image's chelsea, as a JPEG); check the answer
#   6. ask Prometheus's HTTP API that the api target is up and that petvit_requests_total{route="/classify"} grew
# Everything it started is removed on exit, pass or fail (containers, networks, volumes, its host folders).
#
# Uses `docker compose` (v2) or `docker-compose` (v1.29+), whichever exists, for everything, and also any other
# compose named in SMOKE_COMPOSE_V2 for steps 1 and 3. Settings (environment):
#   DOCKER_BUILD        build command prefix (default "docker build"; e.g. a wrapper adding mirrors/--network)
#   SMOKE_BUILD_ARGS    extra build arguments, e.g. "--build-arg PIP_INDEX_URL=https://mirror/simple"
#   SMOKE_IMAGE         image tag to build and run (default petvit:smoke)
#   SMOKE_SKIP_BUILD=1  use SMOKE_IMAGE as it is
#   SMOKE_READY_TIMEOUT seconds to wait for readiness (default 300)
#   SMOKE_COMPOSE_V2    path of a second compose binary (e.g. Compose v2 when the main one is v1.29)
#   PYTHON              a Python with scikit-image and PyYAML (default .venv/bin/python, as scripts/test.sh makes it)
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
COMPOSE_V2=${SMOKE_COMPOSE_V2:-}
[[ -z $COMPOSE_V2 || -x $COMPOSE_V2 ]] || fail "SMOKE_COMPOSE_V2=$COMPOSE_V2 is not an executable"
compose_version() { "$@" version --short 2>/dev/null || "$@" version | sed -n 's/.*version \(v\?[0-9.]*\).*/\1/p'; }
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
PROJECTS=()  # every compose project started, for the cleanup

cleanup() {
  local rc=$? project
  if ((rc != 0)); then
    say "logs of the failed run:"
    compose logs --no-color --tail 80 prepare train api prometheus >&2 || true
  fi
  for project in "${PROJECTS[@]}"; do
    "${COMPOSE[@]}" -p "$project" -f docker-compose.yml down -v --remove-orphans >/dev/null 2>&1 || true
  done
  # What the containers wrote in the host folders belongs to their users; root (or that user) can remove it.
  rm -rf "$WORK" 2>/dev/null || docker run --rm -v "$WORK:/w" --user 0:0 --entrypoint rm "$IMAGE" -rf /w/mine /w/first-* || true
  rm -rf "$WORK" || true
  say "$( ((rc == 0)) && echo PASSED || echo "FAILED (exit $rc)") in $(($(date +%s) - T0)) s; torn down"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 1. static checks with the real tools --------------------------------------------------------------------------
say "using ${COMPOSE[*]} ($(compose_version "${COMPOSE[@]}"))${COMPOSE_V2:+ and $COMPOSE_V2 ($(compose_version "$COMPOSE_V2"))}"
flavours() {  # the image and TORCH_FLAVOR each petvit service gets, from a compose's own `config` output
  "$PYTHON" -c '
import sys, yaml
services = yaml.safe_load(sys.stdin)["services"]
pairs = {services[s]["image"] + "/" + services[s]["build"]["args"]["TORCH_FLAVOR"] for s in ("prepare", "train", "api")}
print(" ".join(sorted(pairs)))'
}
for c in "${COMPOSE[*]}" ${COMPOSE_V2:+"$COMPOSE_V2"}; do
  # shellcheck disable=SC2086  # "docker compose" is two words
  $c -f docker-compose.yml config -q || fail "$c rejects docker-compose.yml"
  # shellcheck disable=SC2086
  $c -f docker-compose.yml -f docker-compose.gpu.yml config -q || fail "$c rejects the GPU override"
  # Which flavour a user gets, with none of this script's settings: CPU by default, CUDA with the GPU override.
  # shellcheck disable=SC2086
  cpu=$(env -u PETVIT_IMAGE -u PETVIT_TORCH_FLAVOR $c -f docker-compose.yml config | flavours)
  # shellcheck disable=SC2086
  gpu=$(env -u PETVIT_IMAGE -u PETVIT_TORCH_FLAVOR $c -f docker-compose.yml -f docker-compose.gpu.yml config | flavours)
  [[ $cpu == petvit:cpu/cpu ]] || fail "$c: docker-compose.yml builds '$cpu', not petvit:cpu with TORCH_FLAVOR=cpu"
  [[ $gpu == petvit:cuda/cuda ]] || fail "$c: the GPU override builds '$gpu', not petvit:cuda with TORCH_FLAVOR=cuda"
  say "$c: image flavour cpu by default, cuda with docker-compose.gpu.yml"
done
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
  BUILD="$(($(date +%s) - b0)) s"
else
  BUILD=skipped
fi
SIZE=$(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1 / 1e9}')
say "image $IMAGE: build $BUILD, size $SIZE"
# The Deployment's preStop hook execs a command in this image (it has no `sleep` binary we may count on): run it
# here as Kubernetes would, as the image's user on a read-only root file system.
mapfile -t PRE_STOP < <("$PYTHON" -c '
import yaml
pod = yaml.safe_load(open("deploy/k8s/base/deployment.yaml"))["spec"]["template"]["spec"]
(api,) = [c for c in pod["containers"] if c["name"] == "api"]
print(*api["lifecycle"]["preStop"]["exec"]["command"], sep="\n")') || fail "no preStop exec command in deployment.yaml"
p0=$(date +%s)
docker run --rm --read-only --entrypoint "${PRE_STOP[0]}" "$IMAGE" "${PRE_STOP[@]:1}" \
  || fail "the preStop command fails in the image: ${PRE_STOP[*]}"
say "k8s preStop hook (${PRE_STOP[*]}) runs in the image: $(($(date +%s) - p0)) s"

# 3. the first run, no artifact and no network: the explanation in `up`'s own output, nothing left running ------
# train gets no network at all (an override file), so that Pets cannot download on any machine: the real first
# run on a machine without network, in seconds.
cat >"$WORK/offline.yml" <<'YAML'
services:
  train:
    network_mode: none
YAML
first_run() {  # $1: a number for its project and folders, then the compose command
  local dir="$WORK/first-$1" log="$WORK/first-$1.up.log" project="$PROJECT-first$1" up_pid t0 i label
  shift
  label="first run, compose $(compose_version "$@")"
  PROJECTS+=("$project")
  t0=$(date +%s)
  # SIGINT must reach compose as a person's Ctrl-C does: job control keeps bash from ignoring it in the job.
  set -m
  PETVIT_ARTIFACTS_DIR="$dir/artifacts" PETVIT_DATA_DIR="$dir/data" \
    "$@" -p "$project" -f docker-compose.yml -f "$WORK/offline.yml" up --no-build --no-color prepare train api prometheus \
    >"$log" 2>&1 &
  up_pid=$!
  set +m
  for ((i = 0; i < 120; i++)); do  # the explanation ends with this line
    grep -q 'Meanwhile the api stays up' "$log" && break
    kill -0 "$up_pid" 2>/dev/null || { cat "$log" >&2; fail "$label: 'up' ended by itself"; }
    sleep 1
  done
  grep -q 'NOT READY' "$log" || { cat "$log" >&2; fail "$label: no explanation in the 'up' output after ${i} s"; }
  say "$label: the explanation is in 'up's output ${i} s after 'up'"
  for want in "$dir/data/oxford-iiit-pet" "$dir/artifacts/petvit.safetensors" \
    'docker compose run --rm train export --variant ti16 --init random --out /artifacts/petvit.safetensors'; do
    grep -qF -- "$want" "$log" || { cat "$log" >&2; fail "$label: the explanation does not name $want"; }
  done
  for ((i = 0; i < 60; i++)); do  # the api serves once it has explained: alive, not ready
    [[ $(curl_code "/healthz") == 200 && $(curl_code "/readyz") == 503 ]] && break
    sleep 1
  done
  ((i < 60)) || { cat "$log" >&2; fail "$label: api not answering /healthz 200 and /readyz 503"; }
  # In host terms everywhere: train's own message (petvit prints it so under compose), and /readyz's advice is the
  # compose command that makes an artifact, naming the host folder.
  grep -E '^train[-_]1 +\| petvit train: ' "$log" | grep -qF "$dir/data/oxford-iiit-pet" \
    || { cat "$log" >&2; fail "$label: train's own message does not name the host folder $dir/data"; }
  local ready
  ready=$(curl_body /readyz)
  for want in "$dir/artifacts/petvit.safetensors" \
    '`docker compose run --rm train export --variant ti16 --init random --out /artifacts/petvit.safetensors`'; do
    grep -qF -- "$want" <<<"$ready" || fail "$label: /readyz's 503 does not say $want: $ready"
  done
  kill -INT "$up_pid"
  for ((i = 0; i < 60; i++)); do kill -0 "$up_pid" 2>/dev/null || break; sleep 1; done
  kill -0 "$up_pid" 2>/dev/null && fail "$label: 'up' still running 60 s after Ctrl-C"
  wait "$up_pid" || true
  local running
  running=$(docker ps -q --filter "label=com.docker.compose.project=$project")
  [[ -z $running ]] || fail "$label: left running after Ctrl-C: $(docker ps --filter "label=com.docker.compose.project=$project" --format '{{.Names}}')"
  say "$label: the first run explained itself in 'up' (/healthz 200, /readyz 503), Ctrl-C left nothing running ($(($(date +%s) - t0)) s)"
  sed -n '/NOT READY/,/====/p' "$log" | sed 's/^/    /' | head -8 >&2
  "$@" -p "$project" -f docker-compose.yml down -v --remove-orphans >/dev/null 2>&1 || true
}
curl_body() { python3 -c '
import sys, urllib.error, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())
except urllib.error.HTTPError as err:
    print(err.read().decode())' "http://127.0.0.1:$API_PORT$1"; }
curl_code() { python3 -c '
import sys, urllib.error, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=5).status)
except urllib.error.HTTPError as err:
    print(err.code)
except OSError:
    print(0)' "http://127.0.0.1:$API_PORT$1"; }

first_run 1 "${COMPOSE[@]}"
if [[ -n $COMPOSE_V2 ]]; then
  first_run 2 "$COMPOSE_V2"
fi

# 4. the route without training, into an ordinary user's host folder ------------------------------------------------
MINE="$WORK/mine"
mkdir -p "$MINE/artifacts"
if ((EUID == 0)); then  # a folder as a user makes it: theirs, 755, not writable by the image's uid 10001
  chown "${SMOKE_USER_UID:-1000}:${SMOKE_USER_UID:-1000}" "$MINE/artifacts"
fi
chmod 755 "$MINE/artifacts"
export PETVIT_ARTIFACTS_DIR="$MINE/artifacts" PETVIT_DATA_DIR="$MINE/data"  # data: absent, Docker creates it
OWNER=$(stat -c %u:%g "$MINE/artifacts")
PROJECTS+=("$PROJECT")
# docs/deploy.md's command, as written there
compose run --rm train export --variant ti16 --init random --out /artifacts/petvit.safetensors \
  >"$WORK/export.log" 2>&1 || { cat "$WORK/export.log" >&2; fail "petvit export into $MINE/artifacts failed"; }
[[ -f $MINE/artifacts/petvit.safetensors ]] || fail "export wrote no $MINE/artifacts/petvit.safetensors"
[[ $(stat -c %u:%g "$MINE/artifacts/petvit.safetensors") == "$OWNER" ]] \
  || fail "the artifact belongs to $(stat -c %u:%g "$MINE/artifacts/petvit.safetensors"), not the folder's owner $OWNER"
[[ $(stat -c %u:%g "$MINE/data") == "$OWNER" ]] \
  || fail "the data folder Docker created belongs to $(stat -c %u:%g "$MINE/data"), not $OWNER"
say "export into a host folder of uid $OWNER: $(tail -1 "$WORK/export.log"), owned by $OWNER (no chmod)"

# 4b. the same folder with plain `docker run` (the image's uid 10001, no compose entrypoint): one line naming the
# --user to pass, no traceback; with that --user, the file is written and is the folder owner's.
run_export() { docker run --rm "$@" -v "$MINE/artifacts:/artifacts" "$IMAGE" export --variant ti16 --out /artifacts/run/m.safetensors; }
if [[ $OWNER != 10001:* ]]; then
  run_export >"$WORK/run.out" 2>"$WORK/run.err" && fail "docker run wrote into a folder of uid $OWNER as uid 10001?"
  [[ $(wc -l <"$WORK/run.err") == 1 ]] && ! grep -q Traceback "$WORK/run.err" \
    || { cat "$WORK/run.err" >&2; fail "docker run into a folder it cannot write: not one line"; }
  grep -qF -- "docker run --user $OWNER" "$WORK/run.err" || { cat "$WORK/run.err" >&2; fail "the line does not say --user $OWNER"; }
  say "docker run into a folder of uid $OWNER, as the image's uid 10001: $(cat "$WORK/run.err")"
fi
run_export --user "$OWNER" >"$WORK/run.out" 2>"$WORK/run.err" || { cat "$WORK/run.err" >&2; fail "docker run --user $OWNER export failed"; }
[[ $(stat -c %u:%g "$MINE/artifacts/run/m.safetensors") == "$OWNER" ]] || fail "docker run --user $OWNER wrote a file of another owner"
say "docker run --user $OWNER: $(tail -1 "$WORK/run.out"), owned by $OWNER"

u0=$(date +%s)
compose up -d --no-build api prometheus >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; fail "compose up failed"; }
train_id=$(compose ps -a -q train)
[[ -n $train_id ]] || fail "train did not run"
for ((i = 0; i < 60; i++)); do  # api starts with train (not after it): train may still be checking for the file
  [[ $(docker inspect -f '{{.State.Status}}' "$train_id") == exited ]] && break
  sleep 1
done
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

say "SUMMARY build=${BUILD// /} size=${SIZE// /} ready=${READY_S}s total=$(($(date +%s) - T0))s"
