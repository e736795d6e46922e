"""moeq eval"""
from pathlib import Path

from moeq.env import env_default, env_flag
from moeq.flags import csv, engine_arg, int_at_least, int_list

HELP = "measure BF16 and every checkpoint (vLLM perf + lm-eval accuracy) into the ledger"
ENVIRONMENT = "serve"


def add_args(p):
    p.add_argument("--model", default=env_default("MODEL"),
                   help="comma list (default: tiny and every model under checkpoints/)")
    p.add_argument("--scheme", default=env_default("SCHEME"),
                   help="comma list incl. bf16 and fp8-online (default: bf16 + every checkpoint)")
    p.add_argument("--tasks", default=env_default("TASKS"),
                   help="lm-eval tasks, comma list (default: moeq_ppl,moeq_mc4,moeq_nextline; 'none' for perf only)")
    p.add_argument("--batch", default=env_default("BATCH"),
                   help="batch sizes (default: 1,8,32 on CPU; 1,16,64,128 on GPU); 'none': accuracy only, no perf engine")
    p.add_argument("--input-len", default=env_default("INPUT_LEN", "512"))
    p.add_argument("--output-len", default=env_default("OUTPUT_LEN", "128"))
    p.add_argument("--repeats", default=env_default("REPEATS", "3"), help="timed runs per cell (default 3)")
    p.add_argument("--restarts", default=env_default("RESTARTS", "1"),
                   help="engine starts per target; 2+ puts engine-restart variance into the intervals")
    p.add_argument("--limit", default=env_default("LIMIT"), help="items per task (default: all)")
    p.add_argument("--force", action="store_true", help="re-measure what the ledger has (MOEQ_FORCE=1)")
    p.add_argument("--one-engine", action="store_true",
                   help="the accuracy tasks in the perf engine, after its timed cells: one engine start per "
                        "scheme instead of two (MOEQ_ONE_ENGINE=1)")
    add_ledger_args(p)
    p.add_argument("--weights", default=env_default("WEIGHTS", "real"), choices=["real", "dummy"],
                   help="real, or dummy: the registry model's shape with dummy weights (shape-only, perf only)")
    p.add_argument("--routing", default=env_default("ROUTING"),
                   help="shape-only routing: uniform_random (default; vLLM's simulation, alike for every scheme), "
                        "another vLLM strategy, or zipf:S (skewed)")
    p.add_argument("--warmup-tokens", default=env_default("WARMUP_TOKENS"),
                   help="decode tokens of each cell's untimed warm-up (default: the cell's own output length)")
    p.add_argument("--prompts", default=env_default("PROMPTS", "random"), choices=["random", "heldout"],
                   help="perf prompts: random token ids (default), or windows of the held-out corpus split "
                        "(text: what speculative decoding needs; real weights only)")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra vllm.LLM argument, e.g. moe_backend=triton (repeatable; recorded with every row)")
    p.add_argument("--engine-process", default=env_default("ENGINE_PROCESS"),
                   help="where vLLM's engine core runs: inprocess (default: in moeq's engine process) or separate "
                        "(a process of its own, as vllm bench and servers run it); recorded with every row")
    add_parallel_args(p)


def add_parallel_args(p):
    """The parallel layout: engine settings like any other (vLLM's names in the ledger)."""
    p.add_argument("--tp", default=env_default("TP"), help="tensor_parallel_size (default 1)")
    p.add_argument("--ep", default=env_default("EP"), help="1: enable_expert_parallel (experts over the TP x DP ranks)")
    p.add_argument("--dp", default=env_default("DP"), help="data_parallel_size (default 1)")
    p.add_argument("--pp", default=env_default("PP"), help="pipeline_parallel_size (default 1)")


def engine_args(args) -> dict:
    """--engine-arg pairs and the layout flags, as one dict of vLLM arguments (a setting given both ways
    must agree)."""
    from moeq.evaluate import parallel
    return parallel.merge(parallel.engine_args(tp=args.tp, ep=args.ep, dp=args.dp, pp=args.pp),
                          dict(engine_arg(a) for a in args.engine_arg))


def add_ledger_args(p):
    p.add_argument("--ledger", default=env_default("LEDGER", "results/ledger.sqlite"))
    p.add_argument("--checkpoints", default=env_default("CHECKPOINTS", "checkpoints"))


def run(args):
    from moeq.evaluate.run import evaluate
    return evaluate(
        models=csv(args.model), schemes=csv(args.scheme), tasks=[] if args.tasks == "none" else csv(args.tasks),
        perf=args.batch != "none", batches=None if args.batch == "none" else int_list(args.batch, "--batch"),
        input_lens=int_list(args.input_len, "--input-len") or [512],
        output_lens=int_list(args.output_len, "--output-len") or [128],
        repeats=int_at_least(args.repeats, "--repeats", 1), limit=int_at_least(args.limit, "--limit", 1),
        force=args.force or env_flag("FORCE"), ledger=Path(args.ledger), checkpoints=Path(args.checkpoints),
        engine_args=engine_args(args), weights=args.weights, routing=args.routing,
        warmup_tokens=int_at_least(args.warmup_tokens, "--warmup-tokens", 1),
        restarts=int_at_least(args.restarts, "--restarts", 1), prompts=args.prompts, engine_process=args.engine_process,
        one_engine=args.one_engine or env_flag("ONE_ENGINE"))
