"""moeq routing"""
import json

from moeq.errors import UserError
from moeq.flags import engine_arg, positive_int

HELP = "expert load that vLLM routes for random-token prompts (the model's router, or a simulated one)"
ENVIRONMENT = "serve"


def add_args(p):
    p.add_argument("probe", nargs="+", help="CHECKPOINT[:dummy][:ROUTING][:lN], e.g. ckpt:dummy:zipf1.0:l8 or "
                   "ckpt:dummy:uniform_random:l4 (ROUTING: the checkpoint's router unless a vLLM simulation "
                   "strategy or zipfS is named; lN: only the first N layers, for memory)")
    p.add_argument("--prompts", type=positive_int, default=8)
    p.add_argument("--input-len", type=positive_int, default=256)
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", help="also write the JSON list here; `moeq report` reads routing/*.json beside the ledger")


def parse_probe(spec: str, strategies: list[str] | None = None) -> tuple[str, bool, str, int | None]:
    """CHECKPOINT[:dummy][:ROUTING][:lN] -> (path, dummy, routing, layers); a bad flag names the valid ones."""
    from moeq.evaluate.settings import MODEL_ROUTING, check_routing
    path, *flags = spec.split(":")
    layers = next((int(f[1:]) for f in flags if f[:1] == "l" and f[1:].isdigit()), None)
    named = [f for f in flags if f != "dummy" and not (f[:1] == "l" and f[1:].isdigit())]
    if len(named) > 1:
        raise UserError(f"probe {spec!r}: one routing per probe, got {', '.join(named)}")
    routing = named[0] if named else MODEL_ROUTING
    if routing.startswith("zipf") and not routing.startswith("zipf:"):
        routing = "zipf:" + routing[4:]  # zipf1.0 (':' separates the probe's flags)
    check_routing(routing, strategies)
    return path, "dummy" in flags, routing, layers


def run(args):
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor
    from moeq.evaluate.routing import probe
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    engine = dict(engine_arg(a) for a in args.engine_arg)
    probes = [parse_probe(spec) for spec in args.probe]  # every spec checked before the first engine starts
    results = []
    # one fresh process per probe: an engine in a process that already held one starts without its memory
    # (vLLM 0.26 on an H200 kept ~127 GiB after the first probe), and routing is read at engine start
    spawn = multiprocessing.get_context("spawn")
    for spec, (path, dummy, routing, layers) in zip(args.probe, probes):
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            r = pool.submit(probe, path, dummy, routing, layers, args.prompts, args.input_len, **engine).result()
        results.append(r)
        print(f"routing: {spec}: {json.dumps(r['median'])} ({r['tokens']} tokens, {r['layers']} layers)", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
