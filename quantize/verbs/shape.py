"""moeq shape"""
from pathlib import Path

HELP = "a shape-only folder: a registry model's real config and SCHEME's quantization_config, no weights"
ENVIRONMENT = "quantize"


def add_args(p):
    p.add_argument("model", help="registry name with a hub config (moeq list)")
    p.add_argument("scheme", help="bf16 or a recipe name")
    p.add_argument("out", help="folder to write")


def run(args):
    from moeq.quantize.shape import shape_checkpoint
    shape_checkpoint(args.model, args.scheme, Path(args.out))
