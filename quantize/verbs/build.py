"""moeq build"""
from moeq.errors import UserError

HELP = "build (train) an embedded model such as tiny; cached outside the repository"
ENVIRONMENT = "quantize"


def add_args(p):
    p.add_argument("model", nargs="?", default="tiny")
    p.add_argument("--force", action="store_true", help="rebuild even if a complete build is cached")


def run(args):
    import shutil
    from moeq import registry
    from moeq.quantize import tiny
    model = registry.resolve(args.model)
    if not model.buildable:
        raise UserError(f"{args.model!r} is not built by moeq; buildable: "
                        + ", ".join(n for n, s in registry.registry().items() if "train" in s))
    if args.force and model.path.exists():
        shutil.rmtree(model.path)
    print(tiny.ensure_built(model))
