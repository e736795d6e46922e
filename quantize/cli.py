"""The moeq command: quantize MoE models and measure what it buys.

Heavy libraries are imported by each subcommand, so `--help` is instant and each
subcommand runs in the environment that has its libraries (quantize env / serve env, see README)."""
import argparse
import os
import sys
from pathlib import Path

from moeq.quantize.registry import UserError


def _env_default(name, default):
    return os.environ.get(name) or default


def cmd_list(args):
    from moeq.quantize import recipes, registry
    print("models:")
    for name, spec in registry.registry().items():
        print(f"  {name:18s} {spec.get('hub_id', 'built by moeq'):40s} {spec['description']}")
    print("schemes:")
    print(f"  {'bf16':18s} {'baseline':8s} the unquantized model")
    for name, r in recipes.all_recipes().items():
        aliases = ", ".join(r.meta.get("aliases", []))
        print(f"  {name:18s} {r.claim:8s} {r.meta['description']}" + (f" (aliases: {aliases})" if aliases else ""))


def cmd_build(args):
    from moeq.quantize import registry
    model = registry.resolve(args.model)
    if not model.buildable:
        raise UserError(f"{args.model!r} is not built by moeq; buildable: "
                        + ", ".join(n for n, s in registry.registry().items() if "train" in s))
    if args.force and model.path.exists():
        import shutil
        shutil.rmtree(model.path)
    print(registry.ensure_built(model))


def cmd_quantize(args):
    from moeq.quantize import recipes
    from moeq.quantize.run import quantize
    schemes = list(recipes.all_recipes()) if args.scheme == "all" else args.scheme.split(",")
    for scheme in schemes:
        recipes.load(scheme)  # fail on a bad name before any work starts
    for scheme in schemes:
        quantize(args.model, scheme, Path(args.out), args.samples, args.seq_len, args.force)


def cmd_dequantize(args):
    from moeq.quantize.dequantize import dequantize
    dequantize(Path(args.checkpoint), Path(args.out))


def add_quantize_commands(sub):
    p = sub.add_parser("list", help="list the registered models and schemes")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("build", help="build (train) an embedded model such as tiny; cached outside the repo")
    p.add_argument("model", nargs="?", default="tiny")
    p.add_argument("--force", action="store_true", help="rebuild even if a complete build is cached")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("quantize", help="quantize MODEL with SCHEME into checkpoints/<model>/<scheme>/")
    p.add_argument("--model", default=_env_default("MODEL", "tiny"),
                   help="registry name (moeq list) or path to a checkpoint folder (default: tiny)")
    p.add_argument("--scheme", default=_env_default("SCHEME", "all"),
                   help="recipe name, alias, path to a recipe YAML, comma list, or 'all' (default)")
    p.add_argument("--out", default=_env_default("CHECKPOINTS", "checkpoints"), help="checkpoint root")
    p.add_argument("--samples", type=int, default=None, help="calibration samples (default: per model)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per calibration sample")
    p.add_argument("--force", action="store_true", default=bool(os.environ.get("FORCE")),
                   help="redo a checkpoint that already exists")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("dequantize", help="decompress a compressed-tensors checkpoint into a BF16 one")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.set_defaults(func=cmd_dequantize)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="moeq", description=__doc__.split("\n")[0].strip())
    sub = parser.add_subparsers(dest="command", required=True)
    add_quantize_commands(sub)
    try:
        from moeq.evaluate.cli import add_evaluate_commands
        add_evaluate_commands(sub)
    except ImportError:
        pass
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
