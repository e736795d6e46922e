"""moeq report"""
from pathlib import Path

from moeq.env import env_default

HELP = "tables, verdicts, plots and an HTML page from the ledger"
ENVIRONMENT = "serve"


def add_args(p):
    p.add_argument("--ledger", default=env_default("LEDGER", "results/ledger.sqlite"))
    p.add_argument("--name", default=env_default("REPORT_NAME", "default"), help="report folder name under --out")
    p.add_argument("--out", default=env_default("REPORTS", "reports"))


def run(args):
    from moeq.evaluate.report.build import build_report
    folder = build_report(Path(args.ledger), args.name, Path(args.out))
    print(f"report: {folder / 'README.md'} (and index.html, plots, CSV/JSON)")
