"""`moeq eval` and `moeq report` (serve environment: vLLM, lm-eval, pandas, matplotlib).

Every flag is parsed and range-checked here, before any engine or model loads; defaults may come from
MOEQ_-prefixed environment variables, parsed as strictly as the flags (an invalid one names itself).
"""
import argparse
import sys
from pathlib import Path

from moeq.quantize.registry import UserError, env_default, env_flag


def int_list(text, name: str, low: int = 1) -> list[int] | None:
    if not text:
        return None
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{name} {text!r}: expected whole numbers separated by commas, e.g. 1,16,64") from None
    if bad := [v for v in values if v < low]:
        raise UserError(f"{name} {bad[0]}: must be at least {low}")
    return values


def int_at_least(text, name: str, low: int) -> int | None:
    if text in (None, ""):
        return None
    values = int_list(str(text), name, low)
    if not values or len(values) != 1:
        raise UserError(f"{name} {text!r}: expected one whole number ≥ {low}")
    return values[0]


def csv(value):
    return [v.strip() for v in str(value).split(",") if v.strip()] if value else None


def engine_arg(item: str) -> tuple[str, object]:
    import yaml
    key, eq, value = item.partition("=")
    if not eq or not key:
        raise UserError(f"--engine-arg {item!r}: expected KEY=VALUE, e.g. enforce_eager=true")
    return key, yaml.safe_load(value)


def cmd_eval(args):
    from moeq.evaluate.run import evaluate
    input_lens = int_list(args.input_len, "--input-len") or [512]
    output_lens = int_list(args.output_len, "--output-len") or [128]
    repeats = int_at_least(args.repeats, "--repeats", 1)
    limit = int_at_least(args.limit, "--limit", 1)
    sys.exit(evaluate(
        models=csv(args.model), schemes=csv(args.scheme), tasks=[] if args.tasks == "none" else csv(args.tasks),
        batches=int_list(args.batch, "--batch"), input_lens=input_lens, output_lens=output_lens, repeats=repeats,
        limit=limit, force=args.force or env_flag("FORCE"), ledger=Path(args.ledger),
        checkpoints=Path(args.checkpoints), engine_args=dict(engine_arg(a) for a in args.engine_arg),
        weights=args.weights, routing=args.routing, warmup_tokens=int_at_least(args.warmup_tokens, "--warmup-tokens", 1),
        restarts=int_at_least(args.restarts, "--restarts", 1)))


def cmd_report(args):
    from moeq.evaluate.report import build_report
    folder = build_report(Path(args.ledger), args.name, Path(args.out))
    print(f"report: {folder / 'README.md'} (and index.html, plots, CSV/JSON)")


def cmd_ledger(args):
    import json
    import yaml
    from moeq.evaluate import ledger as ledger_mod
    from moeq.evaluate.kernels import REFUSALS
    path = Path(args.ledger)
    if not path.is_file():
        raise UserError(f"no ledger at {path}")
    if args.action == "migrate":
        record = yaml.safe_load(Path(args.legacy_settings).read_text()) if args.legacy_settings else None
        done = ledger_mod.migrate(path, record)
        print(f"{path}: " + ("migrated to schema " if done else "already at schema ") + str(ledger_mod.VERSION))
        return
    db = ledger_mod.Ledger(path)
    poisoned = [r for r in db.rows(cell="status") if not REFUSALS.search(r["note"] or "")]
    for r in poisoned:
        print(f"poisoned: {r['model']} / {r['scheme']} ({r['provenance']}, {r['device']}): {r['note'][:160]}")
        if args.remove:
            db.delete({k: r[k] for k in ledger_mod.KEY}, "status")
    settings = dict(db.db.execute("SELECT id, record FROM settings").fetchall())
    print(f"{path}: schema {ledger_mod.VERSION}, {len(db.rows())} rows, {len(poisoned)} poisoned status rows"
          + (" (removed)" if args.remove and poisoned else "") + f", {len(settings)} engine settings:")
    for sid, record in settings.items():
        n = db.db.execute("SELECT COUNT(*) FROM results WHERE settings = ?", (sid,)).fetchone()[0]
        print(f"  {sid}: {n} rows, non-default: {json.dumps(json.loads(record).get('non_default', json.loads(record)))}")
    if poisoned and not args.remove:
        sys.exit(1)


def add_evaluate_commands(sub):
    p = sub.add_parser("eval", help="measure BF16 and every checkpoint (vLLM perf + lm-eval accuracy) into the ledger")
    p.add_argument("--model", default=env_default("MODEL"),
                   help="comma list (default: tiny and every model under checkpoints/)")
    p.add_argument("--scheme", default=env_default("SCHEME"),
                   help="comma list incl. bf16 and fp8-online (default: bf16 + every checkpoint)")
    p.add_argument("--tasks", default=env_default("TASKS"),
                   help="lm-eval tasks, comma list (default: moeq_ppl,moeq_mc4,moeq_nextline; 'none' for perf only)")
    p.add_argument("--batch", default=env_default("BATCH"), help="batch sizes (default: 1,8,32 on CPU; 1,16,64,128 on GPU)")
    p.add_argument("--input-len", default=env_default("INPUT_LEN", "512"))
    p.add_argument("--output-len", default=env_default("OUTPUT_LEN", "128"))
    p.add_argument("--repeats", default=env_default("REPEATS", "3"), help="timed runs per cell (default 3)")
    p.add_argument("--restarts", default=env_default("RESTARTS", "1"),
                   help="engine starts per target; 2+ puts engine-restart variance into the intervals")
    p.add_argument("--limit", default=env_default("LIMIT"), help="items per task (default: all)")
    p.add_argument("--force", action="store_true", help="re-measure what the ledger has (MOEQ_FORCE=1)")
    p.add_argument("--ledger", default=env_default("LEDGER", "results/ledger.sqlite"))
    p.add_argument("--checkpoints", default=env_default("CHECKPOINTS", "checkpoints"))
    p.add_argument("--weights", default=env_default("WEIGHTS", "real"), choices=["real", "dummy"],
                   help="real, or dummy: the registry model's shape with dummy weights (shape-only, perf only)")
    p.add_argument("--routing", default=env_default("ROUTING"),
                   help="shape-only routing: uniform_random (default; vLLM's simulation, alike for every scheme), "
                        "another vLLM strategy, or zipf:S (skewed)")
    p.add_argument("--warmup-tokens", default=env_default("WARMUP_TOKENS"),
                   help="decode tokens of each cell's untimed warm-up (default: the cell's own output length)")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra vllm.LLM argument, e.g. moe_backend=triton (repeatable; recorded with every row)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("ledger", help="check a ledger (schema, engine settings, poisoned 'unsupported' rows) or migrate it")
    p.add_argument("action", choices=["check", "migrate"])
    p.add_argument("--ledger", default=env_default("LEDGER", "results/ledger.sqlite"))
    p.add_argument("--remove", action="store_true", help="check: delete status rows that are not a backend's refusal")
    p.add_argument("--legacy-settings", help="migrate: YAML describing the settings the schema-1 rows were measured with")
    p.set_defaults(func=cmd_ledger)

    p = sub.add_parser("report", help="tables, verdicts, plots and an HTML page from the ledger")
    p.add_argument("--ledger", default=env_default("LEDGER", "results/ledger.sqlite"))
    p.add_argument("--name", default=env_default("REPORT_NAME", "default"), help="report folder name under --out")
    p.add_argument("--out", default=env_default("REPORTS", "reports"))
    p.set_defaults(func=cmd_report)
