#!/usr/bin/env bash
# One-command setup: .venv with torch, liveavatar-lite (editable) and the test, NF4 and farm (Ray) extras.
# torch is installed only if the venv has none, so a CUDA build you installed first is kept.
# As root on Debian/Ubuntu it also installs chromium + chromium-driver (the serve page's browser
# test); without them that one test skips.
# `torch==2.13.0` is the CUDA build from PyPI on a GPU machine, and a local CPU wheel on our CI machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install --quiet "torch==2.13.0"
.venv/bin/pip install --quiet -e ".[dev,bnb,farm]"
if ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; } \
        && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null \
        || echo "setup: could not install chromium (the browser test will skip)" >&2
fi
.venv/bin/liveavatar-lite --version
