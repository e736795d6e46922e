#!/usr/bin/env bash
# Device side of reports/h200: how the H200 runs were made (REPRODUCE.md says how to rerun them on any
# CUDA machine with `make`). The machine has no network and no vLLM: vLLM 0.26.0 and its dependencies
# come as wheel parts (.device/pN, made by shared/device/bundle.py), one call each; the shape-only
# folders (config files only) are made on a CPU machine and carried as checkpoints/.shape-only. The image has no
# llm-compressor and no lm-eval either: wheel sets .device/quant and .device/eval (BUILD-PLAN.md), carried likewise.
#   bash reports/h200/device.sh STEP[=ARG] ...
#   steps: chunk | install | sweep=MODELS[/SCHEMES] | variant=MODEL/SCHEME/KEY=VALUE | bench=MODEL/SCHEME/BATCH,...
#          | harness=MODEL/SCHEME/BATCH | serve=MODEL/SCHEMES[/KEY=VALUE,...] | routing=MODEL/SCHEME,... | fused[=MODEL]
#          | freeze (the carried moeq into $W/pkg) | build=MODEL | wait=MODEL | outliers=MODEL | quantize=MODEL[/SCHEMES] | prune=MODEL/KEEPS
#          | score=MODEL[/SCHEMES[/TASKS]] (MODEL may be a pruned one: moe-500m-keep50)
#          | detach=NAME (the steps after it, in the background) | collect=NAMES | follow=NAMES/SECONDS | fetch=MODEL/K | stash=MODEL | restore=MODEL
#          | set=KEY=VALUE (for the steps after it, e.g. set=MOEQ_BATCH=none: accuracy only) | await=MODEL/SCHEMES
#          | borrow=E=128,N=768:64,32 (vLLM's tuned MoE config of one shape, lent to other expert counts, for the steps after it;
#            borrow=E=8,N=14336:dtype=int8_w8a16 lends the shape's bf16 file to a dtype)
#          | plan=h200/plan-topk-mixtral.yaml (the sweep plan of the sweep= steps after it)
# Everything finished is copied to $OUT at exit, also after a timeout: the ledger gets one transaction
# per cell, so a cut-off step loses only its cell in flight, and the next call resumes from the ledger.
# On a host of several GPUs, streams run side by side, one per GPU, each with its own ledger copy, log
# and results (merged here afterwards: `moeq ledger merge --ledger reports/h200/ledger.sqlite --from ...`); keep every scheme of a model on one
# GPU so its ratios to BF16 are measured side by side on one device:
#   CUDA_VISIBLE_DEVICES=1 TAG=-gpu1 bash reports/h200/device.sh sweep=qwen3moe/fp8-block &
set -u
W=${MOEQ_DEVICE_DIR:-/tmp/h200}; OUT=${OUT:-$W/out}; TAG=${TAG:-}; mkdir -p "$W" "$OUT"
export PYTHONPATH=/tmp/site:$W/pkg VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export MOEQ_CACHE=$W/cache CUDA_DEVICE_ORDER=PCI_BUS_ID  # CUDA's GPU numbers = NVML's (memory is read by NVML)
SRC=${SRC:-.}  # the moeq that runs: the tree, or a clean `git archive` of a commit carried beside it:
#   git archive HEAD core quantize evaluate recipes benchmarks reports/h200/device.sh 'reports/h200*/plan*.yaml' | tar x -C .h200/src
PLAN=$SRC/reports/h200/${PLANFILE:-plan.yaml} LEDGER=$W/ledger$TAG.sqlite CKPT=$W/checkpoints  # PLANFILE=plan-separate.yaml: another plan
[ -f $LEDGER ] || [ ! -f $W/ledger.sqlite ] || cp $W/ledger.sqlite $LEDGER  # a new stream starts from the committed ledger
# the ledger gzipped: with lm-eval's per-item scores it neared the 16 MiB a returned file may have (15 MiB in session 7,
# before schema 4 kept a task's scores as one JSON row)
snapshot() { [ -f $LEDGER ] && python3 -c "import sqlite3, sys; sqlite3.connect(sys.argv[1]).backup(sqlite3.connect(sys.argv[2]))" $LEDGER $W/.snap$TAG 2>/dev/null &&
  gzip -c $W/.snap$TAG > "$1/$(basename $LEDGER).gz"; (cd $W && tar cf "$1/results$TAG.tar" *.json 2>/dev/null); }
