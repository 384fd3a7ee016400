#!/usr/bin/env bash
# One-command setup: .venv with torch, liveavatar-lite (editable) and the test + NF4 extras.
# torch is installed only if the venv has none, so a CUDA build you installed first is kept.
# `torch==2.13.0` is the CUDA build from PyPI on a GPU machine, and a local CPU wheel on our CI machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install --quiet "torch==2.13.0"
.venv/bin/pip install --quiet -e ".[dev,bnb]"
.venv/bin/liveavatar-lite --version
