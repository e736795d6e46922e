"""moeq routing"""
import json

from moeq.flags import engine_arg, positive_int

HELP = "expert load that vLLM routes for random-token prompts (the model's router, or a simulated one)"
ENVIRONMENT = "serve"


def add_args(p):
    p.add_argument("probe", nargs="+", help="CHECKPOINT[:dummy][:zipfS][:lN], e.g. ckpt:dummy:zipf1.0:l8 "
                                            "(lN: only the first N layers, for memory)")
    p.add_argument("--prompts", type=positive_int, default=8)
    p.add_argument("--input-len", type=positive_int, default=256)
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", help="also write the JSON list here")


def run(args):
    import os
    from moeq.evaluate.routing import probe
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    engine = dict(engine_arg(a) for a in args.engine_arg)
    results = []
    for spec in args.probe:
        path, *flags = spec.split(":")
        zipf = next((float(f[4:]) for f in flags if f.startswith("zipf")), None)
        layers = next((int(f[1:]) for f in flags if f[:1] == "l" and f[1:].isdigit()), None)
        r = probe(path, "dummy" in flags, zipf, layers, args.prompts, args.input_len, **engine)
        results.append(r)
        print(f"routing: {spec}: {json.dumps(r['median'])} ({r['tokens']} tokens, {r['layers']} layers)", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
