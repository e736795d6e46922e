"""Roofline floors for a perf cell: the least time the device could take, from its peak rates.

Decode step at batch B: read the dense weights, the experts the B tokens touch and the KV cache (in the
layout vLLM stores, MLA included) once, at peak memory bandwidth; or do
2 * active params FLOPs per token at peak tensor rate, whichever takes longer. Prefill: the same for
B * input_len tokens. Latency floor = prefill + (output_len - 1) decode steps at the mean context.
Attention FLOPs are left out, so every figure here stays a floor (throughput: a ceiling). Experts
touched per MoE layer: under balanced routing (vLLM's uniform_random simulation) the expected number of
distinct experts, E * (1 - (1 - k/E)^B); under any other routing (a model's own routers, skewed
simulations) only the certain minimum, k, since a router may send every token to the same k experts.
"""
import re
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import yaml

DEVICES_FILE = Path(__file__).with_name("devices.yaml")
CONFIG_KEYS = ("hidden_size", "num_layers", "num_experts", "top_k", "vocab_size", "num_kv_heads", "head_dim",
               "params_active", "params_dense", "params_per_expert", "moe_layers", "weight_bits", "activation_bits")


@lru_cache(maxsize=None)
def devices() -> list[dict]:
    return yaml.safe_load(DEVICES_FILE.read_text())["devices"]


def match_device(name: str, gpus: int = 1) -> dict | None:
    """The device's peak rates; for an engine over several GPUs (TP, PP, DP) their sum, an upper bound
    that ignores communication, so a cell faster than it is still impossible."""
    d = next((d for d in devices() if re.search(d["match"], name, re.IGNORECASE)), None)
    if d is None or gpus == 1:
        return d
    return {**d, "name": f"{gpus} x {d['name']}", "memory_bandwidth_GBps": gpus * d["memory_bandwidth_GBps"],
            "tflops": {k: gpus * v for k, v in d["tflops"].items()}}


BALANCED = ("uniform_random",)


def experts_touched(num_experts: int, top_k: int, tokens: float, routing: str = "uniform_random") -> float:
    """Distinct experts a layer's router picks for `tokens` tokens: expected under balanced routing,
    else the minimum any routing must touch."""
    if routing not in BALANCED:
        return float(min(top_k, num_experts))
    return num_experts * (1 - (1 - top_k / num_experts) ** tokens)


def precision(config: dict) -> str:
    """Which tensor-core peak applies: 8-bit activations run fp8 or int8 matmuls, others bf16."""
    fmt = config.get("format") or {}
    if config["activation_bits"] >= 16:
        return "bf16"
    return "int8" if fmt.get("activation_type") == "int" else "fp8"


def kv_bytes_per_token(cfg, kv_cache_dtype: str = "auto") -> int:
    """KV cache bytes per token in the layout vLLM stores: MLA (DeepSeek) keeps one compressed latent
    plus the rotary key per layer; other attention keeps K and V per KV head."""
    width = 1 if "fp8" in str(kv_cache_dtype) else 2
    if getattr(cfg, "kv_lora_rank", None):
        return cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * width
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * width


def architecture(cfg, kv_cache_dtype: str = "auto") -> dict:
    """What the roofline needs of an architecture, from its transformers config: shape, KV bytes per token
    and parameter counts (a model on the meta device: no memory), with `params_kept`, the parameters every
    recipe leaves in BF16 (embeddings, lm_head, router gates, norms)."""
    import torch
    from transformers import AutoModelForCausalLM

    from moeq.registry import experts_per_layer
    with torch.device("meta"):
        params = {n: p.numel() for n, p in AutoModelForCausalLM.from_config(cfg).named_parameters()}
    experts = sum(v for n, v in params.items() if ".experts." in n)
    total = sum(params.values())
    moe_layers = len({n.split(".experts.")[0] for n in params if ".experts." in n})
    n_experts, top_k = experts_per_layer(cfg), cfg.num_experts_per_tok
    per_expert = experts // (n_experts * moe_layers)
    kept = sum(v for n, v in params.items() if "embed" in n or "lm_head" in n or n.endswith("gate.weight")
               or "norm" in n or ".gate." in n and ".experts." not in n)
    return {"model_type": cfg.model_type, "hidden_size": cfg.hidden_size, "num_layers": cfg.num_hidden_layers,
            "num_experts": n_experts, "top_k": top_k, "vocab_size": cfg.vocab_size,
            "num_kv_heads": getattr(cfg, "num_key_value_heads", cfg.num_attention_heads),
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            "kv_bytes_per_token": kv_bytes_per_token(cfg, kv_cache_dtype),
            "params_total": total, "params_dense": total - experts, "params_per_expert": per_expert,
            "moe_layers": moe_layers, "params_active": total - experts + per_expert * top_k * moe_layers,
            "params_kept": kept}


def floors(config: dict, device: dict, batch: int, input_len: int, output_len: int,
           kv_per_token: float | None = None, routing: str = "uniform_random") -> dict:
    c = config
    bytes_per_param = c["weight_bits"] / 8
    # The input embedding is a row lookup, not a read of the table: leaving one vocab x hidden out keeps
    # this a lower bound whether or not lm_head shares that table.
    dense = c["params_dense"] - c["vocab_size"] * c["hidden_size"]

    def weight_bytes(tokens):
        return bytes_per_param * (dense + c["moe_layers"] * c["params_per_expert"]
                                  * experts_touched(c["num_experts"], c["top_k"], tokens, routing))

    kv = kv_per_token or c.get("kv_bytes_per_token") or kv_bytes_per_token(SimpleNamespace(
        num_hidden_layers=c["num_layers"], num_key_value_heads=c["num_kv_heads"], head_dim=c["head_dim"]))
    bandwidth = device["memory_bandwidth_GBps"] * 1e9
    tflops = device["tflops"]
    peak = (tflops.get(precision(c)) or tflops["bf16"]) * 1e12
    flops_per_token = 2 * c["params_active"]
    prefill = max(weight_bytes(batch * input_len) / bandwidth, flops_per_token * batch * input_len / peak)
    step_memory = (weight_bytes(batch) + batch * (input_len + output_len / 2) * kv) / bandwidth
    step_compute = flops_per_token * batch / peak
    step = max(step_memory, step_compute)
    latency = prefill + (output_len - 1) * step
    return {"ttft_floor": prefill, "itl_floor": step, "latency_floor": latency,
            "throughput_ceiling": batch * (input_len + output_len) / latency,
            "decode_bound": "memory" if step_memory >= step_compute else "compute"}
