"""moeq dequantize"""
from pathlib import Path

from moeq.errors import UserError

HELP = "decompress compressed-tensors checkpoints into BF16 ones (several pairs: one process, one import)"
ENVIRONMENT = "quantize"


def add_args(p):
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("more", nargs="*", metavar="CHECKPOINT OUT", help="further pairs, decompressed in turn")


def run(args):
    from moeq.quantize.dequantize import dequantize
    if len(args.more) % 2:
        raise UserError(f"dequantize takes CHECKPOINT OUT pairs; {args.more[-1]!r} has no OUT")
    pairs = [args.checkpoint, args.out, *args.more]
    for ckpt, out in zip(pairs[::2], pairs[1::2]):
        dequantize(Path(ckpt), Path(out))
