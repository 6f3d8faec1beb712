#!/usr/bin/env bash
# The second GPU session of 2026-11-30 (issues 14 and 15), on a warm nvidia-h200-x2, in calls back to
# back. Each staging call carries one part of a GGUF (../shared/tools/split-for-device; the first part
# of each model also its .sha256); the long work runs in the background (setsid) on both GPUs while
# the staging calls go on, and `wait` calls keep the machine warm and bring the results back:
#   bash scripts/gpu_verify.sh stage NAME NN    # copy part NN of NAME to /tmp/stage; install once;
#                                               # the first call also starts the jobs below
#   bash scripts/gpu_verify.sh wait SECONDS     # sleep (the machine stays held), then return the results
#   JOBS=next bash scripts/gpu_verify.sh stage NAME NN   # the next session's jobs instead (below)
# Jobs (logs and results in /tmp/work/res, returned as one tarball by every call):
#   both GPUs: the gpu-marked tests (two-GPU ones included); bench probe, Llama-3.1-70B architecture,
#              --device-map auto, 32K, 2 samples
#   GPU 0:     bench probe, Llama-3.1-8B architecture, 128K and 64K, 2 samples (checkpoints in host memory);
#              verification curves (analyze --verify-layers) of SmolLM2 at 2K, 4K, 8128; Qwen + YaRN x4 at
#              65472; eval at 65472 (20 samples a task, half the tasks)
#   GPU 1:     verification curves of Qwen at 8192, 16384, 32704; time to first token at 32K/64K/128K
#              (batch 1, dense vs the 64K probe config vs dynamic); eval at 65472 (the other half)
# JOBS=done (the third session of 2026-11-30, as run: issue 14's 20-sample evals, with eval's shared prefix):
#   GPU 0:     the gpu tests while the model stages; then the default analyze of Qwen + YaRN x4 at 65472
#              and at 130944 (the probe's verified configs); then the eval queue
#   GPU 1:     bench probe 8B at 128K (offload with pinned gradients: the time target); then the queue
#   queue:     eval jobs claimed one at a time by whichever GPU is free (mkdir claims): 65472 in two
#              halves of the tasks, then 130944 in four pairs; 20 samples a task, batch 1 (unpadded:
#              SDPA's causal kernel), --resume, the sweep sharing dense's prefix; each waits for its
#              length's analyze config (else the 64K config of the first session)
# JOBS=more (the fourth session's last minutes): 20 more samples (seed 1) of the six 64K verdict tasks,
#   dense vs the 64K config (L19) vs trimix@L22, half the tasks on each GPU
# JOBS=next (what the third session left; results in docs/raw/eval-qwen-yarn-20-2026-11-30c):
#   GPU 0:     the queue's last job, e128d (niah_multiquery done, fwe at 2 of 20), resumed with the
#              128K config of the third session
#   GPU 1:     the default analyze at 32704 (+ YaRN); then time to first token in one process at
#              32704 / 65472 / 130944: dense, each length's probe config, dynamic, --no-share-prefix,
#              4 prompts a length (the first pays Triton's compile)
#   both:      when both are done: bench probe, Llama-3.1-70B architecture, --device-map auto, 128K,
#              1 sample
set -uo pipefail
STAGE=/tmp/stage
W=/tmp/work
RES=$W/res
REPO=$(pwd)
OUT_DEV=${OUT:?run on the device: \$OUT is where results come back}
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site TOKENIZERS_PARALLELISM=false
QWEN=qwen2.5-coder-0.5b-instruct.gguf
SMOL=SmolLM2-135M-Instruct.Q4_1.gguf
ROPE=yarn:4:32768
CFG=$REPO/docs/raw/eval-qwen-yarn-configs
mkdir -p "$W" "$STAGE" "$RES"

install() {  # this tree (and gguf) into /tmp/site, once per machine
  [[ -f /tmp/site/.done ]] && return
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/gguf-*.whl || exit 4
  python3 -m pip install -q --no-deps --no-build-isolation --upgrade --target /tmp/site . || exit 4
  cp -r "$REPO/docs/raw/eval-qwen-yarn-configs" "$W/configs"
  touch /tmp/site/.done
}

