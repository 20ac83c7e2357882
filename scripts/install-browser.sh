#!/usr/bin/env bash
# Install the browser the UI test drives: Debian's chromium + chromium-driver (/usr/bin/chromium,
# /usr/bin/chromedriver). Idempotent: does nothing when both are there. Needs apt and root (CI runs as root);
# otherwise it says what to run and fails, so the browser test never silently goes missing.
set -euo pipefail

CHROMIUM=/usr/bin/chromium
CHROMEDRIVER=/usr/bin/chromedriver

if [[ -x $CHROMIUM && -x $CHROMEDRIVER ]]; then
  echo "install-browser: already installed: $("$CHROMIUM" --version 2>/dev/null || echo chromium), $("$CHROMEDRIVER" --version 2>/dev/null | head -n1)"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-browser: apt-get not found; install Chromium and a matching ChromeDriver at $CHROMIUM and $CHROMEDRIVER by hand" >&2
  exit 1
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "install-browser: needs root for apt-get; run: sudo bash $0" >&2
  exit 1
fi

echo "install-browser: installing Debian packages chromium and chromium-driver (apt-get)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium chromium-driver >/dev/null
echo "install-browser: installed: $("$CHROMIUM" --version), $("$CHROMEDRIVER" --version | head -n1)"
