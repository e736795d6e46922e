"""`python -m moeq.evaluate.sweep PLAN.yaml [--models a,b] [--schemes x,y]`: a device sweep written as data.

Same engines, jobs and ledger as `moeq eval` (evaluate/run.py), but each engine runs an explicit list
of cells rather than a product of batches x lengths, so one long-prompt cell rides along in the same
engine instead of costing a second engine start. The plan (reports/h200/plan.yaml) is the record of
what ran: models, schemes, cells, repeats and the extra engine arguments.
"""
import argparse
import os
from pathlib import Path

import yaml

from moeq.evaluate.ledger import Ledger
from moeq.evaluate.run import find_targets, misloads, on_gpu, run_job, shape_only_targets


def engine_args(cells, plan: dict) -> dict:
    """evaluate()'s defaults (run.py), then the plan's own engine arguments."""
    args = {"dtype": "bfloat16", "enable_prefix_caching": False, "disable_log_stats": False, "seed": 0,
            "max_model_len": max(i + o for _, i, o in cells), "max_num_seqs": max(b for b, _, _ in cells)}
    args.update({"gpu_memory_utilization": 0.9} if on_gpu() else
                {"kv_cache_memory_bytes": int(float(os.environ.get("MOEQ_KV_CACHE_GIB", "2")) * 2**30)})
    args.update(plan.get("engine_args") or {})
    return args


def sweep(plan: dict, ledger: Path, checkpoints: Path, models=None, schemes=None, log=print) -> int:
    cells = [tuple(c) for c in plan["cells"]]
    weights = plan.get("weights", "dummy")
    models, schemes = models or plan["models"], schemes or plan["schemes"]
    args, failures = engine_args(cells, plan), []
    for model in models:
        targets = (shape_only_targets if weights == "dummy" else find_targets)([model], schemes, checkpoints)
        for target in targets:
            job = dict({"provenance": "real"}, **target, ledger=str(ledger), cells=cells,
                       repeats=plan.get("repeats", 3), tasks=[], limit=None, force=False, engine_args=args,
                       # a shape-only folder holds config files only: its size says nothing about the scheme
                       checkpoint_bytes=None if weights == "dummy" else
                       sum(p.stat().st_size for p in Path(target["path"]).rglob("*") if p.is_file()))
            log(f"[sweep] {model} / {target['scheme']}: {len(cells)} cells")
            try:
                run_job(job)
            except RuntimeError as e:
                log(f"[sweep] ERROR: {e}")
                failures.append(str(e))
    failures += misloads(Ledger(ledger), models, log)
    return 1 if failures else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("plan")
    ap.add_argument("--models", help="comma list (default: the plan's)")
    ap.add_argument("--schemes", help="comma list (default: the plan's)")
    ap.add_argument("--ledger", default=os.environ.get("LEDGER", "results/ledger.sqlite"))
    ap.add_argument("--checkpoints", default=os.environ.get("CHECKPOINTS", "checkpoints"))
    a = ap.parse_args(argv)
    plan = yaml.safe_load(Path(a.plan).read_text())
    split = lambda s: s.split(",") if s else None
    raise SystemExit(sweep(plan, Path(a.ledger), Path(a.checkpoints), split(a.models), split(a.schemes)))


if __name__ == "__main__":
    main()
