"""Benchmark (issue 12, claim 7: "fused MoE kernels: +12-18%"): what a fused MoE kernel buys over the
unfused path, on one stack of MoE layers of a real shape (default Mixtral-8x7B's, from core/models.yaml),
BF16, at decode batch sizes.

vLLM has no unfused MoE path (every moe_backend is a fused kernel), so the unfused reference is
transformers' `experts_implementation="eager"`, a Python loop over the experts a batch hits (one pair of
matmuls each), against transformers' own `grouped_mm` and `batched_mm` kernels and, where vLLM imports on a
GPU, vLLM's `fused_experts` (its Triton fused-MoE kernel) on the same weights and the same routing. Each
layer's own router (transformers' MixtralTopKRouter, random weights: near-uniform routing) picks the
experts in every implementation, so all do the same work; their outputs are compared with eager's.

    python benchmarks/fused_moe.py [--model mixtral] [--layers 4] [--batch 1,64] [--out fused_moe.json]
    python benchmarks/fused_moe.py --reduced     # hidden and expert width / 16, 2 layers: runs on a CPU

Prints a table; writes JSON (`--out`): the shape, the libraries, per implementation and batch the median
time of the stack, tokens/s and the speedup over eager, and why an implementation did not run.
"""
import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

REFERENCE = "eager"
TRANSFORMERS_IMPLS = ("eager", "grouped_mm", "batched_mm")
VLLM_IMPL = "vllm_fused_moe"


def shape(model: str, reduced: bool) -> dict:
    from moeq import registry
    cfg = dict(registry.resolve(model, need_weights=False).spec["config"])
    if cfg["model_type"] != "mixtral":
        raise SystemExit(f"--model {model}: this benchmark builds Mixtral MoE blocks; valid: mixtral, tiny, moe-500m")
    if reduced:  # small enough for a CPU run in seconds, same expert count and top-k
        cfg["hidden_size"] //= 16
        cfg["intermediate_size"] //= 16
    return cfg


def build_stack(cfg: dict, layers: int, device: str):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    config = MixtralConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        block = MixtralSparseMoeBlock(config)
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.02)
        blocks.append(block.to(device=device, dtype=torch.bfloat16).eval())
    return config, blocks


def transformers_impls() -> tuple[list[str], dict]:
    """The experts implementations this transformers offers (5.x: an interface of them; 4.x: only its loop)."""
    import transformers
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return [REFERENCE], {i: f"transformers {transformers.__version__} has no experts_implementation"
                             for i in TRANSFORMERS_IMPLS if i != REFERENCE}
    have = [i for i in TRANSFORMERS_IMPLS if i == REFERENCE or i in ALL_EXPERTS_FUNCTIONS]
    return have, {i: f"not in transformers {transformers.__version__}'s ExpertsInterface"
                  for i in TRANSFORMERS_IMPLS if i not in have}


def transformers_forward(config, blocks, impl: str):
    def run(x):
        config._experts_implementation = impl  # every block's experts read it at call time
        for block in blocks:
            out = block(x)
            x = x + (out[0] if isinstance(out, tuple) else out)  # transformers 4.x also returns router logits
        return x
    return run


def vllm_forward(blocks):
    """vLLM's fused-MoE kernel on the same weights (w1 = [E, 2I, H] gate then up, w2 = [E, H, I]: the
    layout transformers stores) and the same router outputs."""
    from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts

    def run(x):
        for block in blocks:
            flat = x.view(-1, x.shape[-1])
            _, weights, ids = block.gate(flat)
            out = fused_experts(flat, block.experts.gate_up_proj, block.experts.down_proj,
                                weights.to(torch.float32), ids.to(torch.int32))
            x = x + out.view_as(x)
        return x
    return run


def vllm_unavailable(device: str, blocks) -> str | None:
    if device != "cuda":
        return "vLLM's fused_experts is a Triton kernel for CUDA/ROCm GPUs; this run is on the CPU"
    if not hasattr(blocks[0].experts, "gate_up_proj"):
        return "this transformers stores experts one module each (4.x); the fused path reads transformers 5's stacked weights"
    try:
        from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts  # noqa: F401
    except Exception as e:  # not installed here, or built without its kernels: say which
        return f"{type(e).__name__}: {e}"
    return None


def timed(fn, x, warmup: int, repeats: int, device: str) -> list[float]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(warmup):
            fn(x)
        sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            sync()
            times.append(time.perf_counter() - t0)
    return times