# a call that only follows or fetches (collect=, follow=, fetch=, stash=, restore=) returns what it fetched and nothing else:
# session 8 had set OUT=/tmp/io BACK=$OUT for that, and bash expands BACK=$OUT after OUT=/tmp/io, so nothing came back
FOLLOW_ONLY=1; for a in "$@"; do [[ $a =~ ^(collect|follow|fetch|stash|restore)= ]] || FOLLOW_ONLY=; done
trap '[ -n "$FOLLOW_ONLY" ] || snapshot "$OUT"' EXIT
[ -x $W/quant-python ] && export MOEQ_QUANT_PYTHON=$W/quant-python  # the quantize environment, once install wrote it
# the commit of the frozen moeq ($W/pkg) goes into every env record: session 27's calls after the install did not
# export MOEQ_GIT_COMMIT, and their rows say git_commit null
[ -n "${MOEQ_GIT_COMMIT:-}" ] || [ ! -s $W/pkg/GIT_COMMIT ] || export MOEQ_GIT_COMMIT=$(cat $W/pkg/GIT_COMMIT)
END=$((SECONDS + ${BUDGET:-560}))  # every step stops in time for the trap to run inside the call's limit
left() { echo $((END - SECONDS > 5 ? END - SECONDS : 5)); }
# moeq's own lines and vLLM's kernel choice on the console; everything in $OUT/device.log
show() { tee -a "$OUT/device$TAG.log" | grep --line-buffered -E '^\[(eval|sweep|serve|quantize)\]|^routing:|run [0-9]/|MoE backend|MoE config|Throughput|Error|error:|Traceback' ; }

