"""`moeq sweep PLAN.yaml [--models a,b] [--schemes x,y]`: a device sweep written as data.

The same driver as `moeq eval` (run.evaluate), with the plan's explicit cells (so one long-prompt cell
rides along in the same engine instead of costing a second engine start), its engine arguments,
routing, warm-up and restarts. The plan (e.g. reports/h200/plan.yaml) is the record of what ran.
A plan's `layouts` (name -> {tp, ep, dp, pp}, and optionally the schemes it runs) run one after another, each its own engine settings
(reports/h200x2/plan.yaml); `estimate` holds what a plan's expected device time is computed from and
changes nothing that runs.
"""
from pathlib import Path

from moeq.errors import UserError
from moeq.evaluate import parallel
from moeq.evaluate.run import evaluate

PLAN_KEYS = {"weights", "models", "schemes", "cells", "repeats", "engine_args", "routing", "warmup_tokens",
             "restarts", "tasks", "layouts", "estimate", "variants", "prompts", "engine_process"}


def layouts(plan: dict, names=None) -> dict:
    """The plan's layouts as vLLM engine arguments, by name (a plan without any: one GPU)."""
    table = plan.get("layouts") or {"1 GPU": {}}
    if unknown := [n for n in names or [] if n not in table]:
        raise UserError(f"layout {unknown[0]!r} is not in the plan; valid: {', '.join(table)}")
    out = {}
    for name in names or table:
        spec = {k: v for k, v in (table[name] or {}).items() if k != "schemes"}
        if bad := set(spec) - set(parallel.FLAGS):
            raise UserError(f"layout {name!r}: {sorted(bad)[0]!r} is not one of {', '.join(parallel.FLAGS)}, schemes")
        out[name] = parallel.engine_args(**spec)
    return out


def layout_schemes(plan: dict, name: str, schemes: list[str]) -> list[str]:
    """The schemes a layout runs: its own `schemes:` narrows the plan's (what fits where: bf16 on two GPUs,
    the quantized schemes on one, reports/h200x2/plan-gpus-needed.yaml)."""
    only = ((plan.get("layouts") or {}).get(name) or {}).get("schemes")
    if only is None:
        return list(schemes)
    if bad := [s for s in only if s not in plan["schemes"]]:
        raise UserError(f"layout {name!r}: scheme {bad[0]!r} is not one of the plan's ({', '.join(plan['schemes'])})")
    return [s for s in schemes if s in only]


def sweep(plan: dict, ledger: Path, checkpoints: Path, models=None, schemes=None, log=print,
          layout_names=None, force=False) -> int:
    if unknown := set(plan) - PLAN_KEYS:
        raise UserError(f"plan key {sorted(unknown)[0]!r} is not one of {', '.join(sorted(PLAN_KEYS))}")
    rc = 0
    # `variants` (name -> engine arguments over the plan's own, e.g. hf_overrides of top-k or expert count):
    # each its own engine settings group, run one after another (issue 12's shape families)
    variants = plan.get("variants") or {"": {}}
    if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
        raise UserError("plan key 'variants' must map a name to engine arguments, e.g. "
                        "top1: {hf_overrides: {num_experts_per_tok: 1}}")
    for (name, args), (variant, extra) in ((a, v) for a in layouts(plan, layout_names).items() for v in variants.items()):
        run_schemes = layout_schemes(plan, name, schemes or plan["schemes"])
        if not run_schemes:
            continue
        if plan.get("layouts"):
            log(f"[sweep] layout {name}: {', '.join(run_schemes)}")
        if variant:
            log(f"[sweep] variant {variant}: {extra}")
        rc = max(rc, evaluate(
            models=models or plan["models"], schemes=run_schemes, tasks=plan.get("tasks", []),
            cells=plan["cells"], repeats=plan.get("repeats", 3), ledger=ledger, checkpoints=checkpoints,
            engine_args=parallel.merge(args, {**(plan.get("engine_args") or {}), **extra}), weights=plan.get("weights", "dummy"),
            routing=plan.get("routing"), warmup_tokens=plan.get("warmup_tokens"),
            restarts=plan.get("restarts", 1), prompts=plan.get("prompts"), engine_process=plan.get("engine_process"),
            force=force, log=log))
    return rc
