"""Which experts the calibration tokens are routed to: llm-compressor calibrates every expert on all
tokens (moe_calibrate_all_experts), but a user should still see how the router spreads real data."""
import contextlib
import re

import torch

from moeq import registry


def routers(model, ignore: list[str]) -> dict[str, torch.nn.Module]:
    """The router gates: ignored modules (by the registry's patterns) whose weight maps hidden -> experts."""
    n_experts = registry.experts_per_layer(model.config)
    patterns = [re.compile(p[3:]) for p in ignore if p.startswith("re:")]
    return {name: m for name, m in model.named_modules()
            if any(p.match(name) for p in patterns)
            and getattr(m, "weight", None) is not None and m.weight.dim() == 2 and m.weight.shape[0] == n_experts}



def fits_on_gpu(weight_bytes: int, free_bytes: int, headroom: float = 0.8) -> bool:
    return weight_bytes <= headroom * free_bytes


@contextlib.contextmanager
def on_gpu_if_it_fits(model):
    """A model loaded on the CPU (as llm-compressor takes it: its pipelines place layers themselves) runs its
    counting pass on the GPU when its weights fit there, and goes back to the CPU afterwards. On the CPU,
    moe-500m's 131k calibration tokens took 3.5-6.7 minutes of an H200 lease per scheme (session 7)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.device.type != "cpu" or not torch.cuda.is_available() or not fits_on_gpu(weights, torch.cuda.mem_get_info()[0]):
        yield
        return
    model.to("cuda")
    try:
        yield
    finally:
        model.to("cpu")
        torch.cuda.empty_cache()


@torch.no_grad()
def count_routing(model, samples: list[list[int]], ignore: list[str], batch: int = 8) -> dict:
    """Tokens routed (top-k) to each expert of each MoE layer over the calibration samples."""
    top_k = model.config.num_experts_per_tok
    found = routers(model, ignore)
    if not found:
        raise RuntimeError("no router gates matched the model's ignore patterns; coverage cannot be counted")
    counts = {name: torch.zeros(registry.experts_per_layer(model.config), dtype=torch.long) for name in found}

    def hook(name):
        def fn(module, args):
            x = args[0].reshape(-1, module.weight.shape[1])
            idx = torch.nn.functional.linear(x.to(module.weight.dtype), module.weight).topk(top_k, dim=-1).indices
            counts[name] += torch.bincount(idx.flatten().cpu(), minlength=len(counts[name]))
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in found.items()]
    try:
        with on_gpu_if_it_fits(model):
            for i in range(0, len(samples), batch):
                model(input_ids=torch.tensor(samples[i:i + batch], device=model.device))
    finally:
        for h in handles:
            h.remove()
    return summarize({name: c.tolist() for name, c in counts.items()}, sum(len(s) for s in samples), top_k)


def summarize(routed: dict[str, list[int]], n_tokens: int, top_k: int, starved_below: float = 0.05) -> dict:
    """Per layer, the experts that got under `starved_below` of a fair share (tokens x top_k / experts)."""
    fair = n_tokens * top_k / len(next(iter(routed.values())))
    starved = {name: [e for e, c in enumerate(counts) if c < starved_below * fair] for name, counts in routed.items()}
    return {"tokens": n_tokens, "top_k": top_k, "fair_share": fair, "routed": routed,
            "starved": {name: e for name, e in starved.items() if e},
            "min_share_of_fair": min(min(c) for c in routed.values()) / fair}
