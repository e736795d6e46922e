"""`moeq sweep PLAN.yaml [--models a,b] [--schemes x,y]`: a device sweep written as data.

The same driver as `moeq eval` (run.evaluate), with the plan's explicit cells (so one long-prompt cell
rides along in the same engine instead of costing a second engine start), its engine arguments,
routing, warm-up and restarts. The plan (e.g. reports/h200/plan.yaml) is the record of what ran.
"""
from pathlib import Path

from moeq.errors import UserError
from moeq.evaluate.run import evaluate

PLAN_KEYS = {"weights", "models", "schemes", "cells", "repeats", "engine_args", "routing", "warmup_tokens",
             "restarts", "tasks"}


def sweep(plan: dict, ledger: Path, checkpoints: Path, models=None, schemes=None, log=print) -> int:
    if unknown := set(plan) - PLAN_KEYS:
        raise UserError(f"plan key {sorted(unknown)[0]!r} is not one of {', '.join(sorted(PLAN_KEYS))}")
    return evaluate(models=models or plan["models"], schemes=schemes or plan["schemes"], tasks=plan.get("tasks", []),
                    cells=plan["cells"], repeats=plan.get("repeats", 3), ledger=ledger, checkpoints=checkpoints,
                    engine_args=plan.get("engine_args"), weights=plan.get("weights", "dummy"),
                    routing=plan.get("routing"), warmup_tokens=plan.get("warmup_tokens"),
                    restarts=plan.get("restarts", 1), log=log)
