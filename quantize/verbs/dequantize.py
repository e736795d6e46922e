"""moeq dequantize"""
from pathlib import Path

HELP = "decompress a compressed-tensors checkpoint into a BF16 one"
ENVIRONMENT = "quantize"


def add_args(p):
    p.add_argument("checkpoint")
    p.add_argument("out")


def run(args):
    from moeq.quantize.dequantize import dequantize
    dequantize(Path(args.checkpoint), Path(args.out))
