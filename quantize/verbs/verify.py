"""moeq verify"""
import json
from pathlib import Path

HELP = "how far a checkpoint's predictions moved from its BF16 base on held-out text (KL, NLL, top-1; JSON)"
ENVIRONMENT = "quantize"


def add_args(p):
    p.add_argument("base", help="the BF16 checkpoint folder the checkpoint was quantized from")
    p.add_argument("checkpoint")


def run(args):
    from moeq.quantize.verify import compare
    print(json.dumps(compare(Path(args.base), Path(args.checkpoint))))
