"""Performance cells inside one vLLM engine: TTFT, ITL, throughput, memory.

A cell is (batch, input_len, output_len). Per cell: one untimed warm-up of the same shape (MoE kernels
compile per token-count bucket), then `repeats` timed runs. Prompts are random token ids (`random`, the
default) or windows of held-out text (`heldout`: what speculative decoding needs, since neither an n-gram
lookup nor a draft can predict random ids), seeded by cell and run so that no two runs share a prefix
(prefix caching stays at vLLM's default without serving one run from another's cache); generation
ignores EOS, so every run does the same work. With `speculative_config` set, vLLM's acceptance counters
are read around each timed run (speculative.py).

Latency as the field means it: TTFT p50/p99 over the requests of a run, ITL p50/p99 over every
inter-token gap of every request (vLLM's own per-token statistic, `inter_token_latencies_iter`, the
source of its `vllm:inter_token_latency_seconds` metric), each then summarised over the runs.
"""
import statistics
import time
import zlib

import numpy as np

from moeq.evaluate import host


def cell_name(batch: int, input_len: int, output_len: int) -> str:
    return f"b{batch}-i{input_len}-o{output_len}"


RANDOM, HELDOUT = "random", "heldout"
PROMPT_SOURCES = (RANDOM, HELDOUT)


def _rng(seed: int | str):
    return np.random.default_rng(zlib.crc32(str(seed).encode()))


def random_ids(batch: int, input_len: int, vocab: int, seed: int | str) -> list[list[int]]:
    rng = _rng(seed)
    # avoid the first ids, where tokenizers keep special tokens
    return [rng.integers(16, vocab, input_len).tolist() for _ in range(batch)]


def text_windows(stream: list[int], batch: int, input_len: int, seed: int | str) -> list[list[int]]:
    """`batch` windows of exactly `input_len` tokens from a token stream, at distinct seeded starts (two
    prompts share a cached prefix only if they start at the same place)."""
    if len(stream) - input_len < batch:
        raise RuntimeError(f"the held-out text holds {len(stream):,} tokens: too few for {batch} distinct prompts "
                           f"of {input_len} tokens")
    starts = _rng(seed).choice(len(stream) - input_len, batch, replace=False)
    return [stream[s:s + input_len] for s in starts.tolist()]


def heldout_stream(tokenizer) -> list[int]:
    """The held-out split of the standard-library corpus as one token stream (files joined by EOS). It is
    held out for every embedded model: moe-500m's larger corpus splits stdlib files the way tiny's does."""
    from moeq import corpus
    ids = []
    for text in corpus.texts("heldout"):
        ids.extend(tokenizer.encode(text, add_special_tokens=False, verbose=False))  # files exceed model_max_length: no warning
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    return ids


def prompt_maker(source: str, llm, vocab: int):
    """(batch, input_len, seed) -> vLLM token prompts, from random ids or held-out text."""
    from vllm.inputs import TokensPrompt
    if source == HELDOUT:
        stream = heldout_stream(llm.get_tokenizer())
        make = lambda b, n, seed: text_windows(stream, b, n, seed)
    else:
        make = lambda b, n, seed: random_ids(b, n, vocab, seed)
    return lambda b, n, seed: [TokensPrompt(prompt_token_ids=ids) for ids in make(b, n, seed)]


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
             warmup_tokens: int | None = None, timings: TokenTimings | None = None, log=print,
             make_prompts=None, speculating: bool = False) -> list[dict]:
    from vllm import SamplingParams
    from moeq.evaluate import speculative
    make_prompts = make_prompts or prompt_maker(RANDOM, llm, vocab)
    sampling = lambda n: SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0.0, detokenize=False)
    params = sampling(output_len)
    name = cell_name(batch, input_len, output_len)
    timings = timings or TokenTimings(llm)
    # A shorter warm-up decode runs the same prefill chunks and decode batch, so the same kernels compile.
    warm = sampling(min(output_len, warmup_tokens or output_len))
    t0 = time.perf_counter()
    llm.generate(make_prompts(batch, input_len, f"{name}-warmup"), warm, use_tqdm=False)
    warmup = time.perf_counter() - t0
    timings.take()
    runs = {k: [] for k in ("latency", "ttft", "ttft_p50", "ttft_p99", "itl_mean", "itl_p50", "itl_p99",
                            "throughput", "output_throughput")}
    spec = {k: [] for k in ("acceptance_rate", "acceptance_length", "drafts", "draft_tokens", "accepted_tokens")}
    for rep in range(repeats):
        batch_prompts = make_prompts(batch, input_len, f"{name}-{rep}")
        before = speculative.counters(llm) if speculating else None
        t0 = time.perf_counter()
        outs = llm.generate(batch_prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        if speculating:  # counters are read outside the timed span
            for k, v in speculative.acceptance(before, speculative.counters(llm)).items():
                spec[k].append(v)
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
            f"TTFT {1e3 * runs['ttft'][-1]:.1f} ms, ITL p50 {1e3 * runs['itl_p50'][-1]:.2f} ms"
            + (f", acceptance {spec['acceptance_rate'][-1]:.3f}" if speculating else ""))
    units = {"throughput": "tok/s", "output_throughput": "tok/s"}
    out = [summarize(m, units.get(m, "s"), v) for m, v in runs.items()] + [
        {"metric": "warmup", "value": warmup, "unit": "s", "n": 1}] + host.activity()
    if speculating:
        out += [summarize("spec_acceptance_rate", "fraction", spec["acceptance_rate"]),
                summarize("spec_acceptance_length", "tokens/step", spec["acceptance_length"])]
        out += [{"metric": f"spec_{k}", "value": sum(spec[k]), "unit": "tokens" if "tokens" in k else "drafts",
                 "n": repeats, "note": "total over the timed runs"} for k in ("drafts", "draft_tokens", "accepted_tokens")]
    return out
