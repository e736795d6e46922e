"""moeq estimate"""
from pathlib import Path

from moeq.errors import UserError

HELP = "a plan's expected device time, weights, fit and roofline floors, as Markdown (planned, not measured)"
ENVIRONMENT = "serve"


def add_args(p):
    p.add_argument("plan", help="a sweep plan YAML, e.g. reports/h200x2/plan.yaml")


def run(args):
    import yaml
    from moeq.evaluate.estimate import estimate
    try:
        plan = yaml.safe_load(Path(args.plan).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"plan {args.plan}: {getattr(e, 'strerror', None) or e}") from None
    print(estimate(plan))
