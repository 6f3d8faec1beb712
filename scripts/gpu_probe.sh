#!/usr/bin/env bash
# GPU runs of the gradient probe (issue 3), one batched session:
#   1. Qwen2.5-Coder-0.5B-Instruct at >= 16K tokens, objective answer (the config) and prompt (the contrast);
#   2. the cost benchmark: Llama-3.1-8B architecture, random bf16 weights, 16K tokens x 8 samples.
# Everything lands under $OUT (result folders, logs, bench JSON, versions). Nothing is downloaded.
#
#   QWEN_GGUF      model file        (default /tmp/stage/qwen2.5-coder-0.5b-instruct.gguf)
#   PROBE_LENGTHS  prompt lengths    (default 16k)
#   PROBE_SAMPLES  samples per task  (default 3)   PROBE_TASKS  (default all)
#   BENCH_SEQ / BENCH_SAMPLES        (default 16384 / 8)
#   PROBE_DRY=1    a tiny CPU dry run of the same commands (minutes, no GPU)
set -euo pipefail
OUT=${OUT:-probe-gpu-out}
QWEN=${QWEN_GGUF:-/tmp/stage/qwen2.5-coder-0.5b-instruct.gguf}
LENGTHS=${PROBE_LENGTHS:-16k}
SAMPLES=${PROBE_SAMPLES:-3}
BENCH_SEQ=${BENCH_SEQ:-16384}
BENCH_SAMPLES=${BENCH_SAMPLES:-8}
ARGS=()
BENCH=(--seq "$BENCH_SEQ" --samples "$BENCH_SAMPLES")
if [[ "${PROBE_DRY:-0}" == 1 ]]; then
  LENGTHS=1200; SAMPLES=1
  ARGS=(--tasks niah_multikey,vt --n-local 256 --last-n 64 --device cpu)
  BENCH=(--arch tiny --seq 600 --samples 2 --device cpu --dtype float32)
fi
mkdir -p "$OUT"
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi";
  python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'; } \
  > "$OUT/env.txt"
for objective in answer prompt; do
  /usr/bin/time -v trimix-probe analyze "$QWEN" --out "$OUT/qwen-$objective" --lengths "$LENGTHS" --tasks "${PROBE_TASKS:-all}" \
    --samples "$SAMPLES" --objective "$objective" --per-head "${ARGS[@]}" 2>&1 | tee "$OUT/qwen-$objective.log"
done
trimix-probe bench probe "${BENCH[@]}" --out "$OUT/bench-probe.json" 2>&1 | tee "$OUT/bench-probe.log"
