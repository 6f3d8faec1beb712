#!/usr/bin/env bash
# Accuracy runs for docs/accuracy.md on GPU(s): SmolLM2-135M-Instruct at 4K/8K and
# Qwen2.5-Coder-0.5B-Instruct at 8K/16K/32K; dense vs the config vs streaming / triangle-all and a
# sweep over starting layers. One worker per task, spread round-robin over the visible GPUs
# (8 tasks on nvidia-h100-x8: one task per GPU), then one merged table per model.
#
#   scripts/gpu_eval.sh smol     # SmolLM2 part
#   scripts/gpu_eval.sh qwen     # Qwen part
#   scripts/gpu_eval.sh all      # both, one after the other
# A call that must fit a time limit: one length per call (SMOL_LENGTHS=4k, then 8k); rows are written
# as they come, so a worker cut short still leaves its results.csv (merge with merge_results).
#
# Environment (defaults in brackets):
#   SMOL_GGUF   [/tmp/stage/SmolLM2-135M-Instruct.Q4_1.gguf]
#   QWEN_GGUF   [/tmp/stage/qwen2.5-coder-0.5b-instruct.gguf]
#   SMOL_CONFIG [docs/figures/probe-smollm2/config.json if present]  the probe's configs (method
#   QWEN_CONFIG [${PROBE_OUT:-probe-gpu-out}/qwen-answer/config.json if present]  "config"); none: no such row
#   OUT         [./gpu-eval-out] everything is written under it: $OUT/<model>-<lengths>/{part-<task>,merged}/
#   SAMPLES [20]  SMOL_LENGTHS [4k,8k]  QWEN_LENGTHS [8k,16k,32k]
#   SMOL_SWEEP [4,8,12,16,20,24,28]  QWEN_SWEEP [4,8,12,16,20]   TASKS [all 8]
#   WORKERS [number of GPUs, 1 without any]   EXTRA [extra eval options, e.g. "--max-new-tokens 4"]
#   DEVICE_PREFIX [cuda]  (cpu for a dry run: `DEVICE_PREFIX=cpu WORKERS=1 ...`)
#   BATCH [20 on cuda, 1 on cpu]  samples of one task and length generated together (--batch-size)
set -euo pipefail

PART=${1:-all}
SMOL_GGUF=${SMOL_GGUF:-/tmp/stage/SmolLM2-135M-Instruct.Q4_1.gguf}
QWEN_GGUF=${QWEN_GGUF:-/tmp/stage/qwen2.5-coder-0.5b-instruct.gguf}
OUT=${OUT:-./gpu-eval-out}
SAMPLES=${SAMPLES:-20}
SMOL_LENGTHS=${SMOL_LENGTHS:-4k,8k}
QWEN_LENGTHS=${QWEN_LENGTHS:-8k,16k,32k}
SMOL_SWEEP=${SMOL_SWEEP:-4,8,12,16,18,20,22,24,26}
QWEN_SWEEP=${QWEN_SWEEP:-4,8,12,14,16,18,20,22}
if [[ -z "${SMOL_CONFIG+x}" && -f docs/figures/probe-smollm2/config.json ]]; then
  SMOL_CONFIG=docs/figures/probe-smollm2/config.json
fi
if [[ -z "${QWEN_CONFIG+x}" && -f "${PROBE_OUT:-probe-gpu-out}/qwen-answer/config.json" ]]; then
  QWEN_CONFIG="${PROBE_OUT:-probe-gpu-out}/qwen-answer/config.json"
fi
TASKS=${TASKS:-niah_single_noise,niah_single_prose,niah_multikey,niah_multivalue,niah_multiquery,vt,cwe,fwe}
DEVICE_PREFIX=${DEVICE_PREFIX:-cuda}
EXTRA=${EXTRA:-}
if [[ "$DEVICE_PREFIX" == cuda ]]; then BATCH=${BATCH:-20}; else BATCH=${BATCH:-1}; fi
if [[ -z "${WORKERS:-}" ]]; then
  WORKERS=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [[ "$WORKERS" -ge 1 ]] || WORKERS=1
fi
PY=${PY:-python}
mkdir -p "$OUT"

run_model() {  # name gguf lengths sweep config
  local name=$1 gguf=$2 lengths=$3 sweep=$4 config=$5
  [[ -f "$gguf" ]] || { echo "error: $name model $gguf not found (set ${name^^}_GGUF)" >&2; exit 2; }
  local cfg_opt=()
  [[ -n "$config" ]] && cfg_opt=(--config "$config")
  local dir="$OUT/$name-${lengths//,/_}" i=0 pids=() parts=()
  echo "[$name] config: ${config:-none}; lengths $lengths; sweep $sweep; $SAMPLES samples a task" >&2
  mkdir -p "$dir"
  IFS=, read -ra tasks <<< "$TASKS"
  for task in "${tasks[@]}"; do
    local gpu=$((i % WORKERS)) dev="$DEVICE_PREFIX"
    [[ "$DEVICE_PREFIX" == cuda ]] && dev="cuda:$gpu"
    parts+=("$dir/part-$task")
    echo "[$name] $task on $dev -> $dir/part-$task" >&2
    trimix-probe eval --model "$gguf" "${cfg_opt[@]}" --lengths "$lengths" --tasks "$task" \
      --samples "$SAMPLES" --baselines streaming,triangle-all --sweep "$sweep" --device "$dev" --batch-size "$BATCH" \
      --out "$dir/part-$task" $EXTRA > "$dir/part-$task.log" 2>&1 &
    pids+=($!)
    i=$((i + 1))
    # more tasks than workers: wait for this round before starting the next
    if (( i % WORKERS == 0 )); then for p in "${pids[@]}"; do wait "$p"; done; pids=(); fi
  done
  local failed=0
  for p in "${pids[@]}"; do wait "$p" || failed=1; done
  "$PY" - "$dir/merged" "$name $lengths" "${parts[@]}" <<'EOF'
import sys
from pathlib import Path
from trimix_probe.evaluate import merge_results
out, name, parts = sys.argv[1], sys.argv[2], sys.argv[3:]
have = [p for p in parts if (Path(p) / "results.csv").is_file()]
missing = sorted(set(parts) - set(have))
if missing:
    print(f"warning: no results in {missing} (see their .log)", file=sys.stderr)
merge_results(have, out, title=name)
print(Path(out, "summary.md").read_text())
EOF
  return $failed
}

{ echo "date: $(date -u +%FT%TZ)"; nvidia-smi -L 2>/dev/null || echo "no GPU"; "$PY" -c \
  "import torch, transformers, trimix_probe; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trimix-probe', trimix_probe.__version__)"; } > "$OUT/env.txt"

status=0
if [[ "$PART" == smol || "$PART" == all ]]; then
  run_model smol "$SMOL_GGUF" "$SMOL_LENGTHS" "$SMOL_SWEEP" "${SMOL_CONFIG:-}" || status=1
fi
if [[ "$PART" == qwen || "$PART" == all ]]; then
  run_model qwen "$QWEN_GGUF" "$QWEN_LENGTHS" "$QWEN_SWEEP" "${QWEN_CONFIG:-}" || status=1
fi
exit $status
