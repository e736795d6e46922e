"""A sweep plan's dry run: weight bytes per scheme, the GPUs each fits on, bytes read per decode step
and the roofline ITL floor (core/roofline.py's arithmetic, the H200 of core/devices.yaml), and the
expected device time of every engine and device call. Nothing is typed in: parameter counts come from
the registry config on the meta device, formats from the recipes, efficiencies and measured cell times
from a reference ledger, engine-start times from the plan's `estimate` block (which says where each
came from).

    python -m moeq.evaluate.estimate reports/h200x2/plan.yaml > reports/h200x2/PLAN.md   (serve env)
"""
import argparse
import json
import sqlite3
import sys
from pathlib import Path

import yaml

from moeq import registry, roofline, schemes
from moeq.errors import UserError
from moeq.evaluate import parallel
from moeq.evaluate import settings as engine_settings
from moeq.evaluate.sweep import layouts

GIB = 2**30


def facts(model: str) -> dict:
    """Parameter counts of a registry model's architecture (meta device: no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = dict(registry.registry()[model]["config"])
    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config)
    params = {n: p.numel() for n, p in m.named_parameters()}
    experts = sum(v for n, v in params.items() if ".experts." in n)
    moe_layers = len({n.split(".experts.")[0] for n in params if ".experts." in n})
    n_experts = registry.experts_per_layer(config)
    total = sum(params.values())
    # what a recipe leaves in full precision: embeddings, lm_head, router gates, norms (not 2-D Linear)
    kept = sum(v for n, v in params.items() if "embed" in n or "lm_head" in n or n.endswith("gate.weight")
               or "norm" in n or ".gate." in n and ".experts." not in n)
    per_expert = experts // (n_experts * moe_layers)
    return {"hidden_size": config.hidden_size, "num_layers": config.num_hidden_layers, "num_experts": n_experts,
            "top_k": config.num_experts_per_tok, "vocab_size": config.vocab_size,
            "num_kv_heads": config.num_key_value_heads, "kv_bytes_per_token": roofline.kv_bytes_per_token(config),
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            "params_total": total, "params_dense": total - experts, "params_per_expert": per_expert,
            "moe_layers": moe_layers, "params_active": total - experts + per_expert * config.num_experts_per_tok * moe_layers,
            "params_kept": kept, "config": cfg}


def weight_bytes(f: dict, scheme: str) -> float:
    """Bytes of weights: quantized Linear weights at the scheme's bits (plus one BF16 scale per group
    of 128 for group-wise INT schemes), everything the recipes keep in BF16 at 2 bytes."""
    if scheme == schemes.BASELINE:
        return 2.0 * f["params_total"]
    fmt = schemes.scheme_format(scheme)
    bits = fmt["weight_bits"] + (16 / 128 if fmt["weight_type"] == "int" else 0)
    return 2.0 * f["params_kept"] + bits / 8 * (f["params_total"] - f["params_kept"])


def step_bytes(f: dict, scheme: str, batch: int, inp: int, out: int) -> float:
    """Bytes read per decode step under balanced routing, by the roofline's own arithmetic (a device of
    1 GB/s and unbounded compute turns its ITL floor into bytes)."""
    c = dict(f, weight_bits=8 * weight_bytes(f, scheme) / f["params_total"],
             activation_bits=(schemes.scheme_format(scheme) or {}).get("activation_bits", 16)
             if scheme != schemes.BASELINE else 16, format=None)
    unit = {"memory_bandwidth_GBps": 1, "tflops": {"bf16": 1e30}}
    return roofline.floors(c, unit, batch, inp, out)["itl_floor"] * 1e9


def floor(f: dict, scheme: str, device: dict, gpus: int, batch: int, inp: int, out: int) -> dict:
    """The roofline on `gpus` devices: bandwidth and peak add up (communication left out: still a floor)."""
    fmt = schemes.scheme_format(scheme) if scheme != schemes.BASELINE else {}
    c = dict(f, weight_bits=8 * weight_bytes(f, scheme) / f["params_total"],
             activation_bits=(fmt or {}).get("activation_bits", 16), format=fmt)
    dev = {"memory_bandwidth_GBps": device["memory_bandwidth_GBps"] * gpus,
           "tflops": {k: v * gpus for k, v in device["tflops"].items() if v}}
    return roofline.floors(c, dev, batch, inp, out)


def reference(ledger: Path | None, settings_id: str | None) -> dict:
    """(model, scheme, cell) -> {latency, pct_of_ceiling} measured on one GPU, from a reference ledger."""
    if not ledger or not Path(ledger).is_file():
        return {}
    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    rows = db.execute("SELECT model, scheme, cell, metric, value FROM results WHERE settings = ? AND metric IN "
                      "('latency', 'pct_of_ceiling')", (settings_id,)).fetchall()
    out = {}
    for model, scheme, cell, metric, value in rows:
        out.setdefault((model, scheme, cell), {})[metric] = value
    return out


def cell_name(b, i, o):
    return f"b{b}-i{i}-o{o}"


def estimate(plan: dict) -> str:
    est = plan.get("estimate") or {}
    device = roofline.match_device(est.get("device", "H200"))
    ref = reference(est.get("reference", {}).get("ledger"), est.get("reference", {}).get("settings"))
    proxy = est.get("efficiency_from", {})
    starts = {int(k): v for k, v in (est.get("engine_start_s") or {}).items()}
    mem = est.get("gpu_memory_gib", 139) * GIB * est.get("gpu_memory_utilization", 0.9)
    cells = [tuple(c) for c in plan["cells"]]
    repeats, warm = plan.get("repeats", 3), plan.get("warmup_tokens")
    limit = est.get("call_limit_s", 560)
    gpus_present = est.get("gpus", 1)
    parallel.gpu_count = lambda: gpus_present  # a dry run for the plan's machine, not this one
    lines = [f"# Dry plan: {est.get('title', 'device sweep')}", "",
             "Generated by `python -m moeq.evaluate.estimate` from the plan beside this file: parameter counts "
             "from the registry config (meta device), weight formats from the recipes, the roofline of "
             f"core/roofline.py on the {device['name']} ({device['memory_bandwidth_GBps']} GB/s per GPU, added "
             "up over the GPUs of a layout; communication left out, so every ITL figure is a floor). "
             "**Planned, not measured.**", ""]
    fs = {m: facts(m) for m in plan["models"]}
    lines += ["## Weights and where they fit", "",
              f"GPU memory for weights and KV: {est.get('gpu_memory_utilization', 0.9)} x "
              f"{est.get('gpu_memory_gib', 139)} GiB per GPU (vLLM's gpu_memory_utilization).", "",
              "| model | scheme | weights GiB | per GPU at 1 / 2 / 4 / 8 GPUs (GiB) | fewest GPUs | KV GiB left there |",
              "| --- | --- | ---: | --- | ---: | ---: |"]
    fewest = {}
    for m, f in fs.items():
        for s in plan["schemes"]:
            w = weight_bytes(f, s)
            n = next((g for g in (1, 2, 4, 8) if w / g < mem), None)
            fewest[(m, s)] = n
            per = " / ".join(f"{w / g / GIB:.1f}" for g in (1, 2, 4, 8))
            lines.append(f"| {m} | {s} | {w / GIB:.1f} | {per} | {n or '> 8'} | "
                         f"{(mem * n - w) / GIB:.1f} |" if n else f"| {m} | {s} | {w / GIB:.1f} | {per} | > 8 | |")
    lines += ["", "## Bytes read per decode step and the ITL floor", "",
              "Balanced routing (uniform_random, as the sweep runs): weights of the dense part and of the "
              "experts the batch touches, plus the KV cache at the mean context of a cell.", "",
              "| model | scheme | batch | in/out | bytes per step (GB) | ITL floor at 1 / 2 / 4 / 8 GPUs (ms) |",
              "| --- | --- | ---: | --- | ---: | --- |"]
    for m, f in fs.items():
        for s in plan["schemes"]:
            for b, i, o in cells:
                fl = " / ".join(f"{1e3 * floor(f, s, device, g, b, i, o)['itl_floor']:.2f}" for g in (1, 2, 4, 8))
                lines.append(f"| {m} | {s} | {b} | {i}/{o} | {step_bytes(f, s, b, i, o) / 1e9:.2f} | {fl} |")
    # engines
    lines += ["", "## Expected device time", "",
              "Per engine: its start (the plan's `estimate.engine_start_s`, by GPU count) plus, per cell, one "
              f"warm-up decoding {warm or 'its own output length of'} tokens and {repeats} timed runs. A cell's time is its latency "
              "measured on one GPU in the reference ledger where there is one (an upper bound for a layout "
              "with more bandwidth), else the roofline latency floor on the layout's GPUs divided by the "
              "efficiency (% of the roofline ceiling) the reference ledger measured for "
              "the proxy named in `estimate.efficiency_from`. A one-GPU engine whose every cell is already in "
              "the reference ledger under the same settings costs nothing: the sweep skips measured rows.", "",
              "| layout | model | scheme | GPUs | engine s | cells s | source | call |",
              "| --- | --- | --- | ---: | ---: | ---: | --- | ---: |"]
    calls, used, total = 1, 0.0, 0.0
    refused = []
    for name, args in layouts(plan).items():
        llm = dict(plan.get("engine_args") or {}, **args)
        lay = parallel.layout(llm)
        try:
            parallel.check_devices(llm, gpu=True, count=gpus_present)
        except UserError as e:
            refused.append(f"- `{name}` ({parallel.label(llm)}): refused before any engine starts: {e}")
            continue
        profile = engine_settings.build(gpu=True, cells=cells, shape_only=plan.get("weights") == "dummy",
                                        user_args=llm, routing=plan.get("routing"), warmup_tokens=warm).profile
        for m, f in fs.items():
            for s in plan["schemes"]:
                need = fewest[(m, s)]
                if need is None or need > lay["gpus"]:
                    refused.append(f"- `{name}` {m} / {s}: weights need {need or '> 8'} GPUs, the layout has {lay['gpus']}")
                    continue
                try:
                    parallel.check_model(llm, dict(f["config"], quantization_config=None), m, gpus_present)
                except UserError as e:
                    refused.append(f"- `{name}` {m} / {s}: {e}")
                    continue
                measured = [ref.get((m, s, cell_name(*c)), {}).get("latency") for c in cells]
                if lay["gpus"] == 1 and profile == est.get("reference", {}).get("settings") and all(measured):
                    lines.append(f"| {name} | {m} | {s} | 1 | 0 | 0 | in the reference ledger | |")
                    continue
                cell_s, sources = 0.0, set()
                for (b, i, o), lat in zip(cells, measured):
                    if lat is None:
                        pm, ps = proxy.get(m, m), s if (proxy.get(m, m), s, cell_name(b, i, o)) in ref else \
                            proxy.get("scheme", {}).get(s, schemes.BASELINE)
                        pct = ref.get((pm, ps, cell_name(b, i, o)), {}).get("pct_of_ceiling")
                        if not pct:
                            raise UserError(f"no reference efficiency for {m} / {s} at {cell_name(b, i, o)}: "
                                            "name a measured proxy in estimate.efficiency_from")
                        lat = floor(f, s, device, lay["gpus"], b, i, o)["latency_floor"] / (pct / 100)
                        sources.add(f"roofline / {pm} {ps} efficiency")
                    else:
                        sources.add("1-GPU latency")
                    cell_s += lat * (repeats + (warm or o) / o)
                start = starts.get(lay["gpus"])
                if start is None:
                    raise UserError(f"estimate.engine_start_s has no entry for {lay['gpus']} GPUs")
                engine = start + cell_s
                if used + engine > limit:
                    calls, used = calls + 1, 0.0
                used += engine
                total += engine
                lines.append(f"| {name} | {m} | {s} | {lay['gpus']} | {start:.0f} | {cell_s:.0f} | "
                             f"{', '.join(sorted(sources))} | {calls} |")
    setup = est.get("setup_s", 0)
    lines += ["", f"Engines: {total:.0f} s in {calls} device call(s) of at most {limit} s each, plus set-up "
              f"(machine start, wheel upload and install: {setup} s, from the H200 sessions' calls.yaml): "
              f"**{(total + setup) / 60:.1f} min of device time expected**.", ""]
    if refused:
        lines += ["## Not in the plan's device time", "", *refused, ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("plan")
    args = p.parse_args(argv)
    try:
        print(estimate(yaml.safe_load(Path(args.plan).read_text())))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