assemble() {  # NAME PARTS: once every part is here, join them and check the sum; touch NAME.ready
  local name=$1 parts=$2
  [[ -f $STAGE/$name.ready ]] && return
  [[ $(ls "$STAGE/$name".part-* 2>/dev/null | wc -l) -eq $parts ]] || return
  (cd "$STAGE" && cat "$name".part-* > "$name" && sha256sum -c "$name.sha256" && rm "$name".part-* && touch "$name.ready")
}

waitfor() { while [[ ! -f $STAGE/$1.ready ]]; do sleep 5; done; }

TP="python3 -m trimix_probe.cli.app"

job_both() {
  cd "$W"
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
    git -C "$REPO" log --oneline -1 2>/dev/null; date -u; free -g | head -2; } > "$RES/env.txt" 2>&1
  timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu "$REPO"/tests/ > "$RES/gpu-tests.txt" 2>&1
  echo "tests rc=$?" >> "$RES/gpu-tests.txt"
  timeout 420 $TP bench probe --arch llama-3.1-70b --device-map auto --seq 32768 --samples 2 \
    --out "$RES/bench-probe-70b-32k.json" > "$RES/bench-probe-70b-32k.log" 2>&1
  echo "70b rc=$?" >> "$RES/bench-probe-70b-32k.log"
  touch "$RES/both.done"
  CUDA_VISIBLE_DEVICES=0 setsid bash "$REPO/scripts/gpu_verify.sh" job gpu0 > "$RES/gpu0.log" 2>&1 < /dev/null &
  CUDA_VISIBLE_DEVICES=1 setsid bash "$REPO/scripts/gpu_verify.sh" job gpu1 > "$RES/gpu1.log" 2>&1 < /dev/null &
}

curve() {  # MODEL NAME LENGTH SAMPLES LAYERS [extra analyze options]
  local model=$1 name=$2 len=$3 n=$4 layers=$5; shift 5
  timeout 420 $TP analyze "$STAGE/$model" --out "$RES/$name" --lengths "$len" --samples "$n" \
    --verify-layers "$layers" "$@" > "$RES/$name.log" 2>&1
  echo "$name rc=$?"
}

eval64() {  # PART TASKS
  timeout ${LIMIT:-900} $TP eval --model "$STAGE/$QWEN" --config "$W/configs/config.json" --lengths 65472 --tasks "$2" \
    --samples 20 --baselines triangle-all --sweep 10,12,14,18,22 --compare "dynamic=$W/configs/dynamic.json" \
    --batch-size 4 --rope-scaling $ROPE --out "$RES/eval-64k-$1" --resume > "$RES/eval-64k-$1.log" 2>&1
  echo "eval $1 rc=$?"
}

evaljob() {  # NAME LENGTH TASKS SWEEP: one eval of the queue, resumable
  local name=$1 len=$2 tasks=$3 sweep=$4 cfg="$RES/qwen-$2-default/config.json" waited=0
  while [[ ! -f $cfg && $waited -lt 420 ]]; do sleep 10; waited=$((waited + 10)); done
  [[ -f $cfg ]] || cfg="$W/configs/config.json"
  echo "$name: config $cfg" > "$RES/$name.log"
  timeout ${LIMIT:-1700} $TP eval --model "$STAGE/$QWEN" --config "$cfg" --lengths $len --tasks "$tasks" \
    --samples 20 --baselines triangle-all --sweep "$sweep" --compare "dynamic=$W/configs/dynamic.json" \
    --batch-size 1 --rope-scaling $ROPE --out "$RES/$name" --resume >> "$RES/$name.log" 2>&1
  echo "$name rc=$?" >> "$RES/$name.log"
}

