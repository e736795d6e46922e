#!/usr/bin/env bash
# Device side of reports/h200 (how it was run; REPRODUCE.md says how to rerun it on any CUDA machine).
#   bash evaluate/h200.sh STEP[=ARG] ...   steps: chunk install sweep=MODELS[/SCHEMES] real routing zipf bench
# The machine has no network and no vLLM: the wheels come in parts (.device/p*, see
# /work/shared/device/README.md), vLLM's repacked as one .tar.xz without FA2 (Hopper runs FA3).
# A part plus the tracked tree must stay under a call's 64 MiB: halve a part with `split -n 2 -d` into
# partNNa/partNNb (own folders); chunk copies every part, install concatenates them in name order.
# Everything finished is copied to $OUT at exit, also after a timeout: the ledger gets one transaction
# per cell, so a cut-off step loses only its cell in flight, and a rerun skips what the ledger has.
set -u
W=/tmp/h200; OUT=${OUT:-$W/out}; mkdir -p "$W" "$OUT"
export PYTHONPATH=/tmp/site:$W/pkg VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# warm-ups decode 16 tokens, not 128: same prefill chunks and decode batch, so the same kernels compile
export MOEQ_WARMUP_TOKENS=16
export MOEQ_CACHE=$W/cache CHECKPOINTS=$W/checkpoints LEDGER=$W/ledger.sqlite MOEQ_QUANT_PYTHON=$W/quant-python
PLAN=reports/h200/plan.yaml
ENGINE=$(python3 -c "import json,yaml; print(json.dumps(yaml.safe_load(open('$PLAN'))['engine_args']['compilation_config']))")
# $OUT takes at most 8 files: the ledger, one log, one tar of the JSON results
trap 'cp -f $LEDGER "$OUT"/ 2>/dev/null; (cd $W && tar cf "$OUT/results.tar" *.json 2>/dev/null)' EXIT
END=$((SECONDS + ${BUDGET:-540}))  # every step stops in time for the trap to run inside the call's limit
# moeq's own lines on the console (the reply shows its tail); everything in $OUT/device.log
show() { tee -a "$OUT/device.log" | grep --line-buffered -E '^\[(eval|sweep|quantize|shape)\]|run [0-9]/|routing:|Throughput|Error|error:|Traceback' ; }
t() { echo "== $* ($(date +%T), ${SECONDS}s)"; }
left() { echo $((END - SECONDS > 5 ? END - SECONDS : 5)); }

step_chunk() { mkdir -p /tmp/chunks && cp .device/p*/* /tmp/chunks/ && ls /tmp/chunks | tr '\n' ' '; nvidia-smi -L; }

step_install() {
  step_chunk
  cat /tmp/chunks/part* | python3 -c "import sys,tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall('/tmp', filter='fully_trusted')" || return 1
  python3 -c "import tarfile; tarfile.open('/tmp/chunks/b2.tar.xz').extractall('/tmp', filter='fully_trusted')" || return 1
  mkdir -p $W/pkg/moeq && ln -sfn "$PWD/quantize" $W/pkg/moeq/quantize && ln -sfn "$PWD/evaluate" $W/pkg/moeq/evaluate
  # llm-compressor needs compressed-tensors 0.19, vLLM 0.17: the quantize side runs with its own path first
  printf '#!/bin/sh\nPYTHONPATH=/tmp/siteq:/tmp/site:%s exec python3 "$@"\n' $W/pkg > $MOEQ_QUANT_PYTHON && chmod +x $MOEQ_QUANT_PYTHON
  # carried paths vanish from the repository copy at the next call: keep them under /tmp
  rm -rf $MOEQ_CACHE $CHECKPOINTS && cp -r .h200/cache $MOEQ_CACHE && mkdir -p $CHECKPOINTS && cp -r checkpoints/.shape-only $CHECKPOINTS/
  # a later session continues the committed ledger: cells it already holds are skipped, the rest added
  cp reports/h200/ledger.sqlite $LEDGER && chmod u+w $LEDGER
  python3 -c "import vllm, lm_eval, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)" 2>&1 | tail -1
}

step_sweep() {  # sweep=olmoe,qwen3moe[/bf16,fp8]
  local models=${1%%/*} schemes=; [[ $1 == */* ]] && schemes="--schemes ${1#*/}"
  timeout $(left) python3 -m moeq.evaluate.sweep $PLAN --models "$models" $schemes --ledger $LEDGER --checkpoints $CHECKPOINTS 2>&1 | show sweep
}

