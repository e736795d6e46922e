"""moeq serve-bench"""
from pathlib import Path

from moeq.env import env_default, env_flag
from moeq.evaluate.verbs.eval import add_ledger_args, add_parallel_args, engine_args
from moeq.flags import csv, int_at_least, int_list

HELP = ("serve each checkpoint with vLLM's OpenAI-compatible server and load it with vLLM's bench client: "
        "TTFT/ITL percentiles, throughput and goodput per request rate into the ledger (kind serve)")
ENVIRONMENT = "serve"


def add_args(p):
    p.add_argument("--model", default=env_default("MODEL"), help="comma list (default: tiny and every model under checkpoints/)")
    p.add_argument("--scheme", default=env_default("SCHEME"), help="comma list incl. bf16 and fp8-online (default: bf16 + every checkpoint)")
    p.add_argument("--weights", default=env_default("WEIGHTS", "real"), choices=["real", "dummy"],
                   help="real (prompts from the held-out corpus) or dummy: shape-only (random-token prompts)")
    p.add_argument("--routing", default=env_default("ROUTING"), help="shape-only routing (default uniform_random)")
    p.add_argument("--input-len", default=env_default("INPUT_LEN", "512"), help="mean prompt tokens (default 512)")
    p.add_argument("--input-spread", default=env_default("INPUT_SPREAD", "0.5"),
                   help="prompt lengths uniform in input-len x [1 - s, 1 + s] (default 0.5)")
    p.add_argument("--output-len", default=env_default("OUTPUT_LEN", "128"), help="tokens generated per request (fixed)")
    p.add_argument("--rates", default=env_default("RATES", "auto"),
                   help="Poisson request rates, req/s, comma list, or auto: --rate-start doubling (default)")
    p.add_argument("--rate-start", default=env_default("RATE_START", "1"), help="first rate of the auto ladder (req/s)")
    p.add_argument("--max-rates", default=env_default("MAX_RATES", "8"), help="rates the auto ladder tries at most")
    p.add_argument("--concurrency", default=env_default("CONCURRENCY", "1,4,16"),
                   help="fixed-concurrency sweep (requests in flight), comma list, or none")
    p.add_argument("--seconds", default=env_default("SECONDS", "30"), help="per rate: prompts = rate x seconds")
    p.add_argument("--warmup-concurrency", default=env_default("WARMUP_CONCURRENCY"),
                   help="requests in flight in each server's unrecorded warm-up run, before its first rate (default: "
                        "the highest --concurrency; 0: none; part of the settings id)")
    p.add_argument("--min-prompts", default=env_default("MIN_PROMPTS", "32"))
    p.add_argument("--max-prompts", default=env_default("MAX_PROMPTS", "2000"))
    p.add_argument("--repeats", default=env_default("REPEATS", "1"), help="runs per rate (2+: intervals in the report)")
    p.add_argument("--knee-repeats", default=env_default("KNEE_REPEATS", "1"),
                   help="runs at the two rates around the SLO crossing, after the ladder (2+: an interval on the "
                        "capacity at a fraction of --repeats' time; a ladder back inside the SLO after leaving it "
                        "then has its disputed rates run to the next odd count)")
    p.add_argument("--slo", default=env_default("SLO", "ttft:2000,itl:100"),
                   help="p99 bounds in ms, KEY:MS among ttft, itl, tpot, e2el (default ttft:2000,itl:100)")
    p.add_argument("--port", default=env_default("PORT", "8000"), help="first port tried on 127.0.0.1 (default 8000)")
    p.add_argument("--tokenizer", default=env_default("TOKENIZER"),
                   help="shape-only: a tokenizer folder for the server when the model's own is not at hand (random-"
                        "token prompts: any whose vocabulary fits the model's)")
    p.add_argument("--start-timeout", default=env_default("START_TIMEOUT", "900"), help="seconds to wait for /health")
    p.add_argument("--force", action="store_true", help="re-measure what the ledger has (MOEQ_FORCE=1)")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra engine argument, as for moeq eval (a `vllm serve` flag; recorded with every row)")
    add_ledger_args(p)
    add_parallel_args(p)


def number(text, name: str, low: float, high: float = float("inf")) -> float:
    from moeq.errors import UserError
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = float("nan")
    if not low <= value <= high:
        raise UserError(f"{name} {text!r}: expected a number in [{low:g}, {high:g}]")
    return value


def load_from(args):
    from moeq.errors import UserError
    from moeq.evaluate.serve_bench import Load
    from moeq.evaluate.serve_load import parse_slo
    rates = None if str(args.rates).strip() == "auto" else [number(r, "--rates", 1e-3, 1e6) for r in csv(args.rates) or []]
    if rates == []:
        raise UserError("--rates is empty: give req/s values, e.g. 1,2,4, or auto")
    concurrency = [] if str(args.concurrency).strip() == "none" else int_list(args.concurrency, "--concurrency") or []
    load = Load(input_len=int_at_least(args.input_len, "--input-len", 1),
                input_spread=number(args.input_spread, "--input-spread", 0, 0.95),
                output_len=int_at_least(args.output_len, "--output-len", 2), rates=rates,
                rate_start=number(args.rate_start, "--rate-start", 1e-3, 1e6),
                max_rates=int_at_least(args.max_rates, "--max-rates", 1), concurrency=concurrency,
                seconds=number(args.seconds, "--seconds", 0.1), min_prompts=int_at_least(args.min_prompts, "--min-prompts", 2),
                max_prompts=int_at_least(args.max_prompts, "--max-prompts", 2),
                repeats=int_at_least(args.repeats, "--repeats", 1),
                knee_repeats=int_at_least(args.knee_repeats, "--knee-repeats", 1), slo=parse_slo(args.slo))
    if load.min_prompts > load.max_prompts:
        raise UserError(f"--min-prompts {load.min_prompts} is above --max-prompts {load.max_prompts}")
    return load


def run(args):
    from moeq.evaluate.serve_bench import serve_bench
    load = load_from(args)
    return serve_bench(models=csv(args.model), schemes=csv(args.scheme), weights=args.weights, routing=args.routing,
                       engine_args=engine_args(args), load=load, ledger=Path(args.ledger),
                       checkpoints=Path(args.checkpoints), port=int_at_least(args.port, "--port", 1024),
                       force=args.force or env_flag("FORCE"),
                       start_timeout=number(args.start_timeout, "--start-timeout", 1), shape_tokenizer=args.tokenizer,
                       warmup=None if args.warmup_concurrency is None else
                       int_at_least(args.warmup_concurrency, "--warmup-concurrency", 0))
