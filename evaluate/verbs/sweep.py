"""moeq sweep"""
from pathlib import Path

from moeq.errors import UserError
from moeq.flags import csv, positive_int

HELP = "a device sweep written as data (a plan YAML such as reports/h200/plan.yaml), through eval's driver"
ENVIRONMENT = "serve"


def add_args(p):
    from moeq.evaluate.verbs.eval import add_ledger_args
    p.add_argument("plan")
    p.add_argument("--models", help="comma list (default: the plan's)")
    p.add_argument("--schemes", help="comma list (default: the plan's)")
    p.add_argument("--restarts", type=positive_int, help="engine starts per target (default: the plan's)")
    p.add_argument("--layouts", help="comma list of the plan's layouts (default: every one, in order)")
    p.add_argument("--force", action="store_true", help="re-measure what the ledger has (MOEQ_FORCE=1)")
    add_ledger_args(p)


def run(args):
    import yaml
    from moeq.env import env_flag
    from moeq.evaluate.sweep import sweep
    try:
        plan = yaml.safe_load(Path(args.plan).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"plan {args.plan}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(plan, dict):
        raise UserError(f"plan {args.plan}: expected a mapping of plan keys (models, schemes, cells, ...)")
    if args.restarts:
        plan["restarts"] = args.restarts
    return sweep(plan, Path(args.ledger), Path(args.checkpoints), csv(args.models), csv(args.schemes),
                 layout_names=csv(args.layouts), force=args.force or env_flag("FORCE"))
