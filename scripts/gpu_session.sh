#!/usr/bin/env bash
# The batched GPU session behind docs/accuracy.md, in calls on one warm device machine after the two
# GGUFs were staged into /tmp/stage (split-for-device parts + .sha256, one part per call):
#   bash scripts/gpu_session.sh setup         # assemble + check the models, install gguf and this package
#                                             # into /tmp/site, SmolLM2 probe at 4K, the dynamic config,
#                                             # then the SmolLM2 eval (4K, 8128)
#   bash scripts/gpu_session.sh qwen 8k,16k   # Qwen eval at these lengths (one call each, 600 s a call)
#   bash scripts/gpu_session.sh dynamic       # Qwen: dynamic + TriangleMix at 16K and 32704, beside dense
#                                             # and TriangleMix alone (trimix@L14, the probe's layer)
#   bash scripts/gpu_session.sh probe-spread  # Qwen: how the probe's layer moves with samples, tasks and
#                                             # length (4 probes at once on the GPU)
#   bash scripts/gpu_session.sh followup      # what 2026-11-27 left open: dynamic vs TriangleMix at 32K on
#                                             # 160 new prompts (seed 1) with L17 beside, and the all-task
#                                             # probe at 8K, and blockwise (gamma 0.9) and a vertical-slash
#                                             # budget under the dense fallback (1000/2048) beside; the GPU
#                                             # kernel tests; repeat the call if cut short (it resumes)
#   bash scripts/gpu_session.sh bench         # GPU kernel tests, bench kernel + bench dynamic (alone on the GPU)
#   bash scripts/gpu_session.sh recall        # Qwen at 32704: recall of the dynamic budgets of the 32K
#                                             # accuracy runs (and two larger ones) on the config's
#                                             # dynamic layers, 8 prompts (one per task)
#   SMALL=1 bash scripts/gpu_session.sh lastrows 32704 1  # Qwen at this length and seed: vertical-slash
#                                             # 1000/6096 (and with SMALL=1 1000/2048) with the last 128 rows
#                                             # dense (dense_last), beside dense and TriangleMix alone (L14);
#                                             # repeat if cut short (it resumes). 2026-11-27: SMALL=1 for
#                                             # "32704 1" and "16k 1", without for "32704 0"
# Each call leaves its results in $OUT as one tarball (the device returns at most 8 files).
set -uo pipefail
STAGE=/tmp/stage
W=/tmp/work
REPO=$(pwd)
OUT_DEV=${OUT:?run on the device: \$OUT is where results come back}
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site TOKENIZERS_PARALLELISM=false
export SMOL_GGUF=$STAGE/SmolLM2-135M-Instruct.Q4_1.gguf QWEN_GGUF=$STAGE/qwen2.5-coder-0.5b-instruct.gguf
export QWEN_CONFIG=$REPO/docs/figures/probe-qwen/config.json SMOL_CONFIG=$W/smol-probe-4k/config.json
export DYN_CONFIG=$W/qwen-dynamic.json OUT=$W/eval
mkdir -p "$W" "$OUT"
assemble() {  # name
  [[ -f $STAGE/$1 ]] || (cd "$STAGE" && cat "$1".part-* > "$1" && sha256sum -c "$1".sha256) || exit 3
}
install_all() {  # assemble what was staged, install gguf and this package into /tmp/site
  [[ -f $STAGE/qwen2.5-coder-0.5b-instruct.gguf.sha256 ]] && assemble qwen2.5-coder-0.5b-instruct.gguf
  [[ -f $STAGE/SmolLM2-135M-Instruct.Q4_1.gguf.sha256 ]] && assemble SmolLM2-135M-Instruct.Q4_1.gguf
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/gguf-*.whl
  python3 -m pip install -q --no-deps --no-build-isolation --upgrade --target /tmp/site . || exit 4
}
dynamic_config() {  # [out method budget...]: the probe's Qwen config with dynamic shallow layers;
  # default: vertical-slash with MInference's Llama budget (1000 vertical, 6096 slash) into $DYN_CONFIG
  python3 - "$QWEN_CONFIG" "${1:-$DYN_CONFIG}" "${2:-vertical_slash}" "${3:-1000}" "${4:-6096}" "${5:-0}" <<'PY'
import sys
from trimix_probe import DynamicSpec, TriMixConfig
src, dst, method, a, b = sys.argv[1:6]
c = TriMixConfig.load(src)
if method == "blockwise":
    spec, what = DynamicSpec(method="blockwise", gamma=float(a), block_size=128), f"blockwise shallow layers (gamma {a})"
else:
    last = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    spec = DynamicSpec(method="vertical_slash", vertical=int(a), slash=int(b), block_size=128, last_q=64,
                       dense_last=last)
    what = f"vertical-slash shallow layers ({a} vertical, {b} slash" + (f", last {last} rows dense)" if last else ")")
TriMixConfig.triangle_from(c.model, c.starting_layer, n_init=c.n_init, n_local=c.n_local, last_n=c.last_n,
    shallow="dynamic", dynamic=spec, provenance={"method": f"probe starting layer + {what}"}).save(dst)
PY
}
case "$1" in
setup)
  install_all
  cd "$W"
  python3 -m trimix_probe.cli.app analyze "$SMOL_GGUF" --out "$W/smol-probe-4k" --lengths 4k --samples 4 \
    --tasks niah_multikey,niah_multiquery,vt --objective answer --per-head > "$W/smol-probe-4k.log" 2>&1; echo "smol probe rc=$?"; tail -4 "$W/smol-probe-4k.log"
  dynamic_config
  timeout 420 bash "$REPO/scripts/gpu_eval.sh" smol; echo "smol eval rc=$?"
  tar czf "$OUT_DEV/setup.tgz" -C "$W" smol-probe-4k smol-probe-4k.log qwen-dynamic.json eval
  ;;
