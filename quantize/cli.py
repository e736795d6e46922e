"""The moeq command: quantize MoE models and measure what it buys.

Heavy libraries are imported by each subcommand, so `--help` is instant and each
subcommand runs in the environment that has its libraries (quantize env / serve env, see README)."""
import argparse
import contextlib
import os
import sys
from pathlib import Path

from moeq.quantize.registry import UserError, env_default, env_flag


def positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}; valid: a whole number >= 1")
    return int(text)


def needs_quantize_env():
    """build and quantize import llm-compressor, which only the quantize environment has (README)."""
    import importlib.util
    import shlex
    if importlib.util.find_spec("llmcompressor") is None:
        quant = Path(os.environ.get("MOEQ_QUANT_PYTHON") or Path(sys.prefix).parent / "quant" / "bin" / "python")
        moeq = quant.with_name("moeq")
        with contextlib.suppress(ValueError):
            moeq = moeq.relative_to(Path.cwd())
        raise UserError(f"this verb runs in the quantize environment: {moeq} {shlex.join(sys.argv[1:])}")


def cmd_list(args):
    from moeq.quantize import recipes, registry
    print("models:")
    for name, spec in registry.registry().items():
        print(f"  {name:18s} {spec.get('hub_id', 'built by moeq'):40s} {spec['description']}")
    print("schemes:")
    print(f"  {'bf16':18s} {'baseline':11s} the unquantized model")
    for name, r in recipes.all_recipes().items():
        aliases = ", ".join(r.meta.get("aliases", []))
        print(f"  {name:18s} {r.claim:11s} {r.meta['description']}" + (f" (aliases: {aliases})" if aliases else ""))


def cmd_build(args):
    from moeq.quantize import registry
    needs_quantize_env()
    model = registry.resolve(args.model)
    if not model.buildable:
        raise UserError(f"{args.model!r} is not built by moeq; buildable: "
                        + ", ".join(n for n, s in registry.registry().items() if "train" in s))
    if args.force and model.path.exists():
        import shutil
        shutil.rmtree(model.path)
    print(registry.ensure_built(model))


def cmd_quantize(args):
    from moeq.quantize import recipes, registry
    force = args.force or env_flag("FORCE")
    needs_quantize_env()
    schemes = list(recipes.checkpoint_recipes()) if args.scheme == "all" else args.scheme.split(",")
    registry.resolve(args.model)  # fail on a bad name before any work starts
    for scheme in schemes:
        recipes.checkpoint_recipe(scheme)
    from moeq.quantize.run import quantize
    for scheme in schemes:
        quantize(args.model, scheme, Path(args.out), args.samples, args.seq_len, force)


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
    p.add_argument("--model", default=env_default("MODEL", "tiny"),
                   help="registry name (moeq list) or path to a checkpoint folder (default: tiny)")
    p.add_argument("--scheme", default=env_default("SCHEME", "all"),
                   help="recipe name, alias, path to a recipe YAML, comma list, or 'all' (default)")
    p.add_argument("--out", default=env_default("CHECKPOINTS", "checkpoints"), help="checkpoint root")
    p.add_argument("--samples", type=positive_int, default=None, help="calibration samples (default: per model)")
    p.add_argument("--seq-len", type=positive_int, default=None, help="tokens per calibration sample")
    p.add_argument("--force", action="store_true", default=None,
                   help="redo a checkpoint that already exists, or one made differently (default: MOEQ_FORCE=1)")
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
