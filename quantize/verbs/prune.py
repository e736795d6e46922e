"""moeq prune"""
from pathlib import Path

from moeq.env import env_default, env_flag

HELP = ("keep the most-used experts of each MoE layer (routing counted on calibration data) into "
        "checkpoints/.pruned/<model>-keep<NN>/, a model of its own")
ENVIRONMENT = "quantize"


def add_args(p):
    from moeq.quantize.verbs.quantize import add_calibrated_output_args
    p.add_argument("--keep", default=env_default("KEEP", "0.5"),
                   help="fraction of each layer's experts to keep, 0 < KEEP < 1 (default 0.5)")
    add_calibrated_output_args(p, "redo an existing pruned model")


def run(args):
    from moeq.errors import UserError
    try:
        keep = float(args.keep)
    except ValueError:
        raise UserError(f"--keep {args.keep!r}: expected a fraction between 0 and 1, e.g. 0.5") from None
    from moeq.quantize.prune import prune
    out = prune(args.model, keep, Path(args.out), args.samples, args.seq_len, args.force or env_flag("FORCE"))
    print(f"evaluate it with: moeq eval --model {out}")
