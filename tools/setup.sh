#!/usr/bin/env bash
# One-command setup: .venv with torch and liveavatar-lite (editable) with the test extra (dev).
#   bash tools/setup.sh               # torch + liveavatar-lite[dev]: the suite runs; Ray/NF4/browser tests skip
#   bash tools/setup.sh --all         # + the farm (Ray) and NF4 (bitsandbytes) extras
#   bash tools/setup.sh --browser     # + chromium and chromium-driver via apt (root, Debian/Ubuntu): the page test
#   bash tools/setup.sh --ci          # what CI runs the whole suite with: --all --browser (also when CI=true)
# torch is installed only if the venv has none, so a CUDA build you installed first is kept.
# `torch==2.13.0` is the CUDA build from PyPI on a GPU machine, and a local CPU wheel on our CI machines.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=dev
BROWSER=0
if [ "${CI:-}" = true ]; then EXTRAS=dev,bnb,farm; BROWSER=1; echo "setup: CI=true: as --ci (every extra and the browser)"; fi
for arg in "$@"; do
    case "$arg" in
        --all) EXTRAS=dev,bnb,farm ;;
        --browser) BROWSER=1 ;;
        --ci) EXTRAS=dev,bnb,farm; BROWSER=1 ;;
        -h|--help) sed -n 2,8p "$0"; exit 0 ;;
        *) echo "setup: unknown option $arg (see: bash tools/setup.sh --help)" >&2; exit 2 ;;
    esac
done
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || { echo "setup: creating .venv"; "$PY" -m venv .venv; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "setup: installing torch==2.13.0 into .venv (large: several minutes on a slow link)"
    .venv/bin/pip install --progress-bar on "torch==2.13.0"
fi
echo "setup: installing liveavatar-lite[$EXTRAS] (editable) into .venv"
.venv/bin/pip install --progress-bar on -e ".[$EXTRAS]"
if [ "$BROWSER" = 1 ]; then
    if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
        :
    elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing chromium and chromium-driver with apt-get (for the serve page's browser test)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null \
            || echo "setup: could not install chromium (the browser test will skip)" >&2
    else
        echo "setup: --browser needs root and apt-get; install chromium + chromedriver yourself (the browser test skips)" >&2
    fi
else
    echo "setup: no browser installed: the serve page's browser test skips (bash tools/setup.sh --browser adds chromium)"
fi
.venv/bin/liveavatar-lite --version
echo "setup: done. Run the tools as .venv/bin/liveavatar-lite, or 'source .venv/bin/activate' first"
