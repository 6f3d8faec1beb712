#!/usr/bin/env bash
# The lead's batched GPU session for the real-model runs (issues 3, 4, 5), in two calls on one warm machine
# after the Qwen GGUF was staged into /tmp/stage (see DEVELOPERS notes in docs/accuracy.md):
#   bash scripts/gpu_session.sh probe   # assemble + install, Qwen probe at 16K, probe cost benchmark
#   bash scripts/gpu_session.sh eval    # Qwen eval: dense / probe config / baselines at 8K-32K, sweep at 16K,
#                                       # dynamic + TriangleMix at 16K and 32K
# Everything goes under $OUT as one tarball per call (the device returns at most 8 files).
set -uo pipefail
STAGE=/tmp/stage
QWEN=$STAGE/qwen2.5-coder-0.5b-instruct.gguf
W=/tmp/work
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site
mkdir -p "$W"
case "$1" in
probe)
  [[ -f $QWEN ]] || (cd "$STAGE" && cat qwen2.5-coder-0.5b-instruct.gguf.part-* > "$QWEN" && sha256sum -c qwen2.5-coder-0.5b-instruct.gguf.sha256) || exit 3
  rm -rf /tmp/site/typer* /tmp/site/click* /tmp/site/rich* /tmp/site/typing_ext* /tmp/site/pandas* /tmp/site/seaborn* /tmp/site/pygments* /tmp/site/markdown_it* /tmp/site/shellingham* /tmp/site/annotated_doc* /tmp/site/dateutil* /tmp/site/python_dateutil* /tmp/site/tzdata* /tmp/site/mdurl*
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/gguf-*.whl
  python3 -m pip install -q --no-deps --no-build-isolation --upgrade --target /tmp/site . || exit 4
  { date -u +%FT%TZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
    python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'; } > "$W/env.txt" 2>&1
  cat "$W/env.txt"
  cd "$W"; T="python3 -m trimix_probe.cli.app"
  /usr/bin/env time -v true >/dev/null 2>&1 && TIME="/usr/bin/env time -v" || TIME=""
  timeout 300 $T analyze "$QWEN" --out "$W/qwen-probe-16k" --lengths 16k --samples 2 --objective answer --per-head \
    > "$W/qwen-probe-16k.log" 2>&1; echo "analyze rc=$?"
  tail -5 "$W/qwen-probe-16k.log"
  timeout 240 $T bench probe --seq 16384 --samples 8 --out "$W/bench-probe.json" > "$W/bench-probe.log" 2>&1
  echo "bench probe rc=$?"; tail -15 "$W/bench-probe.log"
  tar czf "$OUT/probe.tgz" -C "$W" .
  ;;
eval)
  cd "$W"; T="python3 -m trimix_probe.cli.app"
  CFG=$W/qwen-probe-16k/config.json
  [[ -f $CFG ]] || { echo "no probe config"; exit 5; }
  start=$(python3 -c "import json;print(json.load(open('$CFG'))['starting_layer'])")
  cd "$W"; python3 - "$CFG" "$W/dyn.json" <<'PY'
import sys
from trimix_probe import TriMixConfig, DynamicSpec
c = TriMixConfig.load(sys.argv[1])
TriMixConfig.triangle_from(c.model, c.starting_layer, n_init=c.n_init, n_local=c.n_local, last_n=c.last_n,
    shallow="dynamic", dynamic=DynamicSpec(method="vertical_slash", vertical=1000, slash=6096, block_size=128, last_q=64),
    provenance={"method": "probe layer + vertical-slash shallow"}).save(sys.argv[2])
PY
  echo "probe starting layer: $start"
  E="$T eval --model $QWEN --tasks all --samples 20 --batch-size 20 --dtype bfloat16"
  timeout 250 $E --config "$CFG" --lengths 8k,16k,32k --baselines streaming,triangle-all --out "$W/qwen-eval-main" \
    > "$W/qwen-eval-main.log" 2>&1; echo "main rc=$?"
  timeout 150 $E --lengths 16k --sweep 4,8,12,16,20 --out "$W/qwen-eval-sweep" > "$W/qwen-eval-sweep.log" 2>&1
  echo "sweep rc=$?"
  TRIMIX_DYNAMIC_DENSE_ABOVE=inf timeout 120 $E --config "$W/dyn.json" --lengths 16k,32k --out "$W/qwen-eval-dynamic" \
    > "$W/qwen-eval-dynamic.log" 2>&1; echo "dynamic rc=$?"
  for f in "$W"/qwen-eval-*/summary.md; do echo "== $f"; cat "$f"; done
  tar czf "$OUT/eval.tgz" -C "$W" qwen-eval-main qwen-eval-sweep qwen-eval-dynamic dyn.json qwen-eval-main.log qwen-eval-sweep.log qwen-eval-dynamic.log
  ;;
esac
