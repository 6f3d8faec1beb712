#!/usr/bin/env bash
# The GPU sessions of 2026-12-04 (issues 23 and 24), on a warm nvidia-h200, in calls back to back.
# Each staging call carries one part of a GGUF (../shared/tools/split-for-device FILE 50: the tracked
# tree is 11 MB, a call carries 64 MiB; the first part of each model also its .sha256); the work runs
# in the background (setsid) while the staging calls go on; `wait` calls keep the machine warm and
# bring the results back (one tarball, $OUT/res.tgz, by every call):
#   JOBS=diag bash scripts/gpu_faithful.sh stage NAME NN   # copy part NN of NAME to /tmp/stage; the
#                                                          # first call installs and starts JOBS
#   bash scripts/gpu_faithful.sh wait SECONDS              # sleep (the machine stays held), then results
# Keep the calls back to back and alone in their batch: the machine goes back 30 s after a call
# ends, and a local command batched beside a `wait` call can hold the next call past that (the
# second session lost its first lease's unsent results that way).
# JOBS=diag: why dense missed the single noise needle (scripts/diagnose_niah.py: four layouts, dense);
#   the faithful tasks at 128K and 64K: dense vs the triangle-only configs vs the old dynamic config
#   (the independent run's loss, reproduced); scripts/diagnose_dynamic.py (recall at the needle's rows)
# JOBS=main: the gpu tests; analyze --shallow dynamic (the probe's budgets, the whole plan verified)
#   at 65472 and 130944; eval of dense vs the emitted configs vs triangle-only, faithful tasks
# JOBS=s3: the dense misses by template x dtype; the 128K plan on 40 samples of two tasks with the
#   old budget beside it; the 64K analyze --shallow dynamic and its eval (see job_s3)
# JOBS=s4: the same evals resumed from docs/raw/faithful-2026-12-04b/lease1, the gpu tests, and
#   analyze at 128K with --recall-target 0.8 (see job_s4)
# JOBS=s5 (not run): the queue the 2026-12-04 sessions left (see job_s5)
# JOBS=s6: 2026-12-07: bench dynamic with the fused estimate and the probe's 128K plan laid onto the 8B
#   architecture (alone on the GPU while the model is staged); then the gpu tests beside the evals: the
#   old 1000/6096 budget on the faithful single needle at 128K (issue 24 part 1), and dense vs the
#   emitted plans on the six tasks not yet run at 128K and 64K (10 samples a task)
# JOBS=s7: 2026-12-07, second session (see job_s7; the sweep needs ./sweep: kernel_sweep.py and oldk/,
#   docs/raw/kernel_sweep.py says how); raw in docs/raw/h100-2026-12-07b
# JOBS=s8: 2026-12-07, third session: the queue s7 left (see job_s8; ran in the fourth: h100-2026-12-07d)
# JOBS=s9: 2026-12-07, fourth session: what s8 left (see job_s9)
# JOBS=s11: 2026-12-08, fifth session: s9's steps for a short lease, the gpu tests and evals first, the timed
#   steps after (see job_s11; ran in docs/raw/h100-2026-12-08)
# JOBS=s12: what s11 left (see job_s12)
set -uo pipefail
STAGE=/tmp/stage
W=/tmp/work
RES=$W/res
REPO=$(pwd)
OUT_DEV=${OUT:?run on the device: \$OUT is where results come back}
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site TOKENIZERS_PARALLELISM=false
QWEN=qwen2.5-coder-0.5b-instruct.gguf
SMOL=SmolLM2-135M-Instruct.Q4_1.gguf
QWEN_PARTS=10
SMOL_PARTS=2
ROPE=yarn:4:32768
OLD=$REPO/docs/raw/eval-qwen-yarn-20-2026-11-30c        # the old verified triangle-only configs
DYN_OLD=$REPO/docs/raw/long-context-2026-12-01/ttft/configs/dynamic.json
SRC=$W/src   # the first call's scripts, tests and configs (install)
C=$SRC/configs
mkdir -p "$W" "$STAGE" "$RES"

