"""`moeq eval` and `moeq report` (serve environment: vLLM, lm-eval, pandas, matplotlib)."""
import os
import sys
from pathlib import Path


def _csv(value, cast=str):
    return [cast(v) for v in str(value).split(",") if v.strip()] if value else None


def _env(name, default=None):
    return os.environ.get(name) or default


def cmd_eval(args):
    from moeq.evaluate.run import evaluate
    engine_args = {}
    for item in args.engine_arg:
        key, _, value = item.partition("=")
        engine_args[key] = yaml_value(value)
    sys.exit(evaluate(
        models=_csv(args.model), schemes=_csv(args.scheme), tasks=[] if args.tasks == "none" else _csv(args.tasks),
        batches=_csv(args.batch, int), input_lens=_csv(args.input_len, int) or [512],
        output_lens=_csv(args.output_len, int) or [128], repeats=args.repeats, limit=args.limit,
        force=args.force, ledger=Path(args.ledger), checkpoints=Path(args.checkpoints), engine_args=engine_args,
        weights=args.weights))


def yaml_value(text):
    import yaml
    return yaml.safe_load(text)


def cmd_report(args):
    from moeq.evaluate.report import build_report
    folder = build_report(Path(args.ledger), args.name, Path(args.out))
    print(f"report: {folder / 'README.md'} (and index.html, plots, CSV/JSON)")


def add_evaluate_commands(sub):
    p = sub.add_parser("eval", help="measure BF16 and every checkpoint (vLLM perf + lm-eval accuracy) into the ledger")
    p.add_argument("--model", default=_env("MODEL"), help="comma list (default: tiny and every model under checkpoints/)")
    p.add_argument("--scheme", default=_env("SCHEME"), help="comma list incl. bf16 (default: bf16 + every checkpoint)")
    p.add_argument("--tasks", default=_env("TASKS"),
                   help="lm-eval tasks, comma list (default: moeq_ppl,moeq_mc4,moeq_nextline; 'none' for perf only)")
    p.add_argument("--batch", default=_env("BATCH"), help="batch sizes (default: 1,8,32 on CPU; 1,16,64,128 on GPU)")
    p.add_argument("--input-len", default=_env("INPUT_LEN", "512"))
    p.add_argument("--output-len", default=_env("OUTPUT_LEN", "128"))
    p.add_argument("--repeats", type=int, default=int(_env("REPEATS", "3")), help="timed runs per cell (>= 3)")
    p.add_argument("--limit", type=int, default=int(_env("LIMIT", "0")) or None, help="items per task (default: all)")
    p.add_argument("--force", action="store_true", default=bool(_env("FORCE")), help="re-measure what the ledger has")
    p.add_argument("--ledger", default=_env("LEDGER", "results/ledger.sqlite"))
    p.add_argument("--checkpoints", default=_env("CHECKPOINTS", "checkpoints"))
    p.add_argument("--weights", default=_env("WEIGHTS", "real"),
                   help="real, or dummy: the registry model's shape with dummy weights (shape-only, perf only)")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra vllm.LLM argument, e.g. enforce_eager=true (repeatable)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="tables, verdicts, plots and an HTML page from the ledger")
    p.add_argument("--ledger", default=_env("LEDGER", "results/ledger.sqlite"))
    p.add_argument("--name", default=_env("NAME", "default"), help="report folder name under --out")
    p.add_argument("--out", default=_env("REPORTS", "reports"))
    p.set_defaults(func=cmd_report)
