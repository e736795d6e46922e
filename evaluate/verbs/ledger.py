"""moeq ledger"""
import json
from pathlib import Path

from moeq.env import env_default
from moeq.errors import UserError

HELP = ("check a ledger (schema, engine settings, poisoned 'unsupported' rows), migrate it, or merge other "
        "ledgers' cells into it")
ENVIRONMENT = None  # sqlite3 and PyYAML only


def add_args(p):
    p.add_argument("action", choices=["check", "migrate", "merge"])
    p.add_argument("--from", dest="others", action="append", default=[], metavar="OTHER",
                   help="merge: a ledger whose newer or missing cells are taken in (repeatable)")
    p.add_argument("--ledger", default=env_default("LEDGER", "results/ledger.sqlite"))
    p.add_argument("--remove", action="store_true", help="check: delete status rows that are not a backend's refusal")
    p.add_argument("--legacy-settings", help="migrate: YAML describing the settings the schema-1 rows were measured with")


def run(args):
    import yaml
    from moeq.evaluate import ledger
    from moeq.evaluate.kernels import REFUSALS
    path = Path(args.ledger)
    if not path.is_file():
        raise UserError(f"no ledger at {path}")
    if args.action == "merge":
        if not args.others:
            raise UserError("merge needs at least one OTHER ledger: moeq ledger merge --ledger MAIN --from OTHER ...")
        with ledger.lock(path):
            db = ledger.Ledger(path)
            for other in map(Path, args.others):
                if not other.is_file():
                    raise UserError(f"no ledger at {other}")
                taken, kept = db.merge(other)
                print(f"{other}: {taken} cells taken into {path}, {kept} kept as they were")
        return 0
    if args.action == "migrate":
        record = yaml.safe_load(Path(args.legacy_settings).read_text()) if args.legacy_settings else None
        done = ledger.migrate(path, record)
        print(f"{path}: " + ("migrated to schema " if done else "already at schema ") + str(ledger.VERSION)
              + " (per-item scores: one JSON row per task and metric)")
        return 0
    db = ledger.Ledger(path, readonly=not args.remove)
    poisoned = [r for r in db.rows(cell="status") if not REFUSALS.search(r["note"] or "")]
    for r in poisoned:
        print(f"poisoned: {r['model']} / {r['scheme']} ({r['provenance']}, {r['device']}): {r['note'][:160]}")
        if args.remove:
            db.delete({k: r[k] for k in ledger.KEY}, "status", r["build"])
    settings = dict(db.db.execute("SELECT id, record FROM settings").fetchall())
    print(f"{path}: schema {ledger.VERSION}, {len(db.rows())} rows, {len(poisoned)} poisoned status rows"
          + (" (removed)" if args.remove and poisoned else "") + f", {len(settings)} engine settings:")
    for sid, record in settings.items():
        n = db.db.execute("SELECT COUNT(*) FROM results WHERE settings = ?", (sid,)).fetchone()[0]
        print(f"  {sid}: {n} rows, non-default: {json.dumps(json.loads(record).get('non_default', json.loads(record)))}")
    return 1 if poisoned and not args.remove else 0