install() {  # this tree (and gguf) into /tmp/site, its scripts and configs into $W/src, once per machine:
  # the later calls ship the tree again, but the jobs keep running the first call's copy
  [[ -f /tmp/site/.done ]] && return
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/gguf-*.whl || exit 4
  rm -rf "$W/build" && mkdir -p "$W/build" && cp -r trimix_probe kernels cli pyproject.toml README.md "$W/build/"
  [[ -d .snap ]] && cp -r .snap/. "$W/build/" && echo "overlaid .snap: $(cd .snap && find . -type f | tr '\n' ' ')"
  python3 -m pip install -q --no-deps --no-build-isolation --upgrade --target /tmp/site "$W/build" || exit 4
  mkdir -p "$W/src/tests" && cp -r scripts "$W/src/" && cp -r tests/*.py "$W/src/tests/" && cp pyproject.toml "$W/src/"
  mkdir -p "$W/src/configs" && cp "$OLD/qwen-130944-default/config.json" "$W/src/configs/c128.json" \
    && cp "$OLD/qwen-65472-default/config.json" "$W/src/configs/c64.json" && cp "$DYN_OLD" "$W/src/configs/dynamic-old.json"
  local f=docs/raw/faithful-2026-12-04   # the first session's emitted 128K plan, its triangle-only twin, its eval
  cp "$f/tri-130944.json" "$W/src/configs/tri128.json" && cp "$f/qwen-130944-dyn/config.json" "$W/src/configs/dyn128.json" \
    && cp "$f/e128-merged/results.csv" "$W/src/configs/e128-results.csv"
  [[ -d docs/raw/faithful-2026-12-04b/lease1 ]] && cp -r docs/raw/faithful-2026-12-04b/lease1 "$W/src/lease1"
  cp docs/raw/faithful-2026-12-04b/smollm2-4k-cpu/config.json "$W/src/configs/smol4k.json"
  [[ -d sweep ]] && cp -r sweep "$W/src/"
  cp -r docs/raw/h100-2026-12-07b "$W/src/h100b"   # s7's 32K plan and 128K rows (s8)   # the kernel sweep and the kernels before the change (oldk/)
  touch /tmp/site/.done
}

assemble() {  # NAME PARTS: once every part is here, join them and check the sum; touch NAME.ready
  local name=$1 parts=$2
  [[ -f $STAGE/$name.ready ]] && return
  [[ $(ls "$STAGE/$name".part-* 2>/dev/null | wc -l) -eq $parts ]] || return
  (cd "$STAGE" && cat "$name".part-* > "$name" && sha256sum -c "$name.sha256" && rm "$name".part-* && touch "$name.ready")
}

apply_patch() {  # FILE PATCH: a patch of kernels/<name>.py applied to FILE (patch, else git apply)
  if command -v patch > /dev/null; then patch -s "$1" "$2"; return; fi
  local d; d=$(mktemp -d) && mkdir -p "$d/kernels" && cp "$1" "$d/kernels/$(basename "$1")" \
    && (cd "$d" && git apply "$2") && cp "$d/kernels/$(basename "$1")" "$1"
}

waitfor() { while [[ ! -f $STAGE/$1.ready ]]; do sleep 3; done; }

TP="python3 -m trimix_probe.cli.app"

env_txt() {
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
    git -C "$REPO" log --oneline -1 2>/dev/null; date -u; } > "$RES/env.txt" 2>&1
}

evalrun() {  # NAME LIMIT ARGS...: one resumable eval of Qwen + YaRN
  local name=$1 limit=$2; shift 2
  timeout "$limit" $TP eval --model "$STAGE/$QWEN" --rope-scaling $ROPE --batch-size 1 --out "$RES/$name" --resume \
    "$@" > "$RES/$name.log" 2>&1
  echo "$name rc=$?" >> "$RES/$name.log"
}

gpu_tests() {  # LIMIT [FILES]: the gpu-marked tests of the first call's copy (FILES: a -k expression), results
  # in gpu-tests.txt
  timeout "$1" python3 -m pytest -q -p no:cacheprovider -m gpu --rootdir "$SRC" "$SRC/tests/" -k "not multi_gpu and (${2:-test})" \
    > "$RES/gpu-tests.txt" 2>&1
  echo "tests rc=$?" >> "$RES/gpu-tests.txt"
}

job_diag() {
  cd "$W"
  env_txt
  waitfor "$QWEN"
  timeout 150 python3 "$SRC/scripts/diagnose_niah.py" --model "$STAGE/$QWEN" --rope-scaling $ROPE \
    --lengths 130944 --samples 6 --out "$RES/diagnose-niah.csv" > "$RES/diagnose-niah.log" 2>&1
  echo "diagnose-niah rc=$?" >> "$RES/diagnose-niah.log"
  evalrun d128 170 --config "$C/c128.json" --compare "dynamic=$C/dynamic-old.json" \
    --lengths 130944 --tasks niah_single_noise,niah_multivalue --samples 10
  timeout 150 python3 "$SRC/scripts/diagnose_dynamic.py" "$STAGE/$QWEN" --rope-scaling $ROPE --config "$C/dynamic-old.json" \
    --lengths 128k --samples 2 --max-seconds 110 --out "$RES/diagnose-dynamic" > "$RES/diagnose-dynamic.log" 2>&1
  echo "diagnose-dynamic rc=$?" >> "$RES/diagnose-dynamic.log"
  touch "$RES/diag.done"
}

analyze_dyn() {  # LENGTH LIMIT: the default analyze with dynamic shallow layers (the probe picks the budgets)
  timeout "$2" $TP analyze "$STAGE/$QWEN" --out "$RES/dyn-$1" --lengths $1 --rope-scaling $ROPE --shallow dynamic \
    > "$RES/dyn-$1.log" 2>&1
  echo "analyze dyn $1 rc=$?" >> "$RES/dyn-$1.log"
}

triangle_only() {  # DYNAMIC_CONFIG OUT: the same plan with dense shallow layers (the verified triangle plan)
  python3 - "$1" "$2" <<'PY'
import sys
from dataclasses import replace
from trimix_probe.config import TriMixConfig
c = TriMixConfig.load(sys.argv[1])
layers = tuple("dense" if k == "dynamic" else k for k in c.layers)
heads = {i: h for i, h in c.dense_heads.items() if layers[i] == "triangle"}
replace(c, layers=layers, dynamic=None, dynamic_layers={}, dense_heads=heads,
        provenance={**c.provenance, "derived": f"{sys.argv[1]} with dense shallow layers"}).save(sys.argv[2])
PY
}

job_main() {
  cd "$W"
  env_txt
  # the gpu-marked tests beside the rest (kernels and patch changed this session): same card, other process
  gpu_tests 480 &
  waitfor "$QWEN"
  local tasks=niah_single_noise,niah_multivalue     # 7-digit copies: where the independent run saw the loss
  analyze_dyn 130944 420
  local d128="$RES/dyn-130944/config.json"
  [[ -f $d128 ]] || d128=$C/dynamic-old.json
  triangle_only "$d128" "$RES/tri-130944.json"
  evalrun e128 480 --config "$RES/tri-130944.json" --compare "dynamic=$d128" --lengths 130944 --tasks $tasks --samples 40
  # the old budget at 128K (the independent run's loss), the first 10 samples of the single needle
  evalrun e128old 90 --config "$C/dynamic-old.json" --lengths 130944 --tasks niah_single_noise --samples 10
  analyze_dyn 65472 240
  local d64="$RES/dyn-65472/config.json"
  [[ -f $d64 ]] || d64=$C/dynamic-old.json
  triangle_only "$d64" "$RES/tri-65472.json"
  evalrun e64 240 --config "$RES/tri-65472.json" --compare "dynamic=$d64" --lengths 65472 --tasks $tasks --samples 40
  timeout 90 python3 "$SRC/scripts/diagnose_niah.py" --model "$STAGE/$QWEN" --rope-scaling $ROPE \
    --lengths 130944 --samples 5 --out "$RES/diagnose-niah.csv" > "$RES/diagnose-niah.log" 2>&1
  echo "diagnose-niah rc=$?" >> "$RES/diagnose-niah.log"
  touch "$RES/main.done"
}

job_s3() {  # the second session: why dense misses (template x dtype), the 128K plan on 40 samples of two
  # tasks and the old budget beside it, the 64K analyze and eval; three streams on the one GPU
  cd "$W"
  env_txt
  waitfor "$QWEN"
  ( timeout 540 python3 "$SRC/scripts/diagnose_niah.py" --model "$STAGE/$QWEN" --rope-scaling $ROPE \
      --lengths 130944 --samples 20 --fp32-samples 10 --out "$RES/diagnose-niah.csv" > "$RES/diagnose-niah.log" 2>&1
    echo "diagnose-niah rc=$?" >> "$RES/diagnose-niah.log" ) &
  ( local tasks=niah_single_noise,niah_multivalue
    mkdir -p "$RES/e128b" && cp "$C/e128-results.csv" "$RES/e128b/results.csv"
    evalrun e128b 600 --config "$C/tri128.json" --compare "dynamic=$C/dyn128.json" --lengths 130944 --tasks $tasks --samples 40
    evalrun e128old 200 --config "$C/dynamic-old.json" --lengths 130944 --tasks niah_single_noise --samples 20 ) &
  analyze_dyn 65472 420
  local d64="$RES/dyn-65472/config.json"
  [[ -f $d64 ]] || d64=$C/dynamic-old.json
  triangle_only "$d64" "$RES/tri-65472.json"
  evalrun e64 420 --config "$RES/tri-65472.json" --compare "dynamic=$d64" --lengths 65472 \
    --tasks niah_single_noise,niah_multivalue --samples 40
  wait
  touch "$RES/s3.done"
}

job_s4() {  # the second session's second lease (the first one's machine went back with the runs under
  # way): the gpu tests (dynamic.py changed), the 128K and 64K evals resumed from the rows the first
  # lease brought back, the old budget, and analyze at 128K with a looser --recall-target
  cd "$W"
  env_txt
  gpu_tests 600 &
  waitfor "$QWEN"
  local L=$SRC/lease1 tasks=niah_single_noise,niah_multivalue
  mkdir -p "$RES/e128b" "$RES/e64" && cp "$L/e128b/results.csv" "$RES/e128b/" && cp "$L/e64/results.csv" "$RES/e64/"
  ( evalrun e128b 1200 --config "$C/tri128.json" --compare "dynamic=$C/dyn128.json" --lengths 130944 --tasks $tasks --samples 40
    evalrun e128old 400 --config "$C/dynamic-old.json" --lengths 130944 --tasks niah_single_noise --samples 20 ) &
  evalrun e64 600 --config "$L/tri-65472.json" --compare "dynamic=$L/dyn-65472/config.json" --lengths 65472 --tasks $tasks --samples 40
  timeout 900 $TP analyze "$STAGE/$QWEN" --out "$RES/dyn80-130944" --lengths 130944 --rope-scaling $ROPE --shallow dynamic \
    --recall-target 0.8 > "$RES/dyn80-130944.log" 2>&1
  echo "analyze rc=$?" >> "$RES/dyn80-130944.log"
  wait
  touch "$RES/s4.done"
}

job_s5() {  # not run yet: the next session's queue, most wanted first (estimates for one H200 alone)
  cd "$W"
  env_txt
  waitfor "$QWEN"
  local tasks=niah_single_noise,niah_multivalue
  # 1. the old 1000/6096 budget on the faithful prompts (issue 24 part 1; ~3 min)
  evalrun e128old 400 --config "$C/dynamic-old.json" --lengths 130944 --tasks niah_single_noise --samples 20
  # 2. does the generation check with 4 samples a task move 64K off layer 16? (~8 min)
  timeout 900 $TP analyze "$STAGE/$QWEN" --out "$RES/gen-65472" --lengths 65472 --rope-scaling $ROPE \
    --shallow dynamic --check-generation --verify-samples 4 > "$RES/gen-65472.log" 2>&1
  echo "analyze rc=$?" >> "$RES/gen-65472.log"
  # 3. a looser recall target at 128K, the whole-plan check as the guard (~7 min), then its eval
  timeout 900 $TP analyze "$STAGE/$QWEN" --out "$RES/dyn80-130944" --lengths 130944 --rope-scaling $ROPE \
    --shallow dynamic --recall-target 0.8 > "$RES/dyn80-130944.log" 2>&1
  echo "analyze rc=$?" >> "$RES/dyn80-130944.log"
  [[ -f $RES/dyn80-130944/config.json ]] && evalrun e128r80 900 --config "$C/tri128.json" \
    --compare "dynamic80=$RES/dyn80-130944/config.json" --lengths 130944 --tasks $tasks --samples 40
  # 4. the other six tasks at 64K (~12 min)
  evalrun e64six 1500 --config "$SRC/lease1/tri-65472.json" --lengths 65472 \
    --tasks niah_single_prose,niah_multikey,niah_multiquery,vt,cwe,fwe --samples 40
  touch "$RES/s5.done"
}

job_s6() {
  cd "$W"
  env_txt
  local six=niah_single_prose,niah_multikey,niah_multiquery,vt,cwe,fwe
  timeout 480 $TP bench dynamic --seqs 32k,64k,128k --config "$C/dyn128.json" --out-dir "$RES/bench-dyn" \
    > "$RES/bench-dyn.log" 2>&1
  echo "bench rc=$?" >> "$RES/bench-dyn.log"
  gpu_tests 900 &
  waitfor "$QWEN"
  evalrun e128old 400 --config "$C/dynamic-old.json" --lengths 130944 --tasks niah_single_noise --samples 20
  evalrun e128six 720 --config "$C/dyn128.json" --lengths 130944 --tasks $six --samples 10
  evalrun e64six 420 --config "$SRC/lease1/dyn-65472/config.json" --lengths 65472 --tasks $six --samples 10
  wait
  touch "$RES/s6.done"
}

job_s7() {  # 2026-12-07, second session: the vertical-slash grid order (kernel sweep, then the dynamic
  # bench) alone on the GPU while the models are staged; then three streams: the six tasks at 128K (dense,
  # triangle-only at 14, the emitted plan, triangle-all) and the old 1000/6096 budget on the 7-digit
  # needles; the probe at 32K and its eval with the sweep, then the six tasks at 64K; the gpu tests, then
  # SmolLM2 at 4K
  cd "$W"
  env_txt
  local six=niah_single_prose,niah_multikey,niah_multiquery,vt,cwe,fwe
  ( cd "$SRC/sweep" && SEQS=32,64,128 TILES=64 SKIP=oldtri,p2,bw FLEX_BY=150 OUT=$RES timeout 400 python3 kernel_sweep.py \
      > "$RES/sweep.log" 2>&1; echo "sweep rc=$?" >> "$RES/sweep.log" )
  timeout 300 $TP bench dynamic --seqs 32k,64k,128k --config "$C/dyn128.json" --out-dir "$RES/bench-dyn" \
    > "$RES/bench-dyn.log" 2>&1
  echo "bench rc=$?" >> "$RES/bench-dyn.log"
  ( gpu_tests 900
    waitfor "$SMOL"
    timeout 600 $TP eval --model "$STAGE/$SMOL" --config "$C/smol4k.json" --lengths 4k --tasks all --samples 20 \
      --baselines triangle-all,streaming --sweep 9,12,15,21 --batch-size 20 --batch-tokens 160k --out "$RES/s4k" --resume \
      > "$RES/s4k.log" 2>&1; echo "s4k rc=$?" >> "$RES/s4k.log" ) &
  waitfor "$QWEN"
  ( evalrun e128six 900 --config "$C/tri128.json" --compare "dynamic=$C/dyn128.json" --baselines triangle-all \
      --lengths 130944 --tasks $six --samples 10
    evalrun e128old 400 --config "$C/dynamic-old.json" --lengths 130944 --tasks niah_single_noise,niah_multivalue --samples 20 ) &
  timeout 400 $TP analyze "$STAGE/$QWEN" --out "$RES/dyn-32704" --lengths 32704 --rope-scaling $ROPE --shallow dynamic \
    > "$RES/dyn-32704.log" 2>&1
  echo "analyze dyn 32704 rc=$?" >> "$RES/dyn-32704.log"
  local d32="$RES/dyn-32704/config.json"
  [[ -f $d32 ]] || d32=$C/c64.json
  evalrun e32 600 --config "$d32" --baselines triangle-all --sweep 8,12,16,20 --lengths 32704 --tasks all --samples 20
  evalrun e64six 500 --config "$SRC/lease1/dyn-65472/config.json" --lengths 65472 --tasks $six --samples 10
  wait
  touch "$RES/s7.done"
}

job_s8() {  # 2026-12-07, third session: what the second left, most wanted first. On an H100 (80 GB)
  # keep the 32K eval away from the gpu tests (they hold ~59 GB: the s7 32K eval ran out of memory)
  cd "$W"
  env_txt
  local six=niah_single_prose,niah_multikey,niah_multiquery,vt,cwe,fwe H=$SRC/h100b
  # 0. the kernels alone while the model is staged (~4 min): today's kernels on this card, both
  #    vertical-slash patterns, configs the autotuners do not have yet, and tile 128 again (slower
  #    than 64 under the old grid; worth timing again now that the grid reuses L2)
  #    (oldk/ = today's kernels: the "old" columns repeat the new ones)
  #    (fourth session: oldk/ = today's kernels with docs/raw/vs-pair/vertical_slash.patch applied, so the
  #    "old" vertical-slash columns are the variant that takes two slash tiles a step)
  mkdir -p "$SRC/sweep/oldk" && cp "$W/build/kernels/"*.py "$SRC/sweep/oldk/" && touch "$SRC/sweep/oldk/__init__.py" \
    && cp "$REPO/docs/raw/kernel_sweep.py" "$SRC/sweep/" && apply_patch "$SRC/sweep/oldk/vertical_slash.py" \
    "$REPO/docs/raw/vs-pair/vertical_slash.patch"  # (as run: the patched file itself)
  # (on an H100 only 128K: the 12-07 H100 run has the rest; issue 25's targets are H200 figures).
  #    It runs while the model is staged, so it costs the lease little; SWEEP=0 skips it
  local seqs=128 sweep=${SWEEP:-1}
  nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && seqs=128,32
  [[ $sweep == 1 ]] && ( cd "$SRC/sweep" && SEQS=$seqs TILES=128,64 SKIP=oldtri,p2,bw FLEX_BY=200 OUT=$RES EXTRA_BAND=256x64x8x2,128x128x8x2 \
      EXTRA_VS=4x4 timeout 240 python3 kernel_sweep.py > "$RES/sweep.log" 2>&1; echo "sweep rc=$?" >> "$RES/sweep.log" )
  waitfor "$QWEN"
  # 1. the old 1000/6096 budget on the faithful 7-digit needles (issue 24 part 1; ~3 min; missed four times)
  #    (the single needle first, the multi-value needles after 1b, resumed into the same folder)
  evalrun e128old 300 --config "$C/dynamic-old.json" --lengths 130944 --tasks niah_single_noise --samples 20
  # 1b. why dense misses at 128K, the arithmetic this time: rotary and attention in float32 on the five
  #     needles dense missed (3, 7, 9, 12, 19 of 20) and three it found (~3 min)
  timeout 420 python3 "$SRC/scripts/diagnose_niah.py" --model "$STAGE/$QWEN" --rope-scaling $ROPE --lengths 130944 \
    --samples 20 --only 0,1,2,3,7,9,12,19 --variants chat-bfloat16,chat-bfloat16-rope32,chat-bfloat16-rope32-attn32 \
    --out "$RES/diagnose-niah32.csv" > "$RES/diagnose-niah32.log" 2>&1
  echo "diagnose-niah32 rc=$?" >> "$RES/diagnose-niah32.log"
  mv "$RES/e128old.log" "$RES/e128old-single.log"
  evalrun e128old 300 --config "$C/dynamic-old.json" --lengths 130944 --tasks niah_single_noise,niah_multivalue --samples 20
  # 2. 32K: dense, the probe's plan and triangle-all on all eight tasks (issue 23's 32K target; ~4 min)
  evalrun e32 500 --config "$H/dyn-32704/config.json" --baselines triangle-all --lengths 32704 --tasks all --samples 20
  # 3. the gpu tests (the kernels' jit code did not change after s7's 96 passed; the launcher got a shape
  #    assert; the families' kernel path for the patch's ALiBi branch), then the rest of fwe at 128K,
  #    resumed from the s7 rows (~1 min)
  mkdir -p "$RES/e128six" && cp "$H/e128six/results.csv" "$RES/e128six/"
  gpu_tests 420 "test_kernel.py or test_dynamic.py or test_families.py"
  evalrun e128six 300 --config "$C/tri128.json" --compare "dynamic=$C/dyn128.json" --baselines triangle-all \
    --lengths 130944 --tasks $six --samples 10
  # 4. the 32K sweep last, in its own folder (resumable; what the lease leaves)
  evalrun e32sweep 600 --config "$H/dyn-32704/config.json" --sweep 12,16,20 --lengths 32704 --tasks all --samples 20
  touch "$RES/s8.done"
}

job_s9() {  # 2026-12-07, fourth session's leftovers (its lease, on an H100: docs/raw/h100-2026-12-07d), most
  # wanted first. Staging takes ~1 minute (6 s a part); the kernel steps run alone before the evals
  cd "$W"
  env_txt
  local six=niah_single_prose,niah_multikey,niah_multiquery,vt,cwe,fwe H=$SRC/h100b D=$REPO/docs/raw/h100-2026-12-07d
  # 0. the sweep (SWEEP=0 skips it): on an H200 (issue 25's card) at 128K, 64K and 32K (the triangle band's
  #    256-row tile at every length, vertical-slash against the 35 ms target)
  #    On an H100: 128K only, no profile. oldk/ = today's kernels with docs/raw/vs-full/vertical_slash.patch
  #    applied: the sweep's "VS old" columns are the variant whose whole tiles skip the mask
  local sweep=${SWEEP:-1} seqs=128 h200=0
  nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && seqs=128,64,32 h200=1
  mkdir -p "$SRC/sweep/oldk" && cp "$W/build/kernels/"*.py "$SRC/sweep/oldk/" && touch "$SRC/sweep/oldk/__init__.py" \
    && cp "$REPO/docs/raw/kernel_sweep.py" "$SRC/sweep/" \
    && apply_patch "$SRC/sweep/oldk/vertical_slash.py" "$REPO/docs/raw/vs-full/vertical_slash.patch"
  #    (EXTRA_BAND: neighbours of the 256 x 64 tile the H100 picked, for the autotune table)
  [[ $sweep == 1 ]] && ( cd "$SRC/sweep" && SEQS=$seqs TILES=64 SKIP=oldtri,p2,bw FLEX_BY=200 OUT=$RES \
      EXTRA_BAND=256x64x8x3,256x32x8x2,256x64x16x2 timeout 300 python3 kernel_sweep.py > "$RES/sweep.log" 2>&1; echo "sweep rc=$?" >> "$RES/sweep.log" )
  #    and the profile of the new grid and the new band tile: where the warps stall (WarpStateStats), on the
  #    card of the 12-04 profile (~1 min)
  [[ $h200 == 1 ]] && command -v ncu > /dev/null && ( cd "$SRC/sweep" && MODE=ncu SEQS=128 NCU_RUNS=vs_t64,band_p4 \
      timeout 240 ncu --nvtx --nvtx-include "prof/" --clock-control none --section SpeedOfLight --section Occupancy \
      --section LaunchStats --section MemoryWorkloadAnalysis --section WarpStateStats python3 kernel_sweep.py \
      > "$RES/ncu.log" 2>&1; echo "ncu rc=$?" >> "$RES/ncu.log" )
  # 0b. end to end with the new band tile (issue 24's TTFT, issue 25's rerun beside it), 128K first (~3 min)
  timeout 300 $TP bench dynamic --seqs 128k,64k --config "$C/dyn128.json" --out-dir "$RES/bench-dyn" \
    > "$RES/bench-dyn.log" 2>&1
  echo "bench rc=$?" >> "$RES/bench-dyn.log"
  waitfor "$QWEN"
  # 1. 32K: dense, the probe's plan and triangle-all on all eight tasks (issue 23's 32K target; ~4 min)
  evalrun e32 500 --config "$H/dyn-32704/config.json" --baselines triangle-all --lengths 32704 --tasks all --samples 20
  # 2. the gpu tests (the band kernel's new tile; the families' kernel path; ~6 min)
  gpu_tests 420 "test_kernel.py or test_dynamic.py or test_families.py"
  # 3. the old 1000/6096 budget's multi-value needles: the last 3 samples, resumed (~1 min)
  mkdir -p "$RES/e128old" && cp "$D/e128old/results.csv" "$RES/e128old/"
  evalrun e128old 300 --config "$C/dynamic-old.json" --lengths 130944 --tasks niah_single_noise,niah_multivalue --samples 20
  #    and at 64K (issue 24 part 1 asks for both lengths; ~2 min)
  evalrun e64old 300 --config "$C/dynamic-old.json" --lengths 65472 --tasks niah_single_noise,niah_multivalue --samples 20
  # 4. the rest of fwe at 128K (resumed from the s7 rows), then the 32K sweep (resumable)
  mkdir -p "$RES/e128six" && cp "$H/e128six/results.csv" "$RES/e128six/"
  evalrun e128six 300 --config "$C/tri128.json" --compare "dynamic=$C/dyn128.json" --baselines triangle-all \
    --lengths 130944 --tasks $six --samples 10
  evalrun e32sweep 600 --config "$H/dyn-32704/config.json" --sweep 12,16,20 --lengths 32704 --tasks all --samples 20
  touch "$RES/s9.done"
}

sweep_setup() {  # the sweep's folder: kernel_sweep.py, and oldk/ = today's kernels with
  # docs/raw/vs-full/vertical_slash.patch applied (whole slash tiles skip the mask), once
  [[ -f $SRC/sweep/kernel_sweep.py ]] && return
  mkdir -p "$SRC/sweep/oldk" && cp "$W/build/kernels/"*.py "$SRC/sweep/oldk/" && touch "$SRC/sweep/oldk/__init__.py" \
    && cp "$REPO/docs/raw/kernel_sweep.py" "$SRC/sweep/" \
    && apply_patch "$SRC/sweep/oldk/vertical_slash.py" "$REPO/docs/raw/vs-full/vertical_slash.patch"
}

sweep_vs_full() {  # SEQS: the kernel sweep ("VS old" = vs-full, see sweep_setup); EXTRA_BAND: the 256 x 64
  # tile's neighbours
  sweep_setup
  ( cd "$SRC/sweep" && SEQS=$1 TILES=64 SKIP=oldtri,p2,bw FLEX_BY=200 OUT=$RES \
      EXTRA_BAND=256x64x8x3,256x32x8x2,256x64x16x2 timeout 300 python3 kernel_sweep.py > "$RES/sweep.log" 2>&1; echo "sweep rc=$?" >> "$RES/sweep.log" )
}

ncu_profile() {  # the stall reasons (WarpStateStats) of the vertical-slash grid and the band tile at 128K, alone
  sweep_setup
  command -v ncu > /dev/null && ( cd "$SRC/sweep" && MODE=ncu SEQS=128 NCU_RUNS=vs_t64,band_p4 \
      timeout 240 ncu --nvtx --nvtx-include "prof/" --clock-control none --section SpeedOfLight --section Occupancy \
      --section LaunchStats --section MemoryWorkloadAnalysis --section WarpStateStats python3 kernel_sweep.py \
      > "$RES/ncu.log" 2>&1; echo "ncu rc=$?" >> "$RES/ncu.log" )
}

old_budget_128() {  # the old 1000/6096 budget's last 3 multi-value samples at 128K, resumed (alone: ~60 GB)
  mkdir -p "$RES/e128old" && cp "$REPO/docs/raw/h100-2026-12-07d/e128old/results.csv" "$RES/e128old/"
  evalrun e128old 300 --config "$C/dynamic-old.json" --lengths 130944 --tasks niah_single_noise,niah_multivalue --samples 20
}

bench_dyn() {  # end to end with the band's 256-row tile (issue 24's TTFT), 128K first
  timeout 300 $TP bench dynamic --seqs 128k,64k --config "$C/dyn128.json" --out-dir "$RES/bench-dyn" \
    > "$RES/bench-dyn.log" 2>&1
  echo "bench rc=$?" >> "$RES/bench-dyn.log"
}

job_s11() {  # 2026-12-08, fifth session (ran: docs/raw/h100-2026-12-08): the gpu tests from the first call
  # (they need no model), the 32K eval and the old budget at 64K side by side once Qwen is staged, then the
  # timed steps alone (sweep, profile), last the 128K resume and bench dynamic
  cd "$W"
  env_txt
  local H=$SRC/h100b seqs=128
  nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && seqs=128,64,32
  gpu_tests 480 "test_kernel.py or test_dynamic.py or test_families.py" &
  waitfor "$QWEN"
  evalrun e32 500 --config "$H/dyn-32704/config.json" --baselines triangle-all --lengths 32704 --tasks all --samples 20 &
  evalrun e64old 300 --config "$C/dynamic-old.json" --lengths 65472 --tasks niah_single_noise,niah_multivalue --samples 20 &
  wait
  sweep_vs_full $seqs
  ncu_profile
  old_budget_128
  bench_dyn
  touch "$RES/s11.done"
}

job_s12() {  # what s11 left (its lease ended after the sweep): the 32K eval and the old budget at 64K resumed
  # from docs/raw/h100-2026-12-08 beside the gpu tests the lease did not reach (dynamic softcap/sinks), then
  # the profile (the sweep again on an H200 first: issue 25's card), the 128K resume, bench dynamic
  cd "$W"
  env_txt
  local H=$SRC/h100b N=$REPO/docs/raw/h100-2026-12-08
  gpu_tests 300 "test_gpu_dynamic_softcap_and_sinks or test_gpu_family_kernel_path" &
  waitfor "$QWEN"
  mkdir -p "$RES/e32" "$RES/e64old" && cp "$N/e32/results.csv" "$RES/e32/" && cp "$N/e64old/results.csv" "$RES/e64old/"
  evalrun e32 500 --config "$H/dyn-32704/config.json" --baselines triangle-all --lengths 32704 --tasks all --samples 20 &
  evalrun e64old 300 --config "$C/dynamic-old.json" --lengths 65472 --tasks niah_single_noise,niah_multivalue --samples 20 &
  wait
  nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && sweep_vs_full 128,64,32
  ncu_profile
  old_budget_128
  bench_dyn
  touch "$RES/s12.done"
}

case ${1:?usage} in
stage)
  name=${2:?name}; part=${3:?part}
  cp ".stage/$name.part-$part" "$STAGE/" && echo "staged $name part $part"
  [[ -f .stage/$name.sha256 ]] && cp ".stage/$name.sha256" "$STAGE/"
  install
  assemble "$SMOL" $SMOL_PARTS; assemble "$QWEN" $QWEN_PARTS
  ls "$STAGE"
  if [[ ! -f $W/started ]]; then
    touch "$W/started"
    setsid bash "$SRC/scripts/gpu_faithful.sh" job "${JOBS:?JOBS=diag or main}" > "$RES/job.log" 2>&1 < /dev/null &
    echo "jobs started"
  fi
  nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
  (cd "$W" && tar czf "$OUT_DEV/res.tgz" --exclude='*.png' res) ;;
wait)
  sleep "${2:-300}"
  nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
  for f in "$RES"/*.log; do echo "== $f"; tail -n 4 "$f"; done
  (cd "$W" && tar czf "$OUT_DEV/res.tgz" --exclude='*.png' res) ;;
job)
  install
  case $2 in
  diag) job_diag ;;
  main) job_main ;;
  s3) job_s3 ;;
  s4) job_s4 ;;
  s5) job_s5 ;;
  s6) job_s6 ;;
  s7) job_s7 ;;
  s8) job_s8 ;;
  s9) job_s9 ;;
  s11) job_s11 ;;
  s12) job_s12 ;;
  esac ;;
esac
