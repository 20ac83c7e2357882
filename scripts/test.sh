#!/usr/bin/env bash
# README's test command: set up .venv with the pinned torch/torchvision, then run the whole suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k rollout`).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q -c constraints.txt -e '.[dev]'
# The web page's browser test drives Debian's chromium + chromedriver; installs them when missing (root + apt).
bash scripts/install-browser.sh
exec .venv/bin/python -m pytest "$@"
