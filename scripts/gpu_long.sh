#!/usr/bin/env bash
# The GPU session of 2026-11-30 (issues 11, 12, 14, 15), on one warm H200, one call per step, each call
# also carrying one part of the staged Qwen GGUF (../shared/tools/split-for-device; the first call the
# .sha256 too), so staging costs no call of its own:
#   bash scripts/gpu_long.sh stage NN tests     # copy part NN to /tmp/stage; install; the gpu-marked tests
#   bash scripts/gpu_long.sh stage NN kernel    # bench kernel: this tree beside .old (the tree before the pass)
#   bash scripts/gpu_long.sh stage NN probe SEQ # bench probe, Llama-3.1-8B architecture, 2 samples at SEQ
#   bash scripts/gpu_long.sh stage NN           # copy only
#   bash scripts/gpu_long.sh qwen-probe         # assemble; analyze Qwen + YaRN x4 at 64K (8 tasks x 1);
#                                               # the dynamic + TriangleMix config from its layer
#   bash scripts/gpu_long.sh qwen-eval LEN N    # eval at LEN, N samples a task: dense, the probe's config,
#                                               # triangle-all, sweep $SWEEP, dynamic (--compare), batch 1
#                                               # (so prefill_s is one prompt's time to first token); resumes
# Results come back as one tarball per call in $OUT.
set -uo pipefail
STAGE=/tmp/stage
W=/tmp/work
REPO=$(pwd)
OUT_DEV=${OUT:?run on the device: \$OUT is where results come back}
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site TOKENIZERS_PARALLELISM=false
QWEN=qwen2.5-coder-0.5b-instruct.gguf
ROPE=yarn:4:32768
SWEEP=${SWEEP:-12,16,20}
mkdir -p "$W" "$STAGE"
TP=(python3 -m trimix_probe.cli.app)

install() {  # this tree (and gguf) into /tmp/site, once per machine
  [[ -f /tmp/site/.done-$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo x) ]] && return
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/gguf-*.whl || exit 4
  python3 -m pip install -q --no-deps --no-build-isolation --upgrade --target /tmp/site . || exit 4
  touch /tmp/site/.done-$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo x)
}

case ${1:?usage} in
stage)
  part=${2:?part}; shift 2
  cp .stage/$QWEN.part-$part "$STAGE/" && echo "staged part $part"
  [[ -f .stage/$QWEN.sha256 ]] && cp .stage/$QWEN.sha256 "$STAGE/"
  ls "$STAGE" | wc -l
  install
  cd "$W"
  case ${1:-} in
  tests)
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
      python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
      git -C "$REPO" log --oneline -1 2>/dev/null; date -u; } > env.txt 2>&1
    cat env.txt
    timeout 420 python3 -m pytest -q -p no:cacheprovider -m gpu "$REPO"/tests/ 2>&1 | tee gpu-tests.txt | tail -15
    tar czf "$OUT_DEV/tests.tgz" env.txt gpu-tests.txt ;;
  kernel)
    python3 -m pip install -q --no-deps --no-build-isolation --upgrade --target /tmp/old "$REPO/.old" || exit 4
    for seqs in 32k,64k,128k; do
      PYTHONPATH=/tmp/old timeout 200 python3 -m trimix_probe.cli.app bench kernel --seqs $seqs --out-dir old > old.log 2>&1
      echo "old rc=$?"; tail -6 old.log
      timeout 200 "${TP[@]}" bench kernel --seqs $seqs --out-dir new > new.log 2>&1; echo "new rc=$?"; tail -6 new.log
    done
    tar czf "$OUT_DEV/kernel.tgz" old new old.log new.log ;;
  probe)
    seq=${2:?seq}
    timeout 500 "${TP[@]}" bench probe --seq "$seq" --samples 2 --out "probe-$seq.json" 2>&1 | tail -25
    cp "probe-$seq.json" "$OUT_DEV/" ;;
  esac ;;
qwen-probe)
  install
  (cd "$STAGE" && { [[ -f $QWEN ]] || { cat $QWEN.part-* > $QWEN && sha256sum -c $QWEN.sha256; }; }) || exit 3
  cd "$W"
  timeout 400 "${TP[@]}" analyze "$STAGE/$QWEN" --out qwen-64k --lengths 65472 --samples 1 --rope-scaling $ROPE \
    > qwen-probe.log 2>&1; echo "probe rc=$?"; tail -5 qwen-probe.log
  python3 - qwen-64k/config.json qwen-dynamic.json <<'PY'
import sys
from trimix_probe import DynamicSpec, TriMixConfig
c = TriMixConfig.load(sys.argv[1])
spec = DynamicSpec(method="vertical_slash", vertical=1000, slash=6096, block_size=128, last_q=64, dense_last=128)
TriMixConfig.triangle_from(c.model, c.starting_layer, n_init=c.n_init, n_local=c.n_local, last_n=c.last_n,
                           shallow="dynamic", dynamic=spec,
                           provenance={"method": "manual", "reason": f"the probe's layer {c.starting_layer} "
                                       "with vertical-slash 1000/6096 shallow layers, last 128 rows dense",
                                       "rope": c.provenance.get("rope")}).save(sys.argv[2])
print("dynamic config from layer", c.starting_layer)
PY
  tar czf "$OUT_DEV/qwen-probe.tgz" qwen-64k qwen-dynamic.json qwen-probe.log ;;
qwen-eval)
  len=${2:?length}; n=${3:?samples}
  install
  cd "$W"
  timeout ${LIMIT:-560} "${TP[@]}" eval --model "$STAGE/$QWEN" --config qwen-64k/config.json --lengths "$len" \
    --tasks "${TASKS:-all}" --samples "$n" --baselines triangle-all --sweep "$SWEEP" --compare dynamic=qwen-dynamic.json \
    --against config \
    --batch-size 1 --rope-scaling $ROPE --out "eval-$len" --resume > "eval-$len.log" 2>&1
  echo "eval rc=$?"; tail -30 "eval-$len.log"
  tar czf "$OUT_DEV/eval-$len.tgz" "eval-$len" "eval-$len.log" ;;
esac