qwen)
  cd "$W"; QWEN_LENGTHS=$2 timeout 570 bash "$REPO/scripts/gpu_eval.sh" qwen; echo "qwen $2 rc=$?"
  tar czf "$OUT_DEV/qwen-${2//,/_}.tgz" -C "$W" eval
  ;;
dynamic)  # on a fresh machine: stage the Qwen parts first; this installs and builds the config itself
  [[ -d /tmp/site/trimix_probe ]] || install_all
  [[ -f $DYN_CONFIG ]] || dynamic_config
  cd "$W"; DYN_SWEEP=${DYN_SWEEP:-14} TRIMIX_DYNAMIC_DENSE_ABOVE=inf timeout 570 bash "$REPO/scripts/gpu_eval.sh" dynamic; echo "dynamic rc=$?"
  tar czf "$OUT_DEV/dynamic.tgz" -C "$W" eval
  ;;
followup)  # on a fresh machine: stage the Qwen parts first (carry .whl/gguf-*.whl)
  [[ -d /tmp/site/trimix_probe ]] || install_all
  [[ -f $DYN_CONFIG ]] || dynamic_config
  [[ -f $W/qwen-blockwise.json ]] || dynamic_config "$W/qwen-blockwise.json" blockwise 0.9
  [[ -f $W/qwen-vs-small.json ]] || dynamic_config "$W/qwen-vs-small.json" vertical_slash 1000 2048
  cd "$W"
  [[ -f probe-8k-all/config.json ]] || timeout 240 python3 -m trimix_probe.cli.app analyze "$QWEN_GGUF" \
    --out probe-8k-all --lengths 8k --tasks all --samples 3 --objective answer --per-head > probe-8k-all.log 2>&1 &
  PROCS=${PROCS:-4} BATCH_TOKENS=${BATCH_TOKENS:-160k} DYN_LENGTHS=32704 DYN_SWEEP=14,17 \
    EXTRA="--seed 1 --resume --compare blockwise=$W/qwen-blockwise.json --compare vs-small=$W/qwen-vs-small.json --against trimix@L14" AGAINST=trimix@L14 \
    TRIMIX_DYNAMIC_DENSE_ABOVE=inf timeout ${EVAL_LIMIT:-520} bash "$REPO/scripts/gpu_eval.sh" dynamic; echo "followup eval rc=$?"
  wait
  tr '\r' '\n' < probe-8k-all.log | grep -E "starting layer|rror" | tail -2; 
  tar czf "$OUT_DEV/followup.tgz" -C "$W" eval probe-8k-all probe-8k-all.log qwen-*.json
  ;;
