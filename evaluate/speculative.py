"""Speculative decoding in perf cells (issue 12, claim 6).

The engine argument `speculative_config` is checked before any engine starts; a draft is given by its
registry name (`{"model": "tiny-draft", "num_speculative_tokens": 3}`), which the settings record, so
rows pair across machines whose model caches differ, and which is resolved to the built folder only
when the engine is made. vLLM's acceptance counters are read around each timed run.
"""
import dataclasses
import json
import typing
from pathlib import Path

from moeq import identity, registry
from moeq.atomic import is_complete
from moeq.errors import UserError

KEY = "speculative_config"
NONE = "none"  # the label of an engine without speculation (the report's reference)
EXAMPLES = ('{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}',
            '{"model": "tiny-draft", "num_speculative_tokens": 3}')
# vLLM's spec-decode counters (vllm/v1/spec_decode/metrics.py), cumulative over the engine's life
COUNTERS = {"drafts": "vllm:spec_decode_num_drafts", "draft_tokens": "vllm:spec_decode_num_draft_tokens",
            "accepted_tokens": "vllm:spec_decode_num_accepted_tokens"}


def drafts() -> dict[str, str]:
    """Registry drafts -> the target each is for (`draft_for`)."""
    return {n: s["draft_for"] for n, s in registry.registry().items() if s.get("draft_for")}


def _flat(t) -> list[str]:
    return [x for a in typing.get_args(t) for x in (_flat(a) if typing.get_args(a) else [a])]


def vllm_choices() -> tuple[list[str], list[str]]:
    """vLLM's SpeculativeConfig fields and methods, as the installed vLLM defines them."""
    from vllm.config.speculative import SpeculativeConfig, SpeculativeMethod
    return [f.name for f in dataclasses.fields(SpeculativeConfig)], _flat(SpeculativeMethod)


def check(config, shape_only: bool, fields: list[str] | None = None, methods: list[str] | None = None):
    """A speculative_config vLLM can take, with a draft that exists; raises UserError naming the bad value."""
    if config is None:
        return
    if not isinstance(config, dict):
        raise UserError(f"{KEY} {config!r}: expected a mapping, e.g. {EXAMPLES[0]} or {EXAMPLES[1]}")
    if shape_only:
        raise UserError(f"{KEY} needs real weights: with dummy weights (WEIGHTS=dummy) the draft predicts nothing, "
                        "so acceptance and speedup would measure nothing")
    if fields is None or methods is None:
        fields, methods = vllm_choices()
    if bad := sorted(set(config) - set(fields)):
        raise UserError(f"{KEY}: unknown key {bad[0]!r}; valid: {', '.join(sorted(fields))}")
    method, model = config.get("method"), config.get("model")
    if method is not None and method not in methods:
        raise UserError(f"{KEY}: unknown method {method!r}; valid: {', '.join(methods)}")
    if method is None and model is None:
        raise UserError(f"{KEY} needs a method or a draft model, e.g. {EXAMPLES[0]} or {EXAMPLES[1]}")
    n = config.get("num_speculative_tokens")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise UserError(f"{KEY}: num_speculative_tokens {n!r}: expected a whole number >= 1")
    if model is not None and model not in drafts() and not Path(str(model)).expanduser().is_dir():
        raise UserError(f"{KEY}: unknown draft model {model!r}; valid: {', '.join(drafts()) or 'none registered'} "
                        "(registry drafts), or a path to a checkpoint folder")


def draft_path(config: dict | None) -> Path | None:
    """The folder of the config's draft model (a built registry draft, or a folder); None without one."""
    model = (config or {}).get("model")
    if model is None:
        return None
    if model not in drafts():
        return Path(str(model)).expanduser().resolve()
    path = registry.resolve(model).path
    if not is_complete(path):
        raise UserError(f"the draft {model} is not built yet: run `moeq build {model}` (quantize environment) first")
    return path


def engine_args(llm: dict) -> dict:
    """The settings' engine arguments with a registry draft replaced by its folder, for vllm.LLM."""
    config = llm.get(KEY)
    if not config or config.get("model") is None:
        return dict(llm)
    return {**llm, KEY: {**config, "model": str(draft_path(config))}}


def draft_identity(config: dict | None) -> str | None:
    """What the draft is, recorded with each cell: its name and the digest of its weights."""
    path = draft_path(config)
    return f"{config['model']} {identity.source_identity(path)['digest']}" if path else None


def label(config: dict | None) -> str:
    """A short name of the speculation an engine ran, the report's `speculation` coordinate: none, ngram,
    or draft:<model>; other settings of it (token counts) appended as k=v."""
    if not config:
        return NONE
    head = f"draft:{Path(str(config['model'])).name}" if config.get("model") else str(config.get("method"))
    rest = {k: v for k, v in config.items() if k not in ("model", "method")}
    return head + "".join(f" {k}={json.dumps(v)}" for k, v in sorted(rest.items()))


def counters(llm) -> dict[str, float]:
    """vLLM's cumulative spec-decode counters now (0 where vLLM has not created one yet)."""
    wanted = {name: key for key, name in COUNTERS.items()}
    out = dict.fromkeys(COUNTERS, 0.0)
    for metric in llm.get_metrics():
        if metric.name in wanted:
            out[wanted[metric.name]] += float(metric.value)
    return out


def acceptance(before: dict, after: dict) -> dict[str, float]:
    """One run's drafts, draft tokens and accepted tokens, its acceptance rate (accepted / drafted) and
    mean acceptance length (tokens per target step: 1 + accepted / drafts, vLLM's convention)."""
    d = {k: after[k] - before[k] for k in COUNTERS}
    if d["drafts"] <= 0 or d["draft_tokens"] <= 0:
        raise RuntimeError(f"vLLM counted no speculative drafts in a run with {KEY} set ({d}): the engine did not "
                           "speculate, or its spec-decode metrics are not collected (disable_log_stats=False)")
    return {**d, "acceptance_rate": d["accepted_tokens"] / d["draft_tokens"],
            "acceptance_length": 1 + d["accepted_tokens"] / d["drafts"]}
