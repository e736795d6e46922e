"""MoE routing in shape-only runs: measure it, and optionally skew it.

Dummy weights (uniform in ±1e-3) make every router a random projection of a near-random hidden state,
so tokens spread almost evenly over the experts. Real routers are skewed, which changes how many
experts a batch touches (weight bytes read per decode step) and how full each expert's GEMM is.

* `--routing zipf:S` (shape-only runs, evaluate/settings.py): vLLM's routing simulator picks each
  token's top-k experts by Gumbel-top-k over a Zipf(S) law (expert e has weight 1/(e+1)^S), in every
  MoE layer; the routing is part of the rows' engine settings, so they never share a ratio with others.
* `moeq routing CHECKPOINT[:dummy][:ROUTING][:lN] ...`: the expert load that vLLM
  itself routes (enable_return_routed_experts), per layer, as JSON: max/mean load, coefficient of
  variation, normalized entropy (1 = perfectly even). ROUTING is the checkpoint's router by default,
  or one a sweep uses (a vLLM simulation strategy such as uniform_random, or zipfS), so the load of
  the very routing behind a row can be checked.
"""
import os

import numpy as np

STRATEGY = "moeq_zipf"
OWN_ROUTER = "model's router"  # a probe's routing when the checkpoint's own routers picked the experts

# A probe is degenerate when its median layer leaves an expert with no token, or its load's normalized
# entropy is below 0.9: dummy routers that spread tokens score 0.998 or more (H200 probes of four shapes),
# one that sends every token to the same k of E experts scores log k / log E (DeepSeek-V2-Lite's dummy
# router: 6 of 64, 0.43, busiest expert 10.7x the mean). Shape-only rows routed so time those few experts,
# not the model. (A skewed router such as Zipf(1), 0.886, also counts: far from the balance such rows assume.)
DEGENERATE_ENTROPY = 0.9


def degenerate(median: dict) -> bool:
    """Whether a probe's median-layer load (load_stats' "median") is too concentrated to stand for a model."""
    return median["min_over_mean"] == 0 or median["entropy"] < DEGENERATE_ENTROPY


def install(s: float):
    """Register the Zipf strategy with vLLM's routing simulator and select it (before the engine starts)."""
    import torch
    from vllm.model_executor.layers.fused_moe.router.routing_simulator_router import (
        RoutingSimulator, RoutingStrategy)

    class Zipf(RoutingStrategy):
        def route_tokens(self, hidden_states, router_logits, top_k, indices_type=None):
            n, e = router_logits.shape[0], router_logits.shape[-1]
            logp = -s * torch.log(torch.arange(1, e + 1, device=router_logits.device, dtype=torch.float32))
            gumbel = -torch.log(-torch.log(torch.rand(n, e, device=router_logits.device).clamp_(1e-20, 1.0)))
            ids = torch.topk(logp + gumbel, top_k, dim=-1).indices  # k distinct experts, Zipf-weighted
            weights = torch.full((n, top_k), 1.0 / top_k, device=router_logits.device, dtype=torch.float32)
            return weights, ids.to(indices_type or torch.int32)  # as vLLM's fused_topk

    RoutingSimulator.register_strategy(STRATEGY, Zipf())
    os.environ["VLLM_MOE_ROUTING_SIMULATION_STRATEGY"] = STRATEGY


def load_stats(routed: np.ndarray, num_experts: int) -> dict:
    """routed: [tokens, layers, top_k] expert ids -> per-layer load statistics and their medians."""
    layers = []
    for layer in range(routed.shape[1]):
        load = np.bincount(routed[:, layer].ravel(), minlength=num_experts).astype(float)
        p = load / load.sum()
        nz = p[p > 0]
        layers.append({"max_over_mean": float(load.max() / load.mean()), "cv": float(load.std() / load.mean()),
                       "entropy": float(-(nz * np.log(nz)).sum() / np.log(num_experts)),
                       "min_over_mean": float(load.min() / load.mean())})
    summary = {k: float(np.median([l[k] for l in layers])) for k in layers[0]}
    return {"tokens": int(routed.shape[0]), "layers": len(layers), "median": summary, "per_layer": layers}


def probe(path: str, dummy: bool, routing: str, layers: int | None, prompts: int, input_len: int,
          seed: int = 0, **engine) -> dict:
    """One engine (eager, routed-expert capture on) over random-token prompts; the load it routed."""
    import gc
    import torch
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams, envs
    from vllm.inputs import TokensPrompt
    envs.disable_envs_cache()  # the router kind is read from the environment at each engine's start
    from moeq.evaluate.settings import MODEL_ROUTING, ROUTING_ENV, parse_zipf
    os.environ.pop(ROUTING_ENV, None)
    if routing.startswith("zipf:"):
        install(parse_zipf(routing))
    elif routing != MODEL_ROUTING:
        os.environ[ROUTING_ENV] = routing
    cfg = AutoConfig.from_pretrained(path)
    from moeq.registry import experts_per_layer
    experts = experts_per_layer(cfg)
    args = dict(enforce_eager=True, enable_return_routed_experts=True, enable_prefix_caching=False, seed=seed,
                max_model_len=input_len + 8, dtype="bfloat16", **engine)
    if dummy:
        args.update(load_format="dummy", skip_tokenizer_init=True)
    if layers:
        args["hf_overrides"] = {"num_hidden_layers": layers}
    llm = LLM(model=path, **args)
    rng = np.random.default_rng(seed)
    batch = [TokensPrompt(prompt_token_ids=rng.integers(16, cfg.vocab_size, input_len).tolist()) for _ in range(prompts)]
    outs = llm.generate(batch, SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False)
    routed = np.concatenate([o.outputs[0].routed_experts for o in outs], axis=0)
    del llm, outs
    gc.collect()
    torch.cuda.empty_cache()
    return {"checkpoint": path, "weights": "dummy" if dummy else "real",
            "routing": routing if routing != MODEL_ROUTING else OWN_ROUTER, "num_experts": experts,
            **load_stats(routed, experts)}
