"""moeq prune"""
from pathlib import Path

from moeq.env import env_default, env_flag
from moeq.flags import positive_int

HELP = ("keep the most-used experts of each MoE layer (routing counted on calibration data) into "
        "checkpoints/.pruned/<model>-keep<NN>/, a model of its own")
ENVIRONMENT = "quantize"


def add_args(p):
    p.add_argument("--model", default=env_default("MODEL", "tiny"),
                   help="registry name (moeq list) or path to a BF16 checkpoint folder (default: tiny)")
    p.add_argument("--keep", default=env_default("KEEP", "0.5"),
                   help="fraction of each layer's experts to keep, 0 < KEEP < 1 (default 0.5)")
    p.add_argument("--out", default=env_default("CHECKPOINTS", "checkpoints"), help="checkpoint root")
    p.add_argument("--samples", type=positive_int, default=None, help="calibration samples (default: per model)")
    p.add_argument("--seq-len", type=positive_int, default=None, help="tokens per calibration sample")
    p.add_argument("--force", action="store_true", default=None, help="redo an existing pruned model")


def run(args):
    from moeq.errors import UserError
    try:
        keep = float(args.keep)
    except ValueError:
        raise UserError(f"--keep {args.keep!r}: expected a fraction between 0 and 1, e.g. 0.5") from None
    from moeq.quantize.prune import prune
    out = prune(args.model, keep, Path(args.out), args.samples, args.seq_len, args.force or env_flag("FORCE"))
    print(f"evaluate it with: moeq eval --model {out}")
