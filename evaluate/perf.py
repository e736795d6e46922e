"""Performance cells inside one vLLM engine: TTFT, ITL, throughput, memory.

A cell is (batch, input_len, output_len). Per cell: one untimed warm-up of the same shape (MoE kernels
compile per token-count bucket), then `repeats` timed runs. Prompts are random token ids (seeded),
generation ignores EOS, prefix caching is off in the engine, so every run does the same work.
"""
import os
import statistics
import time

import numpy as np


def cell_name(batch: int, input_len: int, output_len: int) -> str:
    return f"b{batch}-i{input_len}-o{output_len}"


def prompts(batch: int, input_len: int, vocab: int, seed: int):
    from vllm.inputs import TokensPrompt
    rng = np.random.default_rng(seed)
    # avoid the first ids, where tokenizers keep special tokens
    return [TokensPrompt(prompt_token_ids=rng.integers(16, vocab, input_len).tolist()) for _ in range(batch)]


def weights_bytes(llm) -> int:
    """Bytes of parameters and buffers the engine actually holds (quantized weights, scales, ...)."""
    def count(worker):
        model = worker.model_runner.model
        return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return int(sum(llm.collective_rpc(count)))


def kv_cache_tokens(llm) -> int:
    cache = llm.llm_engine.vllm_config.cache_config
    return int((cache.num_gpu_blocks or 0) * cache.block_size)


def _percentile(values, q):
    return float(np.percentile(np.asarray(values), q))


def summarize(name: str, unit: str, values: list[float]) -> dict:
    """Median of the repeats, with the spread as (max - min) / median, the repeats kept for the report."""
    med = statistics.median(values)
    return {"metric": name, "value": med, "unit": unit, "n": len(values),
            "spread": (max(values) - min(values)) / med if med else 0.0, "spread_kind": "range/median",
            "repeats": values}


def run_cell(llm, batch: int, input_len: int, output_len: int, vocab: int, repeats: int, log=print) -> list[dict]:
    from vllm import SamplingParams
    sampling = lambda n: SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0.0, detokenize=False)
    params = sampling(output_len)
    # MOEQ_WARMUP_TOKENS=N shortens only the warm-up's decode (same prefill chunks, same decode batch,
    # so the same kernels compile); saves device time on big models. Default: the full cell.
    warm = sampling(min(output_len, int(os.environ.get("MOEQ_WARMUP_TOKENS", output_len))))
    t0 = time.perf_counter()
    llm.generate(prompts(batch, input_len, vocab, seed=12345), warm, use_tqdm=False)  # warm-up, untimed
    warmup = time.perf_counter() - t0
    lat, ttft, itl_mean, itl_p50, itl_p99, tput, out_tps = [], [], [], [], [], [], []
    for rep in range(repeats):
        batch_prompts = prompts(batch, input_len, vocab, seed=rep)
        t0 = time.perf_counter()
        outs = llm.generate(batch_prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        generated = [len(o.outputs[0].token_ids) for o in outs]
        if any(g != output_len for g in generated):
            raise RuntimeError(f"expected {output_len} tokens per request, got {sorted(set(generated))}")
        stats = [o.metrics for o in outs]
        if any(s is None or not s.first_token_latency for s in stats):
            raise RuntimeError("vLLM returned no request metrics (engine must run with log stats enabled)")
        req_ttft = [s.first_token_latency for s in stats]
        req_itl = [(s.last_token_ts - s.first_token_ts) / max(1, s.num_generation_tokens - 1) for s in stats]
        lat.append(elapsed)
        ttft.append(statistics.mean(req_ttft))
        itl_mean.append(statistics.mean(req_itl))
        itl_p50.append(_percentile(req_itl, 50))
        itl_p99.append(_percentile(req_itl, 99))
        tput.append(batch * (input_len + output_len) / elapsed)  # the seed guide's formula
        out_tps.append(batch * output_len / elapsed)
        log(f"    {cell_name(batch, input_len, output_len)} run {rep + 1}/{repeats}: {elapsed:.3f}s, "
            f"{tput[-1]:,.0f} tok/s, TTFT {1e3 * ttft[-1]:.1f} ms, ITL {1e3 * itl_mean[-1]:.2f} ms")
    return [summarize("latency", "s", lat), summarize("ttft", "s", ttft), summarize("itl_mean", "s", itl_mean),
            summarize("itl_p50", "s", itl_p50), summarize("itl_p99", "s", itl_p99),
            summarize("throughput", "tok/s", tput), summarize("output_throughput", "tok/s", out_tps),
            {"metric": "warmup", "value": warmup, "unit": "s", "n": 1}]
