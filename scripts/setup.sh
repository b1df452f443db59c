#!/usr/bin/env bash
# Create .venv (once) and install the project with pinned CPU torch. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
. .venv/bin/activate
if ! python -c "import torch, diffusers, h5py, dash" 2>/dev/null || [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
  pip install -q --upgrade pip
  pip install -q -c constraints.txt torch==2.13.0
  pip install -q -c constraints.txt -e ".[test]"
  touch .venv/.installed
fi
