"""Performance cells inside one vLLM engine: TTFT, ITL, throughput, memory.

A cell is (batch, input_len, output_len). Per cell: one untimed warm-up of the same shape (MoE kernels
compile per token-count bucket), then `repeats` timed runs. Prompts are random token ids, seeded by
cell and run so that no two runs share a prefix (prefix caching stays at vLLM's default without
serving one run from another's cache); generation ignores EOS, so every run does the same work.

Latency as the field means it: TTFT p50/p99 over the requests of a run, ITL p50/p99 over every
inter-token gap of every request (vLLM's own per-token statistic, `inter_token_latencies_iter`, the
source of its `vllm:inter_token_latency_seconds` metric), each then summarised over the runs.
"""
import statistics
import time
import zlib

import numpy as np


def cell_name(batch: int, input_len: int, output_len: int) -> str:
    return f"b{batch}-i{input_len}-o{output_len}"


def prompts(batch: int, input_len: int, vocab: int, seed: int | str):
    from vllm.inputs import TokensPrompt
    rng = np.random.default_rng(zlib.crc32(str(seed).encode()))
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


class TokenTimings:
    """A stat logger vLLM calls after every engine step with that step's per-token statistics.
    Appended to the engine's own loggers (needs disable_log_stats=False), it only reads them."""

    def __init__(self, llm):
        self.itl, self.ttft = [], []
        manager = llm.llm_engine.logger_manager
        if manager is None:
            raise RuntimeError("vLLM collects no request statistics (the engine needs disable_log_stats=False)")
        manager.stat_loggers.append(self)

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        if iteration_stats is not None:
            self.itl.extend(iteration_stats.inter_token_latencies_iter)

    def take(self) -> list[float]:
        gaps, self.itl = self.itl, []
        return gaps

    def log(self):
        pass

    def log_engine_initialized(self):
        pass

    def record_sleep_state(self, *args, **kwargs):
        pass


def summarize(name: str, unit: str, values: list[float]) -> dict:
    """Median of the repeats, with the spread as (max - min) / median, the repeats kept for the report."""
    med = statistics.median(values)
    return {"metric": name, "value": med, "unit": unit, "n": len(values),
            "spread": (max(values) - min(values)) / med if med else 0.0, "spread_kind": "range/median",
            "repeats": values}


def run_cell(llm, batch: int, input_len: int, output_len: int, vocab: int, repeats: int,
             warmup_tokens: int | None = None, timings: TokenTimings | None = None, log=print) -> list[dict]:
    from vllm import SamplingParams
    sampling = lambda n: SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0.0, detokenize=False)
    params = sampling(output_len)
    name = cell_name(batch, input_len, output_len)
    timings = timings or TokenTimings(llm)
    # A shorter warm-up decode runs the same prefill chunks and decode batch, so the same kernels compile.
    warm = sampling(min(output_len, warmup_tokens or output_len))
    t0 = time.perf_counter()
    llm.generate(prompts(batch, input_len, vocab, seed=f"{name}-warmup"), warm, use_tqdm=False)
    warmup = time.perf_counter() - t0
    timings.take()
    runs = {k: [] for k in ("latency", "ttft", "ttft_p50", "ttft_p99", "itl_mean", "itl_p50", "itl_p99",
                            "throughput", "output_throughput")}
    for rep in range(repeats):
        t0 = time.perf_counter()
        outs = llm.generate(prompts(batch, input_len, vocab, seed=f"{name}-{rep}"), params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        gaps = timings.take()
        generated = [len(o.outputs[0].token_ids) for o in outs]
        if any(g != output_len for g in generated):
            raise RuntimeError(f"expected {output_len} tokens per request, got {sorted(set(generated))}")
        if output_len > 1 and not gaps:
            raise RuntimeError("vLLM reported no inter-token gaps (engine must run with log stats enabled)")
        ttfts = [o.metrics.first_token_latency for o in outs if o.metrics is not None]
        if len(ttfts) != batch:
            raise RuntimeError("vLLM returned no request metrics (engine must run with log stats enabled)")
        for metric, value in (("latency", elapsed), ("ttft", statistics.mean(ttfts)),
                              ("ttft_p50", _percentile(ttfts, 50)), ("ttft_p99", _percentile(ttfts, 99)),
                              ("itl_mean", statistics.mean(gaps) if gaps else 0.0),
                              ("itl_p50", _percentile(gaps or [0], 50)), ("itl_p99", _percentile(gaps or [0], 99)),
                              ("throughput", batch * (input_len + output_len) / elapsed),  # the guide's formula
                              ("output_throughput", batch * output_len / elapsed)):
            runs[metric].append(value)
        log(f"    {name} run {rep + 1}/{repeats}: {elapsed:.3f}s, {runs['throughput'][-1]:,.0f} tok/s, "
            f"TTFT {1e3 * runs['ttft'][-1]:.1f} ms, ITL p50 {1e3 * runs['itl_p50'][-1]:.2f} ms")
    units = {"throughput": "tok/s", "output_throughput": "tok/s"}
    return [summarize(m, units.get(m, "s"), v) for m, v in runs.items()] + [
        {"metric": "warmup", "value": warmup, "unit": "s", "n": 1}]
