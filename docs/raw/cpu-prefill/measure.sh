#!/usr/bin/env bash
# CPU prefill, SmolLM2 (embedded), float32: 3 runs per length, each `run --compare-dense`
# (dense then TriangleMix in one process). Usage: measure.sh INPUT_DIR (from make_inputs.py) OUT_DIR
set -u
in=$1; out=$2; mkdir -p "$out"
for rep in 1 2 3; do
  for len in 4k 8k; do
    echo "== rep $rep len $len $(date -u +%FT%TZ) load: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/runs.log"
    trimix-probe run --config "$in/config-L21.json" --prompt-file "$in/prompt-$len.txt" --compare-dense \
      --dtype float32 --max-new-tokens 8 --device cpu > "$out/run-$len-$rep.txt" 2> "$out/run-$len-$rep.err"
    grep -E "prefill|layers:" "$out/run-$len-$rep.txt" "$out/run-$len-$rep.err" >> "$out/runs.log"
  done
done
