"""moeq quantize"""
from pathlib import Path

from moeq.env import env_default, env_flag
from moeq.flags import positive_int

HELP = "quantize MODEL with SCHEME into checkpoints/<model>/<scheme>/"
ENVIRONMENT = "quantize"


def add_args(p):
    p.add_argument("--scheme", default=env_default("SCHEME", "all"),
                   help="recipe name, alias, path to a recipe YAML, comma list, or 'all' (default)")
    add_calibrated_output_args(p, "redo a checkpoint that already exists, or one made differently")


def add_calibrated_output_args(p, force_help: str):
    """The flags of a verb that reads a model, calibrates on it and writes under the checkpoint root."""
    p.add_argument("--model", default=env_default("MODEL", "tiny"),
                   help="registry name (moeq list) or path to a checkpoint folder (default: tiny)")
    p.add_argument("--out", default=env_default("CHECKPOINTS", "checkpoints"), help="checkpoint root")
    p.add_argument("--samples", type=positive_int, default=None, help="calibration samples (default: per model)")
    p.add_argument("--seq-len", type=positive_int, default=None, help="tokens per calibration sample")
    p.add_argument("--force", action="store_true", default=None, help=f"{force_help} (default: MOEQ_FORCE=1)")


def run(args):
    from moeq import registry, schemes
    force = args.force or env_flag("FORCE")
    names = list(schemes.checkpoint_recipes()) if args.scheme == "all" else args.scheme.split(",")
    registry.resolve(args.model)  # fail on a bad name before any work starts
    for scheme in names:
        schemes.checkpoint_recipe(scheme)
    from moeq.quantize.run import quantize
    for scheme in names:
        quantize(args.model, scheme, Path(args.out), args.samples, args.seq_len, force)