# the vLLM parts to /tmp/chunks, those of the wheel sets (.device/quant/pN, .device/eval/pN) to folders beside them
# (a call takes 64 MiB with the tree, which grows with the ledger: uploads.sh cuts the same bytes into smaller parts,
#  one per .device/pN, when the tree leaves a part too little room: 30 MiB, eleven parts, at 28.8 MiB of tree)
step_chunk() {
  mkdir -p /tmp/chunks/quant /tmp/chunks/eval; cp .device/p*/part* /tmp/chunks/ 2>/dev/null
  for set in quant eval; do cp .device/$set/p*/part* /tmp/chunks/$set/ 2>/dev/null; done
  (cd /tmp/chunks && ls part* quant eval 2>/dev/null | tr '\n' ' ')
}
unpack() {  # unpack SET TARGET: a wheel set's parts, where this call or an earlier chunk call carried them, into TARGET
  ls /tmp/chunks/$1/part* >/dev/null 2>&1 || return 0
  mkdir -p /tmp/$1 && cat /tmp/chunks/$1/part* | tar x -C /tmp/$1 &&
    python3 -m pip install -q --no-index --no-deps --no-compile --target $2 /tmp/$1/whl/*.whl
}

step_install() {
  step_chunk
  cat /tmp/chunks/part* | tar x -C /tmp && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/whl/*.whl || return 1
  # vLLM's OpenAI server (serve=) also needs wheels the bundle's resolver left out (uvicorn, model-hosting-container-
  # standards, jmespath, ...: serve-plan.md lists them): .device/serve, carried in this call when serving is planned
  if [ -d .device/serve ]; then python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/serve/*.whl || return 1; fi
  # issue 10: llm-compressor needs compressed-tensors 0.19, vLLM 0.17 (README, "Why two environments"), so the
  # quantize set goes to a folder of its own that /tmp/site never sees, lm-eval's set beside vLLM in /tmp/site
  unpack quant /tmp/quant-site && unpack eval /tmp/site || return 1
  # humming-kernels (vLLM 0.26 pins 0.1.10, the bundle left it out): the one Int8 MoE backend of 0.26 that quantizes
  # the experts' activations (NOTES.md, session 9), in a folder of its own so that default runs see the packages
  # they always saw; a step opts in with set=PYTHONPATH=/tmp/humming:/tmp/site:$W/pkg set=MOEQ_ENGINE_ARG=moe_backend=humming
  if [ -d .device/humming ]; then python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/humming .device/humming/*.whl || return 1; fi
  if [ -d /tmp/quant-site ]; then  # the quantize environment's interpreter, which moeq finds by MOEQ_QUANT_PYTHON
    printf '#!/bin/sh\nPYTHONPATH=/tmp/quant-site:%s exec %s "$@"\n' $W/pkg "$(command -v python3)" > $W/quant-python
    chmod +x $W/quant-python && export MOEQ_QUANT_PYTHON=$W/quant-python
  fi
  # a frozen copy of moeq: later calls run the code this call brought, whatever the tree holds then
  # laid out as pyproject.toml installs it: core/ is the package moeq, the rest its subpackages
  # (kept when a build detached before this install runs from it: the build needs no vLLM, so it may start first)
  local pid busy=; for pid in $(cat $W/build-*.pid 2>/dev/null); do kill -0 $pid 2>/dev/null && busy=1; done
  if [ -n "$busy" ]; then echo "keeping $W/pkg: a build runs from it"; else rm -rf $W/pkg; fi; freeze
  # carried paths are gone from the next call's copy of the repository: keep them under /tmp
  mkdir -p $CKPT && cp -r checkpoints/.shape-only $CKPT/ && cp -r .h200/tokenizer $W/tokenizer
  mkdir -p $W/plans && (cd $SRC/reports && tar cf - h200*/plan*.yaml) | tar xf - -C $W/plans
  rm -rf $W/benchmarks && cp -r $SRC/benchmarks $W/  # the scripts a detached chain runs (fused=)
  # and this script: a later call that carries nothing runs `bash /tmp/h200/device.sh ...` (session 12 lost six
  # calls naming a .h200/src they did not carry)
  cp -f $0 $W/device.sh
  # tiny, built on a CPU and carried (.h200/tiny), only for build='s bits-per-byte comparison
  [ -d .h200/tiny ] && [ ! -d $MOEQ_CACHE/models/tiny ] && mkdir -p $MOEQ_CACHE/models && cp -r .h200/tiny $MOEQ_CACHE/models/
  # the committed ledger goes on: cells it already holds (same settings, same checkpoint) are skipped
  cp reports/h200/ledger.sqlite $W/ledger.sqlite && chmod u+w $W/ledger.sqlite
  [ $LEDGER = $W/ledger.sqlite ] || cp $W/ledger.sqlite $LEDGER
  python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)" 2>&1 | tail -1
  # the wheel sets import here, before a build is waited on; pip check names any pin the image's versions break
  if [ -d /tmp/eval ]; then python3 -c "import lm_eval.models.vllm_causallms, datasets; from importlib.metadata import version as v; print('lm-eval', v('lm_eval'), 'datasets', v('datasets'))" 2>&1 | tail -1
    python3 -m pip check 2>&1 | grep -iE '^(lm.eval|datasets|evaluate|rouge.score|nltk|typepy) '; fi
  if [ -x $W/quant-python ]; then $W/quant-python -c "import llmcompressor, compressed_tensors as c, datasets; print('llmcompressor', llmcompressor.__version__, 'compressed-tensors', c.__version__)" 2>&1 | tail -1
    $W/quant-python -m pip check 2>&1 | tail -n 5; fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
}

step_sweep() {  # sweep=qwen3moe,mixtral[/bf16,fp8]
  local models=${1%%/*} schemes=; [[ $1 == */* ]] && schemes="--schemes ${1#*/}"
  timeout $(left) python3 -m moeq.cli sweep $PLAN --models "$models" $schemes --ledger $LEDGER --checkpoints $CKPT 2>&1 | show
}

step_plan() {  # plan=h200/plan-topk-mixtral.yaml: a plan under reports/, for the sweep= steps after it
  # install keeps every plan under $W/plans: a detached chain outlives the call's tree, where $SRC is
  PLAN=$W/plans/$1; [ -f $PLAN ] || PLAN=$SRC/reports/$1
  # a chain that went on would sweep the plan before it: stop it
  [ -f $PLAN ] || { echo "plan=$1: no such plan; there are: $(cd $SRC/reports 2>/dev/null && ls h200*/plan*.yaml | tr '\n' ' ')"; exit 2; }
  echo "plan: $PLAN"
}