queue() {  # claim and run the eval jobs one by one until none is left
  local job
  mkdir -p "$W/claims"
  for job in "e64a 65472 niah_single_noise,niah_single_prose,niah_multikey,niah_multiquery 12,14,16,18,20,22" \
             "e64b 65472 niah_multivalue,vt,cwe,fwe 12,14,16,18,20,22" \
             "e128a 130944 niah_single_noise,niah_multivalue 12,16,18,20,22" \
             "e128b 130944 niah_multikey,vt 12,16,18,20,22" \
             "e128c 130944 niah_single_prose,cwe 12,16,18,20,22" \
             "e128d 130944 niah_multiquery,fwe 12,16,18,20,22"; do
    set -- $job
    mkdir "$W/claims/$1" 2>/dev/null || continue
    evaljob "$@"
  done
}

case ${1:?usage} in
stage)
  name=${2:?name}; part=${3:?part}
  cp ".stage/$name.part-$part" "$STAGE/" && echo "staged $name part $part"
  [[ -f .stage/$name.sha256 ]] && cp ".stage/$name.sha256" "$STAGE/"
  install
  assemble "$SMOL" 2; assemble "$QWEN" 10  # 48 MiB parts (split -b 48M): the tracked tree is 9 MB, a call carries 64 MiB
  ls "$STAGE"
  if [[ ! -f $W/started ]]; then
    touch "$W/started"
    if [[ ${JOBS:-} == more ]]; then
      CUDA_VISIBLE_DEVICES=0 setsid bash "$REPO/scripts/gpu_verify.sh" job more0 > "$RES/gpu0.log" 2>&1 < /dev/null &
      CUDA_VISIBLE_DEVICES=1 setsid bash "$REPO/scripts/gpu_verify.sh" job more1 > "$RES/gpu1.log" 2>&1 < /dev/null &
    elif [[ ${JOBS:-} == next ]]; then
      P="$REPO/docs/raw/eval-qwen-yarn-20-2026-11-30c"   # the third session's cut-short job and configs
      mkdir -p "$RES/e128d" && cp "$P/e128d/results.csv" "$RES/e128d/"
      for len in 65472 130944; do mkdir -p "$RES/qwen-$len-default" && cp "$P/qwen-$len-default/config.json" "$RES/qwen-$len-default/"; done
      CUDA_VISIBLE_DEVICES=0 setsid bash "$REPO/scripts/gpu_verify.sh" job next0 > "$RES/gpu0.log" 2>&1 < /dev/null &
      CUDA_VISIBLE_DEVICES=1 setsid bash "$REPO/scripts/gpu_verify.sh" job next1 > "$RES/gpu1.log" 2>&1 < /dev/null &
    else
      setsid bash "$REPO/scripts/gpu_verify.sh" job both > "$RES/both.log" 2>&1 < /dev/null &
    fi
    echo "jobs started"
  fi
  nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
  tail -n 3 "$RES"/*.log 2>/dev/null | tail -n 30
  (cd "$W" && tar czf "$OUT_DEV/res.tgz" res) ;;
wait)
  sleep "${2:-300}"
  nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
  for f in "$RES"/*.log; do echo "== $f"; tail -n 4 "$f"; done
  (cd "$W" && tar czf "$OUT_DEV/res.tgz" --exclude='*.png' res) ;;
job)
  install
  case $2 in
  both) job_both ;;
  gpu0)
    cd "$W"
    for seq in 131072 65536; do
      timeout 400 $TP bench probe --seq $seq --samples 2 --out "$RES/bench-probe-8b-$seq.json" > "$RES/bench-probe-8b-$seq.log" 2>&1
      echo "8b $seq rc=$?"
    done
    waitfor "$SMOL"
    curve "$SMOL" smol-2k 2048 3 all
    curve "$SMOL" smol-4k 4096 3 all
    curve "$SMOL" smol-8128 8128 3 all
    waitfor "$QWEN"
    curve "$QWEN" qwen-64k 65472 2 8-22 --rope-scaling $ROPE
    eval64 A niah_single_noise,niah_single_prose,niah_multikey,niah_multiquery ;;
  gpu1)
    cd "$W"
    waitfor "$QWEN"
    curve "$QWEN" qwen-8k 8192 2 all
    curve "$QWEN" qwen-16k 16384 2 all
    curve "$QWEN" qwen-32k 32704 2 all
    timeout 300 $TP eval --model "$STAGE/$QWEN" --config "$W/configs/config.json" --lengths 32704,65472,130944 \
      --tasks niah_single_noise,vt --samples 1 --compare "dynamic=$W/configs/dynamic.json" --batch-size 1 \
      --rope-scaling $ROPE --out "$RES/ttft" > "$RES/ttft.log" 2>&1
    echo "ttft rc=$?"
    eval64 B niah_multivalue,vt,cwe,fwe ;;
  done0)
    cd "$W"
    timeout 280 python3 -m pytest -q -p no:cacheprovider -m gpu "$REPO"/tests/test_probe.py "$REPO"/tests/test_verify.py \
      "$REPO"/tests/test_families.py "$REPO"/tests/test_eval.py > "$RES/gpu-tests-next.txt" 2>&1
    echo "tests rc=$?" >> "$RES/gpu-tests-next.txt"
    waitfor "$QWEN"
    for len in 65472 130944; do
      timeout 600 $TP analyze "$STAGE/$QWEN" --out "$RES/qwen-$len-default" --lengths $len --rope-scaling $ROPE \
        > "$RES/qwen-$len-default.log" 2>&1
      echo "analyze $len rc=$?" >> "$RES/qwen-$len-default.log"
    done
    queue ;;
  done1)
    cd "$W"
    timeout 400 $TP bench probe --seq 131072 --samples 2 --out "$RES/bench-probe-8b-131072.json" > "$RES/bench-probe-8b-131072.log" 2>&1
    echo "8b rc=$?" >> "$RES/bench-probe-8b-131072.log"
    waitfor "$QWEN"
    queue ;;
  more0|more1)   # 20 more samples (seed 1) of the 64K verdict tasks: dense, the 64K config, L22
    cd "$W"
    waitfor "$QWEN"
    half=niah_single_noise,niah_single_prose,niah_multiquery
    [[ $2 == more1 ]] && half=niah_multivalue,vt,fwe
    timeout 560 $TP eval --model "$STAGE/$QWEN" --config "$REPO/docs/raw/eval-qwen-yarn-20-2026-11-30c/qwen-65472-default/config.json" \
      --lengths 65472 --tasks $half --samples 20 --seed 1 --sweep 22 --batch-size 1 --rope-scaling $ROPE \
      --out "$RES/e64s1-$2" --resume > "$RES/e64s1-$2.log" 2>&1
    echo "e64s1 $2 rc=$?" >> "$RES/e64s1-$2.log" ;;
  next0)
    cd "$W"
    waitfor "$QWEN"
    evaljob e128d 130944 niah_multiquery,fwe 12,16,18,20,22
    touch "$RES/next0.done"
    while [[ ! -f $RES/next1.done ]]; do sleep 5; done
    CUDA_VISIBLE_DEVICES=0,1 timeout 900 $TP bench probe --arch llama-3.1-70b --device-map auto --seq 131072 \
      --samples 1 --out "$RES/bench-probe-70b-128k.json" > "$RES/bench-probe-70b-128k.log" 2>&1
    echo "70b rc=$?" >> "$RES/bench-probe-70b-128k.log" ;;
  next1)
    cd "$W"
    waitfor "$QWEN"
    timeout 400 $TP analyze "$STAGE/$QWEN" --out "$RES/qwen-32704-default" --lengths 32704 --rope-scaling $ROPE \
      > "$RES/qwen-32704-default.log" 2>&1
    timeout 600 $TP eval --model "$STAGE/$QWEN" --config "$RES/qwen-130944-default/config.json" \
      --compare "c64=$RES/qwen-65472-default/config.json" --compare "c32=$RES/qwen-32704-default/config.json" \
      --compare "dynamic=$W/configs/dynamic.json" --lengths 32704,65472,130944 --tasks niah_single_noise \
      --samples 4 --batch-size 1 --no-share-prefix --rope-scaling $ROPE --out "$RES/ttft" > "$RES/ttft.log" 2>&1
    echo "ttft rc=$?" >> "$RES/ttft.log"
    touch "$RES/next1.done" ;;
  esac ;;
esac
