"""reports/h200/NOTES.md from the H200 ledger and the device's JSON results: device time, vLLM's own
benchmark beside moeq's numbers, the routing caveat (measured), and every cell whose spread is over 3%.

    python scripts/h200_notes.py reports/h200      (reads ledger.sqlite, results/*.json, calls.yaml)
"""
import json
import sqlite3
import sys
from pathlib import Path

import yaml

SPREAD_LIMIT = 0.03


def table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:,.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows])


def perf(db, metric="throughput", **where):
    clause = " AND ".join(f"{k} = ?" for k in where)
    q = f"SELECT model, scheme, provenance, cell, value, spread, n FROM results WHERE kind='perf' AND metric=? AND {clause}"
    return db.execute(q, (metric, *where.values())).fetchall()


def cost(folder: Path) -> str:
    calls = yaml.safe_load((folder / "calls.yaml").read_text())
    rows = [[c["what"], c["wall_s"], c.get("note", "")] for c in calls["calls"]]
    return (f"Device time for the whole session: **{calls['device_seconds'] / 60:.1f} min** of one H200 "
            f"(lease time, machine start and uploads included); the sweep itself (engines and cells): "
            f"**{calls['sweep_seconds'] / 60:.1f} min**.\n\n" + table(["call", "command wall s", "note"], rows))


def crosscheck(db, folder: Path) -> str:
    rows = []
    for f in sorted((folder / "results").glob("bench-*.json")):
        stem = f.stem[len("bench-"):]  # bench-MODEL-SCHEME-bBATCH
        model, rest = stem.split("-", 1)
        scheme, batch = rest.rsplit("-b", 1)
        bench = json.loads(f.read_text())
        mine = perf(db, model=model, scheme=scheme, provenance="shape-only", cell=f"b{batch}-i512-o128")
        if not mine:
            continue
        value, spread, n = mine[0][4:]
        rows.append([f"{model} {scheme} b{batch}-i512-o128", bench["tokens_per_second"], value,
                     f"{100 * spread:.1f}%", bench["tokens_per_second"] / value])
    return ("`vllm bench throughput` (vLLM 0.26.0, same shape-only checkpoint, dummy weights, same lengths, "
            "batch = number of prompts, warm-up = one untimed pass of as many prompts, same engine "
            "arguments) beside moeq's median of 3 timed runs; both count prompt + generated tokens per "
            "second of wall time.\n\n" + table(["cell", "vllm bench tok/s", "moeq tok/s", "moeq spread",
                                               "bench / moeq"], rows))


def routing(db, folder: Path) -> str:
    out = []
    path = folder / "results" / "routing.json"
    if path.exists():
        rows = [[Path(r["checkpoint"]).parent.name + "/" + Path(r["checkpoint"]).name, r["weights"], r["routing"],
                 r["num_experts"], r["layers"], r["tokens"], r["median"]["max_over_mean"], r["median"]["cv"],
                 r["median"]["min_over_mean"], r["median"]["entropy"]] for r in json.loads(path.read_text())]
        out.append("Expert load that vLLM routed (`enable_return_routed_experts`) for 16 random-token prompts "
                   "of 512 tokens, per layer, median over layers (`python -m moeq.evaluate.routing`):\n\n"
                   + table(["checkpoint", "weights", "router", "experts", "layers", "tokens", "max/mean",
                            "CV", "min/mean", "entropy"], rows))
    uni = {r[3]: r for r in perf(db, model="olmoe", scheme="bf16", provenance="shape-only")}
    zipf = {r[3]: r for r in db.execute("SELECT model, scheme, provenance, cell, value, spread, n FROM results "
                                        "WHERE kind='perf' AND metric='throughput' AND model='olmoe' AND "
                                        "scheme='bf16' AND provenance LIKE 'shape-only-zipf%'").fetchall()}
    rows = [[cell, uni[cell][4], z[4], z[4] / uni[cell][4] - 1] for cell, z in sorted(zipf.items()) if cell in uni]
    if rows:
        out.append("OLMoE BF16, dummy router vs the Zipf(1) router (`MOEQ_ROUTING=zipf:1.0`), throughput "
                   "(tok/s, median of 3):\n\n" + table(["cell", "dummy router", "Zipf(1)", "Δ"],
                                                       [[c, u, z, f"{100 * d:+.1f}%"] for c, u, z, d in rows]))
    return "\n\n".join(out)


def spreads(db) -> str:
    rows = db.execute("SELECT model, scheme, provenance, cell, metric, spread, repeats FROM results WHERE kind='perf' "
                      "AND metric IN ('throughput', 'itl_mean', 'ttft') AND spread > ? ORDER BY spread DESC",
                      (SPREAD_LIMIT,)).fetchall()
    n = db.execute("SELECT count(*) FROM results WHERE kind='perf' AND metric='throughput'").fetchone()[0]
    over = [r for r in rows if r[4] == "throughput"]
    head = (f"{n} perf cells; {len(over)} with a throughput spread over {SPREAD_LIMIT:.0%} "
            f"(spread = (max − min) / median of the timed repeats).")
    body = [[f"{m} {s} {p} {c}", metric, f"{100 * sp:.1f}%", ", ".join(f"{v:.4g}" for v in json.loads(rep))]
            for m, s, p, c, metric, sp, rep in rows]
    return head + ("\n\n" + table(["cell", "metric", "spread", "repeats"], body) if body else "")


def main(folder="reports/h200"):
    folder = Path(folder)
    db = sqlite3.connect(folder / "ledger.sqlite")
    parts = ["# H200 notes", "Beside the generated report ([report/README.md](report/README.md)); written by "
             "`scripts/h200_notes.py` from `ledger.sqlite` and `results/`.",
             "## Cost", cost(folder), "## Cross-check with vLLM's own benchmark", crosscheck(db, folder),
             "## Routing caveat", routing(db, folder), "## Spreads", spreads(db)]
    (folder / "NOTES.md").write_text("\n\n".join(parts) + "\n")
    print(folder / "NOTES.md")


if __name__ == "__main__":
    main(*sys.argv[1:])
