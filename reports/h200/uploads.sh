#!/usr/bin/env bash
# Here, before a device session: every git-ignored upload device.sh carries, made from a bare checkout (session 10's
# checkout had none of session 9's: folders outside git do not outlive a session). ~10 min on the 2-core machine,
# most of it `make setup`, tiny's build and the shape-only folders; what exists is kept.
#   bash reports/h200/uploads.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
BUNDLE="python3 ../shared/device/bundle.py"
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo /.device/ >> .git/info/exclude
grep -qx '/.h200/' .git/info/exclude 2>/dev/null || echo /.h200/ >> .git/info/exclude
make setup >/dev/null
# vLLM 0.26.0 and what it needs beyond the image, in parts that fit one call beside the tracked tree (64 MiB)
tree=$(( $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) / 2**20 ))
part=$(( 62 - tree - 4 ))  # 4 MiB for .h200/src and the call's own files
vllm_parts() { ls .device/p[0-9]*/part* | sort -t/ -k3; }  # by part number: p10 sorts before p2 as a folder
[ -d .device/p0 ] || $BUNDLE --out .device --part-mib $part vllm==0.26.0 pycountry gguf diskcache apache-tvm-ffi==0.1.15.post2
if [ "$(stat -c %s .device/p0/part00)" -gt $(( part * 2**20 )) ]; then  # the tree grew since they were cut:
  tmp=$(mktemp -d) && vllm_parts | xargs cat > "$tmp/all" && rm -rf .device/p[0-9]*  # same bytes
  split -b ${part}M -d -a 2 "$tmp/all" "$tmp/part" && rm "$tmp/all"
  for f in "$tmp"/part*; do n=$((10#${f##*part})); mkdir -p .device/p$n && mv "$f" .device/p$n/; done; rm -rf "$tmp"
  echo "vLLM parts re-cut at $part MiB: $(ls -d .device/p[0-9]* | wc -l) parts"
fi
[ -d .device/quant ] || $BUNDLE --out .device/quant --part-mib 34 llmcompressor==0.14.0.1 compressed-tensors==0.19.0
if [ ! -d .device/eval ]; then  # lm-eval beside vLLM: what the vLLM bundle holds is left out (BUILD-PLAN.md)
  skip=$(vllm_parts | xargs cat | tar t | sed -n 's#^whl/##p' | sed -E 's/-[0-9].*//' | tr 'A-Z_' 'a-z-' | sort -u | tr '\n' ,)
  $BUNDLE --out .device/eval --part-mib 34 lm-eval==0.4.13 nltk --skip "${skip}sqlitedict,word2number,rouge-score"
  tmp=$(mktemp -d) && cat .device/eval/p*/part* | tar x -C "$tmp"
  # PyPI has sdists only for these (rouge-score no wheel newer than 0.0.4); pytz is typepy[datetime]'s, an extra the resolver skips
  python3 -m pip wheel -q --no-deps -w "$tmp/whl" sqlitedict==2.1.0 word2number==1.1 rouge-score==0.1.2
  python3 -m pip download -q --no-deps -d "$tmp/whl" pytz
  rm -rf .device/eval && mkdir -p .device/eval/p0 && tar cf .device/eval/p0/part00 -C "$tmp" whl && rm -rf "$tmp"
fi
[ -d .device/serve ] || python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .device/serve uvicorn==0.54.0 python-multipart==0.0.34 watchfiles==1.3.0 httptools==0.9.0 websockets==17.4 \
  model-hosting-container-standards==0.1.16 jmespath==1.1.0 supervisor==4.3.0
# humming imports elftools at start (session 23: without pyelftools vLLM called the kernel unsupported on the H200)
ls .device/humming/pyelftools-* >/dev/null 2>&1 ||
  python3 -m pip download -q --no-deps humming-kernels==0.1.10 pyelftools==0.33 -d .device/humming
# tiny for the build's bits-per-byte comparison, the word tokenizer vLLM's random dataset needs, shape-only folders
mkdir -p .h200
[ -d .h200/tiny ] || cp -r "$(.venv/quant/bin/moeq build tiny | tail -n 1)" .h200/tiny
grep -q '"▁t0"' .h200/tokenizer/tokenizer.json 2>/dev/null || rm -rf .h200/tokenizer  # older: no separator in its entries (NOTES, s17)
[ -d .h200/tokenizer ] || .venv/quant/bin/python -c "from pathlib import Path; from moeq.quantize.shape import word_tokenizer; word_tokenizer(32000, Path('.h200/tokenizer'))"
for model in qwen3moe mixtral olmoe deepseek-v2-lite; do
  for scheme in bf16 fp8 w8a16 w4a16-gptq fp8-block fp8-static w8a8-int8; do  # plan.yaml's
    out=checkpoints/.shape-only/$model/$scheme
    [ -f $out/.moeq-complete ] || .venv/quant/bin/moeq shape $model $scheme $out >/dev/null
  done
done
for shape in glm-4.5-air/bf16 glm-4.5-air/fp8 glm-4.5-air/w4a16-gptq \
    qwen3-235b-a22b/bf16 qwen3-235b-a22b/fp8 qwen3-235b-a22b/fp8-block qwen3-235b-a22b/w4a16-gptq; do  # h200x2, h200x4 plans
  out=checkpoints/.shape-only/$shape
  [ -f $out/.moeq-complete ] || .venv/quant/bin/moeq shape ${shape%/*} ${shape#*/} $out >/dev/null
done
rm -rf .h200/src && mkdir -p .h200/src && git archive HEAD core quantize evaluate recipes benchmarks reports/h200/device.sh \
  'reports/h200*/plan*.yaml' | tar x -C .h200/src
du -sh .device/p* .device/quant .device/eval .device/serve .device/humming .h200/* checkpoints/.shape-only | tr '\n' ' '; echo
echo "tracked tree ${tree} MiB; commit $(git rev-parse HEAD) archived in .h200/src"
