"""Benchmark (not a test): what moeq's measuring harness costs, and how its throughput for one cell
compares with vLLM's own `vllm bench throughput` on the same settings, as a ratio from one run.

    .venv/serve/bin/python benchmarks/harness_vs_vllm_bench.py [--model PATH] [--batch 8] [--input-len 512]

Both run with the engine settings `moeq eval` builds (evaluate/settings.py), so the ratio compares the
harnesses, not their settings.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def moeq_cell(model: str, batch: int, inp: int, out: int, repeats: int, engine_args: dict) -> dict:
    from vllm import LLM
    from moeq.evaluate import perf
    t0 = time.perf_counter()
    llm = LLM(model=model, **engine_args)
    load = time.perf_counter() - t0
    vocab = llm.llm_engine.model_config.get_vocab_size()
    metrics = {m["metric"]: m for m in perf.run_cell(llm, batch, inp, out, vocab, repeats, log=lambda *_: None)}
    return {"load_s": load, "warmup_s": metrics["warmup"]["value"], "runs_s": metrics["latency"]["repeats"],
            "throughput": metrics["throughput"]["value"], "output_throughput": metrics["output_throughput"]["value"]}


def vllm_bench(model: str, batch: int, inp: int, out: int, engine_args: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(Path(sys.executable).with_name("vllm")), "bench", "throughput", "--model", model,
               "--dataset-name", "random", "--random-input-len", str(inp), "--random-output-len", str(out),
               "--num-prompts", str(batch), "--max-model-len", str(engine_args["max_model_len"]),
               "--output-json", f"{tmp}/out.json"]
        if "kv_cache_memory_bytes" in engine_args:
            cmd += ["--kv-cache-memory-bytes", str(engine_args["kv_cache_memory_bytes"])]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        result = json.loads(Path(f"{tmp}/out.json").read_text())
    result["wall_s"] = time.perf_counter() - t0
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(Path.home() / ".cache" / "moeq" / "models" / "tiny"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    import torch
    from moeq.evaluate import settings
    args = settings.build(gpu=torch.cuda.is_available(), cells=[(a.batch, a.input_len, a.output_len)],
                          shape_only=False).llm
    ours = moeq_cell(a.model, a.batch, a.input_len, a.output_len, a.repeats, args)
    cell = f"batch {a.batch}, {a.input_len} in / {a.output_len} out"
    print(f"harness cost ({cell}): engine load {ours['load_s']:.1f}s, warm-up {ours['warmup_s']:.2f}s, "
          f"timed runs {', '.join(f'{t:.2f}s' for t in ours['runs_s'])}")
    print(f"moeq:              {ours['throughput']:10,.1f} tok/s total, {ours['output_throughput']:9,.1f} output tok/s",
          flush=True)
    theirs = vllm_bench(a.model, a.batch, a.input_len, a.output_len, args)
    print(f"vllm bench:        {theirs['tokens_per_second']:10,.1f} tok/s total "
          f"({theirs['wall_s']:.1f}s wall incl. its own engine start)")
    print(f"ratio moeq / vllm bench throughput: {ours['throughput'] / theirs['tokens_per_second']:.3f}")


if __name__ == "__main__":
    main()