step_restart() {  # restart=qwen3moe/bf16,fp8: a second engine start whose repeats join each cell's interval
  timeout $(left) python3 -m moeq.cli sweep $PLAN --models "${1%%/*}" --schemes "${1#*/}" --restarts 2 \
    --ledger $LEDGER --checkpoints $CKPT 2>&1 | show
}

step_variant() {  # variant=qwen3moe/fp8/moe_backend=triton: one scheme with one engine argument changed
  IFS=/ read -r model scheme arg <<< "$1"
  timeout $(left) python3 -m moeq.cli eval --weights dummy --model $model --scheme $scheme --tasks none \
    --batch 1,16,64,128 --warmup-tokens 16 --engine-arg "$arg" --ledger $LEDGER --checkpoints $CKPT 2>&1 | show
}

step_bench() {  # vLLM's own tool at its defaults on cells moeq measured: bench=qwen3moe/fp8/64,...
  # one untimed pass of as many prompts first, as moeq warms up (session 4 ran without it: first-use kernel compiles were timed);
  # prefix caching off: the bench's random prompts, made with the carried word tokenizer, repeat (128 prompts: 37
  # distinct, 73% of prompt tokens cached), which skipped most of its prefill (session 6); moeq's prompts never repeat
  for cell in ${1//,/ }; do
    IFS=/ read -r model scheme batch <<< "$cell"
    local folder=$scheme quant=; [[ $scheme == fp8-online ]] && folder=bf16 quant="--quantization fp8"
    # vLLM's CLI entry point imports its server (uvicorn, not carried); the bench module itself does not
    VLLM_MOE_ROUTING_SIMULATION_STRATEGY=uniform_random timeout $(left) python3 -c "import sys; from vllm.benchmarks.throughput import add_cli_args, main; from vllm.utils.argparse_utils import FlexibleArgumentParser as P; p = P(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))" \
      --model $CKPT/.shape-only/$model/$folder $quant --tokenizer $W/tokenizer --load-format dummy --dataset-name random \
      --random-input-len 512 --random-output-len 128 --num-prompts $batch --num-warmups $batch --max-model-len 2176 --no-enable-prefix-caching \
      --output-json $W/bench-$model-$scheme-b$batch.json 2>&1 | show
  done
}

step_serve() {  # serve=mixtral/bf16,fp8[/KEY=VALUE,...]: vLLM's OpenAI server under a Poisson rate ladder
  # (reports/h200/serve-plan.md); engine arguments after a third slash, e.g. data_parallel_size=2,enable_expert_parallel=true
  local models schemes extra args=()
  IFS=/ read -r models schemes extra <<< "$1"
  for kv in ${extra//,/ }; do args+=(--engine-arg "$kv"); done
  timeout $(left) python3 -m moeq.cli serve-bench --model "$models" --scheme "$schemes" --weights dummy "${args[@]}" \
    --tokenizer $W/tokenizer --rate-start 4 --max-rates 6 --seconds 20 --knee-repeats 3 --concurrency 1,16,64 \
    --input-len 512 --output-len 128 --ledger $LEDGER --checkpoints $CKPT 2>&1 | show
  # the servers' own errors (a failed request's cause), counted, into the log that comes back
  grep -h -E 'ERROR|Error|" [45][0-9][0-9] ' $W/serve/*/*/*/server.log 2>/dev/null |
    sed -E 's/^[^A-Z]*(ERROR|[A-Za-z]*Error)/\1/; s/[0-9.]+:[0-9]+ - /HOST - /' | sort | uniq -c |
    sort -rn | head -n 20 | tee -a "$OUT/device$TAG.log"
  # every run's per-request timings (vLLM's --save-detailed JSON) and the servers' logs: a stall shows there as
  # requests whose first tokens all came at once (session 17's first rates), which the ledger's percentiles cannot say
  serve_runs "$OUT/serve-runs$TAG.tgz"
}
serve_runs() { tar czf "$1" --exclude='*.prompts.jsonl' --exclude=cache -C $W serve 2>/dev/null || true; }  # not the compile caches

step_harness() {  # harness=mixtral/fp8/128: moeq's cell (engine in-process and in its own process) beside vllm bench
  IFS=/ read -r model scheme batch <<< "$1"
  timeout $(left) python3 $SRC/benchmarks/harness_vs_vllm_bench.py --model $CKPT/.shape-only/$model/$scheme \
    --weights dummy --tokenizer $W/tokenizer --batch $batch --engine-process inprocess,separate \
    --out $W/harness-$model-$scheme-b$batch.json 2>&1 | tee -a "$OUT/device$TAG.log" | grep -E '^(moeq|vllm bench|ratio)|Error'
}

step_fused() {  # fused[=mixtral]: benchmarks/fused_moe.py (issue 12, claim 7): eager loop vs grouped_mm vs vLLM's fused_experts
  # a second run in one chain is kept beside the first (fused_moe-run2.json): two leases timed the kernel 16% apart
  local out=$OUT/fused_moe.json n=1; while [ -f "$out" ]; do n=$((n + 1)); out=$OUT/fused_moe-run$n.json; done
  timeout $(left) python3 $W/benchmarks/fused_moe.py --model ${1:-mixtral} --out "$out" 2>&1 |
    tee -a "$OUT/device$TAG.log" | tail -n 12
}

step_routing() {  # routing=qwen3moe/bf16,...: expert load of each shape's dummy router and of the sweep's uniform_random
  local probes=
  for folder in ${1//,/ }; do probes+=" $CKPT/.shape-only/$folder:dummy:l8 $CKPT/.shape-only/$folder:dummy:uniform_random:l8"; done
  timeout $(left) python3 -m moeq.cli routing $probes --prompts 16 --input-len 512 --out $W/routing$TAG.json 2>&1 | show
}

# Issue 10: the embedded moe-500m, trained here (quantize/gpubuild.py; reports/h200/BUILD-PLAN.md). It needs only
# the image's torch, transformers and tokenizers: no wheels, no install step. The build runs detached (setsid),
# so it outlives a call's 10-minute limit; `wait=` in the next call (within the machine's 30 s warm time)
# follows it. Its corpus is this image's Python 3.12 standard library and installed packages, pinned by the
# manifest it writes (core/corpora/moe-500m.tsv.gz: bring it back from $OUT and commit it).
freeze() {  # the carried moeq, laid out as pyproject.toml installs it, and the commit it was archived from
  [ -d $W/pkg/moeq ] || { mkdir -p $W/pkg && cp -r $SRC/core $W/pkg/moeq && (cd $SRC && cp -r quantize evaluate recipes $W/pkg/moeq/); }
  [ -z "${MOEQ_GIT_COMMIT:-}" ] || echo "$MOEQ_GIT_COMMIT" > $W/pkg/GIT_COMMIT
}
step_freeze() { freeze && echo "moeq frozen in $W/pkg at ${MOEQ_GIT_COMMIT:-an unknown commit}"; }
step_build() {  # build=moe-500m
  freeze
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  # the tokenizer encodes on every core (the top of this script turns that off for vLLM's sake)
  (cd $W && PYTHONPATH=$W/pkg TOKENIZERS_PARALLELISM=true setsid nohup python3 -c "import sys; from moeq import registry; from moeq.quantize import tiny; print(tiny.ensure_built(registry.resolve(sys.argv[1])))" \
    $1 > $W/build-$1.log 2>&1 < /dev/null & echo $! > $W/build-$1.pid)
  step_wait $1
}
step_wait() {  # wait=moe-500m: follow a detached build until it ends or this call's time is up
  local pid; while [ ! -f $W/build-$1.pid ] && [ $(left) -gt 20 ]; do sleep 5; done  # another stream starts it
  pid=$(cat $W/build-$1.pid)
  while kill -0 $pid 2>/dev/null && [ $(left) -gt 20 ]; do sleep 5; done
  kill -0 $pid 2>/dev/null && echo "build $1 still running (pid $pid): next call wait=$1" || echo "build $1 ended"
  tail -n 60 $W/build-$1.log
  cp -f $W/build-$1.log "$OUT"/ 2>/dev/null
  cp -f $MOEQ_CACHE/models/$1.build.json $MOEQ_CACHE/models/$1/moeq_build.json "$OUT"/ 2>/dev/null
  cp -f $W/pkg/moeq/corpora/$1.tsv.gz "$OUT"/ 2>/dev/null
}
# Issue 10 after the build, in the same lease (the checkpoint stays on the machine): every scheme quantized by
# llm-compressor on the GPU, then scored natively in vLLM with lm-eval (BUILD-PLAN.md, "Quantize and score in the same lease")
step_quantize() {  # quantize=moe-500m[/fp8,w4a16-gptq]: default every scheme with a checkpoint (bf16 and fp8-online have none)
  # each checkpoint is written whole or not at all: a call cut by its limit loses the scheme in flight, the next reuses the rest
  local model schemes; IFS=/ read -r model schemes <<< "$1"
  [ -x $W/quant-python ] || { echo "no quantize environment: carry .device/quant in the install call"; return 1; }
  freeze
  HF_HUB_OFFLINE=1 timeout $(left) $W/quant-python -m moeq.cli quantize --model $model --scheme ${schemes:-all} --out $CKPT 2>&1 | show
  # each checkpoint's manifest (calibration, expert coverage, libraries, seconds) comes back in results.tar
  for m in $CKPT/$model/*/manifest.json; do [ -f $m ] && cp $m $W/quantize-$model-$(basename $(dirname $m)).json; done
}
step_prune() {  # prune=moe-500m/0.5,0.25: each layer's most-routed experts kept (quantize environment), into $CKPT/.pruned
  local model keeps k; IFS=/ read -r model keeps <<< "$1"
  [ -x $W/quant-python ] || { echo "no quantize environment: carry .device/quant in the install call"; return 1; }
  freeze
  for k in ${keeps//,/ }; do
    HF_HUB_OFFLINE=1 timeout $(left) $W/quant-python -m moeq.cli prune --model $model --keep $k --out $CKPT 2>&1 | show
  done
  # each pruned model's manifest (kept experts and their share of routed tokens) comes back in results.tar
  for m in $CKPT/.pruned/$model-keep*/manifest.json; do [ -f $m ] && cp $m $W/prune-$(basename $(dirname $m)).json; done
}
step_score() {  # score=moe-500m/bf16,fp8-online,fp8[/TASKS]: real weights, perf cells and lm-eval (default: moeq's tasks)
  # into the ledger; a scheme vLLM refuses is scored on its BF16 copy, made by the quantize environment
  # (MOEQ_BATCH=none: accuracy only, one engine per scheme instead of two: the lease's first pass;
  #  MOEQ_ONE_ENGINE=1: perf cells then tasks in one engine, moeq reads it as --one-engine: session 10's second pass)
  local model schemes tasks; IFS=/ read -r model schemes tasks <<< "$1"
  [ -d $CKPT/.pruned/$model ] && model=$CKPT/.pruned/$model  # score=moe-500m-keep50/bf16: a model prune= wrote
  # (MOEQ_ENGINE_ARG=KEY=VALUE: one engine argument, e.g. moe_backend=humming; its rows form a settings group of their own)
  HF_HUB_OFFLINE=1 timeout $(left) python3 -m moeq.cli eval --model $model ${schemes:+--scheme $schemes} ${tasks:+--tasks $tasks} \
    ${MOEQ_BATCH:+--batch $MOEQ_BATCH} ${MOEQ_ENGINE_ARG:+--engine-arg $MOEQ_ENGINE_ARG} --ledger $LEDGER --checkpoints $CKPT 2>&1 | show
}
step_await() {  # await=moe-500m/w4a16-gptq,w8a16: until another stream has written these checkpoints (score= needs all)
  local model=${1%%/*} list=${1#*/} s
  # gives up once no quantization runs (a failed one writes nothing, and the chain would wait out the lease); the
  # first 15 s wait regardless (a stream detached beside this one may not have started); /proc, as the image may lack pgrep
  local t0=$SECONDS
  for s in ${list//,/ }; do
    while [ ! -f $CKPT/$model/$s/.moeq-complete ] && [ $(left) -gt 20 ] &&
      { grep -qsa "moeq\.cli.quantize" /proc/[0-9]*/cmdline || [ $((SECONDS - t0)) -lt 15 ]; }; do sleep 5; done
    [ -f $CKPT/$model/$s/.moeq-complete ] && echo "$model/$s written" || echo "$model/$s not written (no quantization running, or time up)"
  done
}
step_outliers() {  # outliers=moe-500m (or tiny, or a checkpoint folder): activation max/median and weight kurtosis
  freeze
  PYTHONPATH=$W/pkg timeout $(left) python3 -m moeq.cli outliers $1 --tokens 65536 --seq-len 1024 \
    --out "$OUT/outliers-$(basename $1).json" 2>&1 | tail -n 5
}

# Work that outlives a call (session 7 lost its quantization to call boundaries): `detach=NAME` runs the steps
# after it in the background (setsid, no time budget but the lease's), writing to $W/bg-NAME/ instead of $OUT;
# the calls meanwhile only follow it (`collect=NAME`: its log's tail, ledger, log and results into $OUT) or fetch:
#   OUT=/tmp/io bash device.sh install && CUDA_VISIBLE_DEVICES=0 bash device.sh detach=g0 build=moe-500m quantize=...
#   bash /tmp/h200/device.sh collect=g0,g1      # every following call, within the machine's 30 s
# follow=s0/540 waits until every named stream has ended or 540 s have passed, then collects: one call per
# 9 minutes instead of one per 2, so fewer gaps between calls where the machine can go back (session 26 lost a
# detached build and its scores to one 30-s gap), and no call is spent after the chain has ended.
step_follow() {
  local names=${1%/*} t0=$SECONDS n pid running=1
  while [ -n "$running" ] && [ $((SECONDS - t0)) -lt ${1##*/} ] && [ $(left) -gt 20 ]; do
    sleep 5; running=
    for n in ${names//,/ }; do pid=$(cat $W/bg-$n.pid 2>/dev/null); kill -0 ${pid:-0} 2>/dev/null && running=1; done
  done
  step_collect $names
}
step_collect() {  # bash /tmp/h200/device.sh collect=g0,g1: one bundle per stream into $OUT
  for name in ${1//,/ }; do  # one file per stream: bg-NAME.tgz (console, full log, ledger, results, what a build wrote)
    local pid; pid=$(cat $W/bg-$name.pid 2>/dev/null)
    kill -0 ${pid:-0} 2>/dev/null && echo "$name running (pid $pid)" || echo "$name ended"
    tail -n 8 $W/bg-$name/console.log 2>/dev/null | sed "s/^/$name /"
    (LEDGER=$W/ledger-$name.sqlite TAG=-$name; snapshot $W/bg-$name)
    # the serve runs so far: session 18's chain was cut inside a serve step, and its per-request timings were lost
    [ -d $W/serve ] && serve_runs $W/bg-$name/serve-runs-$name.tgz  # the name step_serve gives it
    tar czf "$OUT/bg-$name.tgz" -C $W/bg-$name .
  done
}
# A build is ~1 GB, and a machine starts bare: fetch=MODEL/K brings pieces 4K..4K+3 (15 MiB each: a call returns
# 64 MiB) of MODEL's build folder back; carried into a later lease 34 MiB at a time (.h200/builds/MODEL/uN/, with
# stash=MODEL in each upload call), they go back into place with restore=MODEL (sha256 checked), saving the
# ~9-minute rebuild. Identity is the folder's own (moeq_build.json, the weights' hash in the ledger).
step_fetch() {  # bash /tmp/h200/device.sh fetch=moe-500m/0 (then /1, ... until "last piece")
  local model=${1%%/*} k=${1#*/} dir=$W/fetch/${1%%/*}
  if [ ! -f $dir/SHA256 ]; then
    mkdir -p $dir && tar cf - -C $MOEQ_CACHE/models $model | split -b 15M -d -a 3 - $dir/$model.tar.
    (cd $dir && sha256sum $model.tar.* > SHA256)
  fi
  local pieces=($(cd $dir && ls $model.tar.*)) n=0
  for p in "${pieces[@]:$((4 * k)):4}"; do cp $dir/$p "$OUT/"; n=$((n + 1)); done
  [ $((4 * k + n)) -ge ${#pieces[@]} ] && { cp $dir/SHA256 "$OUT/$model.SHA256"; echo "last piece: ${#pieces[@]} in all"; }
  echo "fetched $n of ${#pieces[@]} pieces of $model"
}
CHUNKS=${MOEQ_CHUNKS:-/tmp/chunks}
step_stash() {  # stash=moe-500m: this call's carried pieces (.h200/builds/MODEL/*/) to $CHUNKS, for restore
  mkdir -p $CHUNKS/build-$1 && cp .h200/builds/$1/*/* $CHUNKS/build-$1/ 2>/dev/null
  echo "$(ls $CHUNKS/build-$1 | wc -l) pieces of $1 stashed"
}
step_restore() {  # restore=moe-500m: every stashed piece (and this call's), checked, unpacked into the cache
  local model=$1 dir=$CHUNKS/build-$1; step_stash $model; mkdir -p $MOEQ_CACHE/models
  (cd $dir && sha256sum -c --quiet $model.SHA256) || { echo "restore $model: pieces missing or damaged"; return 1; }
  cat $dir/$model.tar.* | tar x -C $MOEQ_CACHE/models && echo "restored $model into $MOEQ_CACHE/models"
}
step_borrow() {  # borrow=E=128,N=768:64,32: vLLM's tuned fused-MoE config of one shape lent to other expert counts
  # (a pruned shape has no tuned file, so its engine runs Triton's default tiles while its reference runs tuned ones:
  # sweeps after this step run on the lent file, a settings group of their own, the file's digest in the record);
  # borrow=E=8,N=14336:dtype=int8_w8a16 lends the shape's bf16 file to a dtype vLLM ships no file for (session 27:
  # Triton's int8_w8a16 ran default tiles against humming; this asks how much of that gap the tiles are)
  local from=${1%%:*} to=${1#*:} dev; dev=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | tr ' ' _)
  local src=${MOEQ_MOE_CONFIGS:-/tmp/site/vllm/model_executor/layers/fused_moe/configs}/$from,device_name=$dev.json
  [ -f "$src" ] || { echo "borrow=$1: vLLM ships no $src"; exit 2; }
  local dir=$W/moe-configs/${1//[=:,]/_}; mkdir -p $dir  # a folder per step: a settings record names only its files
  if [[ $to == dtype=* ]]; then cp "$src" "$dir/$from,device_name=$dev,$to.json"
  else for e in ${to//,/ }; do cp "$src" "$dir/E=${e},${from#*,},device_name=$dev.json"; done; fi
  export VLLM_TUNED_CONFIG_FOLDER=$dir; ls $dir
}
# set=MOEQ_BATCH=none: an environment variable for the steps after it; set=NAME= unsets NAME (vLLM reads an empty
# value as a value: session 25's set=VLLM_HUMMING_INPUT_QUANT_CONFIG= failed three engines on json.loads(""))
step_set() { if [ -z "${1#*=}" ]; then unset "${1%%=*}"; else export "$1"; fi; }

args=("$@")
for i in "${!args[@]}"; do
  step=${args[$i]}; name=${step%%=*}; arg=; [[ $step == *=* ]] && arg=${step#*=}
  echo "== $step ($(date +%T), ${SECONDS}s)"
  if [ $name = detach ]; then  # the rest of the steps, in the background
    mkdir -p $W/bg-$arg
    [ $0 -ef $W/device.sh ] || cp -f $0 $W/device.sh  # the call's tree (and what it carried) may be gone before the chain ends
    OUT=$W/bg-$arg TAG=-$arg BUDGET=${BUDGET_DETACHED:-3600} setsid nohup bash $W/device.sh "${args[@]:$((i + 1))}" \
      > $W/bg-$arg/console.log 2>&1 < /dev/null & echo $! > $W/bg-$arg.pid
    echo "detached $arg (pid $!): ${args[*]:$((i + 1))}"; break
  fi
  step_$name $arg
done
echo "== done ($(date +%T), ${SECONDS}s)"
