#!/usr/bin/env bash
# Accuracy runs for docs/accuracy.md on GPU(s): one eval process per task, PROCS of them at a time,
# spread round-robin over the visible GPUs (small models leave a GPU idle during decoding, so several
# processes per GPU raise throughput), then one merged table per part.
#
#   scripts/gpu_eval.sh smol     # SmolLM2-135M-Instruct: dense, config, streaming, triangle-all, sweep
#   scripts/gpu_eval.sh qwen     # Qwen2.5-Coder-0.5B-Instruct: the same
#   scripts/gpu_eval.sh dynamic  # Qwen: dense, the dynamic + TriangleMix config (DYN_CONFIG), DYN_SWEEP layers
# A call that must fit a time limit: one length per call (QWEN_LENGTHS=32704, ...); rows are written
# as they come, so a worker cut short still leaves its results.csv (the merge takes what is there).
#
# Environment (defaults in brackets):
#   SMOL_GGUF   [/tmp/stage/SmolLM2-135M-Instruct.Q4_1.gguf]
#   QWEN_GGUF   [/tmp/stage/qwen2.5-coder-0.5b-instruct.gguf]
#   SMOL_CONFIG, QWEN_CONFIG, DYN_CONFIG  the configs evaluated as method "config" (none: no such row)
#   OUT         [./gpu-eval-out] results under $OUT/<part>-<lengths>/{part-<task>,merged}/
#   SAMPLES [20]  SMOL_LENGTHS [4k,8128]  QWEN_LENGTHS [8k,16k,32704]  DYN_LENGTHS [16k,32704]
#     (8128 and 32704: the context minus the 64 generated tokens, as RULER counts a length)
#   SMOL_SWEEP [4,8,12,16,18,20,22,24,26]  QWEN_SWEEP [4,8,10,12,14,16,18,20]  TASKS [all 8]
#   PROCS [8 on cuda, 1 on cpu] eval processes at a time   BATCH [20]  BATCH_TOKENS [128k]
#   EXTRA [extra eval options, e.g. "--max-new-tokens 4"]   DEVICE_PREFIX [cuda] (cpu: a dry run)
#   AGAINST [methods the merged summary also pairs with, besides dense, e.g. trimix@L14]   PY [python3]
set -euo pipefail

PART=${1:?usage: gpu_eval.sh smol|qwen|dynamic}
SMOL_GGUF=${SMOL_GGUF:-/tmp/stage/SmolLM2-135M-Instruct.Q4_1.gguf}
QWEN_GGUF=${QWEN_GGUF:-/tmp/stage/qwen2.5-coder-0.5b-instruct.gguf}
OUT=${OUT:-./gpu-eval-out}
SAMPLES=${SAMPLES:-20}
TASKS=${TASKS:-niah_single_noise,niah_single_prose,niah_multikey,niah_multivalue,niah_multiquery,vt,cwe,fwe}
DEVICE_PREFIX=${DEVICE_PREFIX:-cuda}
EXTRA=${EXTRA:-}
BATCH=${BATCH:-20}
BATCH_TOKENS=${BATCH_TOKENS:-128k}
PY=${PY:-python3}
NGPU=1
if [[ "$DEVICE_PREFIX" == cuda ]]; then
  NGPU=$(nvidia-smi -L 2>/dev/null | wc -l || true); [[ "$NGPU" -ge 1 ]] || NGPU=1
  PROCS=${PROCS:-8}
else
  PROCS=${PROCS:-1}
fi
mkdir -p "$OUT"

run_part() {  # name gguf lengths config baselines sweep
  local name=$1 gguf=$2 lengths=$3 config=$4 baselines=$5 sweep=$6
  [[ -f "$gguf" ]] || { echo "error: model $gguf not found" >&2; return 2; }
  local opts=()
  [[ -n "$config" ]] && opts+=(--config "$config")
  [[ -n "$baselines" ]] && opts+=(--baselines "$baselines")
  [[ -n "$sweep" ]] && opts+=(--sweep "$sweep")
  local dir="$OUT/$name-${lengths//,/_}" i=0 pids=() parts=()
  echo "[$name] config ${config:-none}; lengths $lengths; baselines ${baselines:-none}; sweep ${sweep:-none};" \
       "$SAMPLES samples a task; $PROCS processes on $NGPU GPU(s)" >&2
  mkdir -p "$dir"
  IFS=, read -ra tasks <<< "$TASKS"
  for task in "${tasks[@]}"; do
    local dev="$DEVICE_PREFIX"
    [[ "$DEVICE_PREFIX" == cuda ]] && dev="cuda:$((i % NGPU))"
    parts+=("$dir/part-$task")
    "$PY" -m trimix_probe.cli.app eval --model "$gguf" "${opts[@]}" --lengths "$lengths" --tasks "$task" \
      --samples "$SAMPLES" --device "$dev" --dtype bfloat16 --batch-size "$BATCH" --batch-tokens "$BATCH_TOKENS" \
      --out "$dir/part-$task" $EXTRA > "$dir/part-$task.log" 2>&1 &
    pids+=($!)
    i=$((i + 1))
    if (( ${#pids[@]} >= PROCS )); then wait "${pids[0]}" || true; pids=("${pids[@]:1}"); fi
  done
  for p in "${pids[@]}"; do wait "$p" || true; done
  "$PY" -m trimix_probe.cli.app eval merge --title "$name $lengths" --against "${AGAINST:-}" --allow-missing \
    "$dir/merged" "${parts[@]}"
}

{ echo "date: $(date -u +%FT%TZ)"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no GPU"
  "$PY" -c "import torch, triton, transformers, trimix_probe; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'trimix-probe', trimix_probe.__version__)"; } > "$OUT/env-$PART.txt"

case "$PART" in
smol) run_part smol "$SMOL_GGUF" "${SMOL_LENGTHS:-4k,8128}" "${SMOL_CONFIG:-}" streaming,triangle-all \
        "${SMOL_SWEEP:-4,8,12,16,18,20,22,24,26}" ;;
qwen) run_part qwen "$QWEN_GGUF" "${QWEN_LENGTHS:-8k,16k,32704}" "${QWEN_CONFIG:-}" streaming,triangle-all \
        "${QWEN_SWEEP:-4,8,10,12,14,16,18,20}" ;;
dynamic) run_part dynamic "$QWEN_GGUF" "${DYN_LENGTHS:-16k,32704}" "${DYN_CONFIG:?set DYN_CONFIG}" "" "${DYN_SWEEP:-}" ;;
*) echo "unknown part $PART (smol, qwen, dynamic)" >&2; exit 2 ;;
esac