bench)  # the GPU kernel tests, then kernel and dynamic timings (nothing else on the GPU)
  [[ -d /tmp/site/trimix_probe ]] || install_all
  cd "$W"  # not the repo root: there the source folder would shadow the installed package's kernel mapping
  timeout 200 python3 -m pytest -q -p no:cacheprovider "$REPO/tests/test_kernel.py" "$REPO/tests/test_dynamic.py" \
    > gpu-tests.txt 2>&1; echo "tests rc=$?"; tail -3 gpu-tests.txt
  timeout 150 python3 -m trimix_probe.cli.app bench kernel --out-dir bench > bench-kernel.log 2>&1; echo "kernel rc=$?"
  timeout 240 python3 -m trimix_probe.cli.app bench dynamic --seqs 32k,64k,128k --out-dir bench > bench-dynamic.log 2>&1
  echo "dynamic rc=$?"; tail -8 bench-dynamic.log
  tar czf "$OUT_DEV/bench.tgz" -C "$W" bench bench-kernel.log bench-dynamic.log gpu-tests.txt
  ;;
recall)  # on a fresh machine: stage the Qwen parts first (carry .whl/gguf-*.whl)
  [[ -d /tmp/site/trimix_probe ]] || install_all
  [[ -f $DYN_CONFIG ]] || dynamic_config
  cd "$W"
  timeout 500 python3 -m trimix_probe.cli.app recall "$QWEN_GGUF" --config "$DYN_CONFIG" --budget vs:1000/2048 \
    --budget vs:2000/8192 --budget vs:4000/6096 --budget bw:0.9 --budget bw:0.97 --lengths 32704 --tasks all \
    --samples 1 --dtype bfloat16 --out recall-qwen-32k > recall-qwen-32k.log 2>&1; echo "recall rc=$?"
  cat recall-qwen-32k/report.md | head -20
  tar czf "$OUT_DEV/recall.tgz" -C "$W" recall-qwen-32k recall-qwen-32k.log
  ;;
lastrows)  # LENGTH SEED; on a fresh machine: stage the Qwen parts first (carry .whl/gguf-*.whl)
  [[ -d /tmp/site/trimix_probe ]] || install_all
  [[ -f $W/qwen-vs-last128.json ]] || dynamic_config "$W/qwen-vs-last128.json" vertical_slash 1000 6096 128
  [[ -f $W/qwen-vs-small-last128.json ]] || dynamic_config "$W/qwen-vs-small-last128.json" vertical_slash 1000 2048 128
  cd "$W"; L=${2:?length}; S=${3:?seed}
  OUT=$W/eval-lastrows-s$S PROCS=${PROCS:-4} BATCH_TOKENS=${BATCH_TOKENS:-160k} DYN_LENGTHS=$L DYN_SWEEP=14 \
    DYN_CONFIG=$W/qwen-vs-last128.json AGAINST=trimix@L14 \
    EXTRA="--seed $S --resume ${SMALL:+--compare vs-small-last128=$W/qwen-vs-small-last128.json} --against trimix@L14" \
    TRIMIX_DYNAMIC_DENSE_ABOVE=inf timeout ${EVAL_LIMIT:-540} bash "$REPO/scripts/gpu_eval.sh" dynamic
  echo "lastrows $L seed $S rc=$?"
  tar czf "$OUT_DEV/lastrows.tgz" -C "$W" $(ls -d eval-lastrows-s* qwen-*.json)
  ;;
probe-spread)  # on a fresh machine: stage the Qwen parts first
  [[ -d /tmp/site/trimix_probe ]] || install_all
  cd "$W"; P="python3 -m trimix_probe.cli.app analyze $QWEN_GGUF --objective answer --per-head"
  R=niah_multikey,niah_multiquery,vt  # the three retrieval tasks (the default before 2026-11-27)
  timeout 280 $P --out spread-16k-s8-seed1 --lengths 16k --tasks $R --samples 8 --seed 1 > spread-16k-s8-seed1.log 2>&1 &
  timeout 280 $P --out spread-16k-all-s3 --lengths 16k --tasks all --samples 3 > spread-16k-all-s3.log 2>&1 &
  timeout 280 $P --out spread-32k-s4 --lengths 32704 --tasks $R --samples 4 > spread-32k-s4.log 2>&1 &
  timeout 280 $P --out spread-8k-s8 --lengths 8k --tasks $R --samples 8 > spread-8k-s8.log 2>&1 &
  wait
  for f in spread-*.log; do echo "== $f"; tr '\r' '\n' < "$f" | grep -E "starting layer|error|Error" | tail -2; done
  tar czf "$OUT_DEV/probe-spread.tgz" -C "$W" $(ls -d spread-*)
  ;;
esac
