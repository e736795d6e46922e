"""moeq outliers"""
from moeq.env import env_default

HELP = ("per layer, max|x| / median|x| of the attention and expert projections' inputs on held-out text, and "
        "weight kurtosis, as JSON (how far quantization carries: issue 10)")
ENVIRONMENT = None  # torch + transformers: either environment, or a GPU machine's python3


def add_args(p):
    p.add_argument("model", nargs="?", default="tiny", help="a registry name or a checkpoint folder")
    p.add_argument("--tokens", type=int, default=int(env_default("OUTLIER_TOKENS", 16384)),
                   help="held-out tokens to run (default 16384)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    p.add_argument("--out", help="write the JSON here too (default: print it)")


def run(args):
    import json
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moeq import registry
    from moeq.errors import UserError
    from moeq.quantize import outliers, tiny

    if args.tokens < args.seq_len:
        raise UserError(f"--tokens {args.tokens} is less than one window of --seq-len {args.seq_len}")
    model = registry.resolve(args.model)
    path = tiny.ensure_built(model)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA device is present")
    tok = AutoTokenizer.from_pretrained(path)
    net = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device)  # device_map needs accelerate
    samples, where = outliers.heldout_samples(path, tok, args.tokens, args.seq_len)
    result = {"model": model.name, "path": str(path), "text": where, "seq_len": args.seq_len,
              **outliers.measure(net, samples, model.ignore)}
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