step_zipf() {  # OLMoE engines with a Zipf router instead of the dummy one: zipf=1.0[/bf16,fp8]
  local arg=${1:-1.0} schemes=bf16; [[ $arg == */* ]] && schemes=${arg#*/}
  MOEQ_ROUTING=zipf:${arg%%/*} timeout $(left) python3 -m moeq.evaluate.sweep $PLAN --models olmoe --schemes $schemes \
    --ledger $LEDGER --checkpoints $CHECKPOINTS 2>&1 | show zipf
}

step_routing() {  # expert load vLLM routes: dummy routers (uniform?), a Zipf router, and real tiny weights
  local s=$CHECKPOINTS/.shape-only
  timeout $(left) python3 -m moeq.evaluate.routing $s/olmoe/bf16:dummy $s/olmoe/bf16:dummy:zipf1.0 $s/mixtral/bf16:dummy:l8 \
    $MOEQ_CACHE/models/tiny $MOEQ_CACHE/models/tiny:dummy --prompts 16 --input-len 512 --out $W/routing.json \
    --engine-arg gpu_memory_utilization=0.3 --engine-arg kv_cache_memory_bytes=4294967296 2>&1 | show routing
}

step_real() {  # the embedded model with real weights: quantized here on the GPU, then perf + accuracy
  local schemes=${1:-fp8,fp8-static,w4a16-gptq,w8a8-int8}
  timeout $(left) $MOEQ_QUANT_PYTHON -m moeq.quantize.cli quantize --model tiny --scheme $schemes --out $CHECKPOINTS 2>&1 | show real
  timeout $(left) python3 -m moeq.quantize.cli eval --model tiny --scheme bf16,$schemes --ledger $LEDGER --checkpoints $CHECKPOINTS \
    --engine-arg "compilation_config=$ENGINE" 2>&1 | show real
  for s in ${schemes//,/ }; do cp -f $CHECKPOINTS/tiny/$s/manifest.json $W/manifest-$s.json; done
}

step_bench() {  # vLLM's own tool on cells moeq measured: bench=olmoe/bf16/128,olmoe/w4a16-gptq/16
  for cell in ${1//,/ }; do
    IFS=/ read -r model scheme batch <<< "$cell"
    # vLLM's CLI entry point imports its server (uvicorn, not carried); the bench module itself does not
    timeout $(left) python3 -c "import sys; from vllm.benchmarks.throughput import add_cli_args, main; from vllm.utils.argparse_utils import FlexibleArgumentParser as P; p = P(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))" --model $CHECKPOINTS/.shape-only/$model/$scheme \
      --tokenizer $MOEQ_CACHE/models/tiny --load-format dummy --dataset-name random --random-input-len 512 --random-output-len 128 \
      --num-prompts $batch --num-warmups $batch --max-num-seqs 128 --max-model-len 2176 \
      --dtype bfloat16 --no-enable-prefix-caching --gpu-memory-utilization 0.9 --disable-detokenize \
      --compilation-config "$ENGINE" --output-json $W/bench-$model-$scheme-b$batch.json 2>&1 | show bench
  done
}

for step in "$@"; do
  name=${step%%=*}; arg=; [[ $step == *=* ]] && arg=${step#*=}
  t "$step"; step_$name $arg
done
t done
