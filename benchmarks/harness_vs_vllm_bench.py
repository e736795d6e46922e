"""Benchmark (not a test): what moeq's measuring harness costs, and how its throughput for one cell
compares with vLLM's own `vllm bench throughput` on the same settings, as ratios from one run.

    .venv/serve/bin/python benchmarks/harness_vs_vllm_bench.py [--model PATH] [--batch 8] [--input-len 512]
        [--weights dummy --tokenizer DIR] [--engine-process inprocess,separate] [--out result.json]

Both run with the engine settings `moeq eval` builds (evaluate/settings.py; shape-only folders with
vLLM's uniform_random routing, as the sweep), so the ratio compares the harnesses, not their settings.
Each side warms up first (the bench: one untimed pass of as many prompts). `--engine-process` runs
moeq's cell with vLLM's engine in this process (how `moeq eval` runs it) and/or in vLLM's own engine
process (how the bench and a server run it). On the H200 (reports/h200/NOTES.md) the engine process
made no difference (19,255 vs 19,109 tok/s, Mixtral fp8 b128); the bench's repeated prompts hitting vLLM's
prefix cache made all of its 1.48x, so the bench runs with prefix caching off. Every side starts its own
engine, one at a time, each in a fresh process; moeq's sides also time the same engine with the bench's
sampling (temperature 1, no min_tokens).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROCESS_ENV = {"inprocess": "0", "separate": "1"}  # VLLM_ENABLE_V1_MULTIPROCESSING


def engine_settings(a):
    import torch
    from moeq.evaluate import settings
    return settings.build(gpu=torch.cuda.is_available(), cells=[(a.batch, a.input_len, a.output_len)],
                          shape_only=a.weights == "dummy")


def moeq_cell(a) -> dict:
    """One engine in this (fresh) process: moeq's perf cell, as `moeq eval` measures it."""
    s = engine_settings(a)
    os.environ.update(s.environment())
    from vllm import LLM
    from moeq.evaluate import perf
    extra = {"load_format": "dummy", "skip_tokenizer_init": True} if a.weights == "dummy" else {}
    t0 = time.perf_counter()
    llm = LLM(model=a.model, **s.llm, **extra)
    load = time.perf_counter() - t0
    vocab = llm.llm_engine.model_config.get_vocab_size()
    metrics = {m["metric"]: m for m in perf.run_cell(llm, a.batch, a.input_len, a.output_len, vocab, a.repeats,
                                                     s.warmup_tokens, log=lambda *_: None)}
    # the same engine and prompts with the bench's sampling (temperature 1, no min_tokens): separates sampling
    # from everything else moeq's cell does
    from vllm import SamplingParams
    bench_sampling = SamplingParams(n=1, temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=a.output_len,
                                    detokenize=False)
    make = perf.prompt_maker(perf.RANDOM, llm, vocab)
    plain = []
    for rep in range(a.repeats):
        prompts = make(a.batch, a.input_len, f"bench-sampling-{rep}")
        t0 = time.perf_counter()
        llm.generate(prompts, bench_sampling, use_tqdm=False)
        plain.append(a.batch * (a.input_len + a.output_len) / (time.perf_counter() - t0))
    return {"load_s": load, "warmup_s": metrics["warmup"]["value"], "runs_s": metrics["latency"]["repeats"],
            "throughput": metrics["throughput"]["value"], "output_throughput": metrics["output_throughput"]["value"],
            "bench_sampling_throughput": sorted(plain)[len(plain) // 2], "bench_sampling_runs": plain}


def vllm_bench(a) -> dict:
    """vLLM's own tool, through its module (its CLI entry point also imports the server's dependencies)."""
    s = engine_settings(a)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-c", "import sys; from vllm.benchmarks.throughput import add_cli_args, main; "
               "from vllm.utils.argparse_utils import FlexibleArgumentParser as P; p = P(); add_cli_args(p); "
               "main(p.parse_args(sys.argv[1:]))",
               "--model", a.model, "--dataset-name", "random", "--random-input-len", str(a.input_len),
               "--random-output-len", str(a.output_len), "--num-prompts", str(a.batch), "--num-warmups", str(a.batch),
               "--max-model-len", str(s.llm["max_model_len"]), "--output-json", f"{tmp}/out.json",
               # its random prompts can repeat (with a small word tokenizer most do: H200 session 6), and cached
               # prefixes skip prefill that moeq's never-repeating prompts pay for
               "--no-enable-prefix-caching"]
        if a.weights == "dummy":
            cmd += ["--load-format", "dummy", "--tokenizer", a.tokenizer]
        if "kv_cache_memory_bytes" in s.llm:
            cmd += ["--kv-cache-memory-bytes", str(s.llm["kv_cache_memory_bytes"])]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, **s.environment()})
        result = json.loads(Path(f"{tmp}/out.json").read_text())
    result["wall_s"] = time.perf_counter() - t0
    return result


def side(a, process: str) -> dict:
    """moeq's cell in a fresh interpreter, so each side gets its own engine and CUDA context."""
    # engine_settings() initializes CUDA before LLM() starts: a forked engine process could not use it
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": PROCESS_ENV[process], "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "side.json"  # vLLM prints on stdout too, also at exit
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one-side", process, "--side-out", str(out)],
                              capture_output=True, text=True, env=env)
        if proc.returncode or not out.exists():
            sys.exit(f"moeq's cell ({process} engine) failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(Path.home() / ".cache" / "moeq" / "models" / "tiny"))
    p.add_argument("--weights", choices=["real", "dummy"], default="real")
    p.add_argument("--tokenizer", help="with --weights dummy: a tokenizer folder for the bench's random prompts")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--engine-process", default="inprocess", help="comma list of: " + ", ".join(PROCESS_ENV))
    p.add_argument("--out", help="also write the numbers here as JSON")
    p.add_argument("--one-side", choices=list(PROCESS_ENV), help=argparse.SUPPRESS)
    p.add_argument("--side-out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one_side:
        Path(a.side_out).write_text(json.dumps(moeq_cell(a)))
        return
    processes = a.engine_process.split(",")
    if bad := [x for x in processes if x not in PROCESS_ENV]:
        p.error(f"--engine-process {','.join(bad)}: valid: {', '.join(PROCESS_ENV)}")
    if a.weights == "dummy" and not a.tokenizer:
        p.error("--weights dummy needs --tokenizer (the bench makes its random prompts with one)")
    cell = f"batch {a.batch}, {a.input_len} in / {a.output_len} out"
    result = {"cell": cell, "model": a.model, "weights": a.weights, "moeq": {}}
    for process in processes:
        ours = result["moeq"][process] = side(a, process)
        print(f"moeq ({process} engine, {cell}): {ours['throughput']:10,.1f} tok/s total, "
              f"{ours['output_throughput']:9,.1f} output tok/s; load {ours['load_s']:.1f}s, warm-up "
              f"{ours['warmup_s']:.2f}s, timed runs {', '.join(f'{t:.2f}s' for t in ours['runs_s'])}; with the bench's "
              f"sampling {ours['bench_sampling_throughput']:,.1f} tok/s", flush=True)
    theirs = result["vllm_bench"] = vllm_bench(a)
    print(f"vllm bench (its own engine process, one warm-up pass): {theirs['tokens_per_second']:10,.1f} tok/s "
          f"total ({theirs['wall_s']:.1f}s wall incl. its engine start)")
    for process, ours in result["moeq"].items():
        print(f"ratio moeq ({process}) / vllm bench throughput: {ours['throughput'] / theirs['tokens_per_second']:.3f}")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