def routed(fn, x, blocks) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fn(x) and, per layer, the experts its router picked for each token (sorted), read by a hook on the
    routers: every implementation routes through the same router modules."""
    picks = []
    hooks = [b.gate.register_forward_hook(lambda m, i, o: picks.append(o[2].sort(-1).values)) for b in blocks]
    try:
        with torch.inference_mode():
            return fn(x), picks
    finally:
        for h in hooks:
            h.remove()


def routing_agreement(picks: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """Share of (layer, token) pairs routed to the same experts as the reference: a later layer's router sees
    the earlier layers' rounding, and one near-tie flipped changes that token's output by a whole expert."""
    return float(torch.cat([(a == b).all(-1) for a, b in zip(picks, ref)]).float().mean())


def max_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))


def run(args) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = shape(args.model, args.reduced)
    config, blocks = build_stack(cfg, args.layers, device)
    have, missing = transformers_impls()
    impls = {i: transformers_forward(config, blocks, i) for i in have}
    if (reason := vllm_unavailable(device, blocks)) is None:
        impls[VLLM_IMPL] = vllm_forward(blocks)
    else:
        missing[VLLM_IMPL] = reason
    rows = []
    for batch in args.batch:
        x = torch.randn(batch, 1, cfg["hidden_size"], device=device, dtype=torch.bfloat16)  # one decode step
        ref, ref_picks = routed(impls[REFERENCE], x, blocks)
        # the expert weights a step must read: the report's bandwidth floor (sessions 14-16: is a run near it?)
        hit = statistics.mean(p.unique().numel() for p in ref_picks)
        base = None
        for name, fn in impls.items():
            try:
                out, picks = routed(fn, x, blocks)
                err, agree = max_rel_error(out, ref), routing_agreement(picks, ref_picks)
                times = timed(fn, x, args.warmup, args.repeats, device)
            except Exception as e:  # an implementation this torch/device lacks: its own words, never a number
                missing[f"{name} (batch {batch})"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
                continue
            med = statistics.median(times)
            base = med if name == REFERENCE else base
            rows.append({"impl": name, "batch": batch, "ms_median": 1e3 * med, "ms_runs": [1e3 * t for t in times],
                         "tokens_per_s": batch / med, "speedup_vs_eager": base / med if base else None,
                         "max_rel_err_vs_eager": err, "routing_agreement_vs_eager": agree, "experts_hit_per_layer": hit})
            print(f"  batch {batch:>4}  {name:<15} {1e3 * med:9.3f} ms  {batch / med:12,.0f} tok/s  "
                  f"x{(base / med if base else float('nan')):.2f} vs eager  (max rel. error {err:.1e}, "
                  f"routing {agree:.1%} as eager's)", flush=True)
    for name, why in missing.items():
        print(f"  {name}: not run: {why}")
    import transformers
    libs = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        from importlib.metadata import version
        libs["vllm"] = version("vllm")
    except Exception:
        libs["vllm"] = None
    return {"benchmark": "fused_moe", "model": args.model, "reduced": args.reduced, "layers": args.layers,
            "shape": {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_local_experts", "num_experts_per_tok")},
            "dtype": "bfloat16", "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu: {platform.processor() or 'cpu'}",
            "libraries": libs, "warmup": args.warmup, "repeats": args.repeats, "reference": REFERENCE,
            "host": host_facts(device), "results": rows, "not_run": missing}


def host_facts(device: str) -> dict:
    """Where it ran: two leases of one GPU model timed vLLM's kernel 16% apart (sessions 14 and 15), so a run
    names its host, CPU and load, and the GPU's clocks, temperature and other processes right after the timed
    runs (NVML, where present)."""
    from moeq.evaluate.host import host_cpu, visible_gpu
    # batch 1 is launch-bound (session 16: eager 2.9 ms on one host, 5.6 on another), and a process still
    # leaving the GPU slowed a run mid-way: the CPU, its load and the GPU's other processes say which
    facts = {"name": platform.node(), "cpu": host_cpu(), "load_avg_1min": round(os.getloadavg()[0], 2)}
    if device != "cuda":
        return facts
    try:
        import pynvml
        pynvml.nvmlInit()
        h = visible_gpu(pynvml)
        facts["other_gpu_processes"] = sum(p.pid != os.getpid() for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h))
        facts |= {"sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
                  "memory_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
                  "max_sm_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
                  "temperature_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
                  "power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000}
    except Exception as e:  # no NVML binding in this environment: say so rather than guess
        facts["nvml"] = f"{type(e).__name__}: {e}"
    return facts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mixtral", help="registry model whose layer shape is used (Mixtral architecture)")
    p.add_argument("--layers", type=int, default=None, help="MoE layers in the stack (default 4; 2 with --reduced)")
    p.add_argument("--batch", default="1,64", help="decode batch sizes (tokens per step), comma list")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--reduced", action="store_true", help="hidden and expert width / 16, for a CPU run")
    p.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    args = p.parse_args(argv)
    try:
        args.batch = [int(b) for b in args.batch.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batch {args.batch!r}: expected whole numbers separated by commas, e.g. 1,64")
    if not args.batch or min(args.batch) < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--batch values and --repeats must be >= 1, --warmup >= 0")
    args.layers = args.layers or (2 if args.reduced else 4)
    result = run(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
