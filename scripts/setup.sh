#!/usr/bin/env bash
# Create .venv (once) and install the project with pinned CPU torch. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
. .venv/bin/activate
if ! python -c "import torch, diffusers, h5py, dash" 2>/dev/null || [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
  pip install -q --upgrade pip
  pip install -q -c constraints.txt torch==2.13.0
  pip install -q -c constraints.txt -e ".[test,track]"  # track: tests/test_tracking.py reads TensorBoard events
  touch .venv/.installed
fi
# The dashboard's browser tests drive headless Chromium through chromedriver (Debian/Ubuntu
# packages chromium + chromium-driver); install them when missing and we may (root or sudo).
if ! command -v chromedriver >/dev/null 2>&1 || \
   ! { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; }; then
  sudo=""
  [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && sudo="sudo -n"
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; }; then
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver \
      >/dev/null || echo "warning: could not install chromium/chromium-driver; browser tests will be skipped" >&2
  else
    echo "note: chromium/chromium-driver not found and cannot be installed here; browser tests will be skipped" >&2
  fi
fi
