"""reports/h200/NOTES.md from the H200 ledger and the device's JSON results: device time, vLLM's own
benchmark beside moeq's numbers, the routing caveat (measured), and every cell whose spread is over 3%.

    python evaluate/h200_notes.py reports/h200      (reads ledger.sqlite, results/*.json, calls.yaml)
"""
import json
import sqlite3
import sys
from pathlib import Path

import yaml

SPREAD_LIMIT = 0.03


def table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: (f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}") if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows])


def perf(db, metric="throughput", **where):
    clause = " AND ".join(f"{k} = ?" for k in where)
    q = f"SELECT model, scheme, provenance, cell, value, spread, n FROM results WHERE kind='perf' AND metric=? AND {clause}"
    return db.execute(q, (metric, *where.values())).fetchall()


def cost(folder: Path) -> str:
    calls = yaml.safe_load((folder / "calls.yaml").read_text())
    rows = [[c["what"], c["wall_s"], c["held_s"], c.get("note", "")] for c in calls["calls"]]
    return (f"Device time for the whole session: **{calls['device_seconds'] / 60:.1f} min** of one H200 "
            f"(lease time, machine start and uploads included); the sweep itself (engines and cells): "
            f"**{calls['sweep_seconds'] / 60:.1f} min**.\n\n" + table(["call", "command s", "lease clock after, s", "note"], rows))


def crosscheck(db, folder: Path) -> str:
    rows = []
    for f in sorted((folder / "results").glob("bench*-*.json")):
        kind, model, rest = f.stem.split("-", 2)  # bench[1024]-MODEL-SCHEME-bBATCH
        scheme, batch = rest.rsplit("-b", 1)
        inp = 1024 if kind == "bench1024" else 512
        bench = json.loads(f.read_text())["tokens_per_second"]
        mine = perf(db, model=model, scheme=scheme, provenance="shape-only", cell=f"b{batch}-i{inp}-o128")
        value, spread = (mine[0][4], f"{100 * mine[0][5]:.1f}%") if mine else ("not measured", "")
        rows.append([f"{model} {scheme} b{batch}-i{inp}-o128", bench, value, spread,
                     bench / value if mine else ""])
    return ("`vllm bench throughput` (vLLM 0.26.0, same shape-only checkpoint, dummy weights, batch = number "
            "of prompts, one untimed pass of as many prompts first, same engine arguments, its default "
            "multiprocess engine) beside moeq's median of 3 timed runs; both count prompt + generated tokens "
            "per second of wall time. Only one cell could be matched within the device time: the first run "
            "got 1024-token prompts (vLLM's `--random-input-len` default wins over `--input-len`), a cell "
            "moeq did not measure; the second cell planned (OLMoE w4a16-gptq b16) was not run.\n\n"
            + table(["cell", "vllm bench tok/s", "moeq tok/s", "moeq spread", "bench / moeq"], rows))


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
    if path.exists() and rows:
        probes = {(Path(r["checkpoint"]).parent.name, r["weights"], r["routing"]): r["median"]
                  for r in json.loads(path.read_text())}
        dummy, real = probes[("models", "dummy", "model's router")], probes[("models", "real", "model's router")]
        olmoe, zipf = probes[("olmoe", "dummy", "model's router")], probes[("olmoe", "dummy", "zipf:1")]
        d = {c: 100 * x for c, _, _, x in rows}
        out.insert(0, (
            f"**Dummy routers route almost uniformly**: with dummy weights the busiest expert gets "
            f"{olmoe['max_over_mean']:.2f}x the mean load in OLMoE (normalized entropy {olmoe['entropy']:.4f}), "
            f"and the embedded model {dummy['max_over_mean']:.2f}x; the same embedded model with its trained "
            f"weights routes {real['max_over_mean']:.2f}x to its busiest expert and {real['min_over_mean']:.3f}x "
            f"to its idlest (entropy {real['entropy']:.2f}). Every shape-only number here therefore assumes "
            f"balanced experts. A Zipf(1) router (`MOEQ_ROUTING=zipf:1.0`; busiest expert "
            f"{zipf['max_over_mean']:.1f}x the mean) moved OLMoE BF16 by {d['b1-i512-o128']:+.0f}% at b1, "
            f"{d['b16-i512-o128']:+.0f}% at b16, {d['b64-i512-o128']:+.0f}% at b64 and {d['b128-i512-o128']:+.0f}% "
            f"at b128 (512 in / 128 out). Two effects: (1) the simulator's routing (random draws, logs, top-k: "
            f"a few small kernels per layer instead of vLLM's fused top-k) costs, we infer, about 0.3 ms per "
            f"decode step in this 16-layer model: the b1 gap (ITL 1.93 vs 1.65 ms), where both routers read "
            f"8 experts per layer, and about the b64/b128 gaps (+0.35, +0.4 ms); (2) at b16 a skewed router touches fewer distinct experts per step (about 44 "
            f"of 64 against 57 for uniform routing, by simulation of the same draws), so fewer weight bytes are "
            f"read: faster despite (1) (ITL 4.24 vs 4.42 ms). At b64/b128 every expert is touched either way, "
            f"and the loss is about the simulator's overhead. So, for a router as skewed as Zipf(1), uniform "
            f"dummy routing understates b16 throughput by a few percent (more, net of the overhead) and is "
            f"within a few percent at b64/b128; at b1 skew cannot matter (8 experts read either way). "
            f"Quantized schemes were not run with the skewed router (device time)."))
    return "\n\n".join(out)


WHY = """Why, where the spread is over 3% (from the repeats and ITL/TTFT beside them in the ledger):

* **tiny (real weights), every cell**: a 4-million-parameter model finishes a run in 0.2-0.8 s, all of it
  host-side scheduling; its speed numbers measure vLLM's Python overhead, not the GPU. Its rows are there
  for accuracy on real weights and for the pipeline, not for speed claims.
* **b1 cells (OLMoE, Qwen3, Mixtral)**: runs of 0.2-1.1 s where TTFT moves by 10-30 ms between runs
  (host jitter at the first cell of a fresh engine; OLMoE fp8-static b1 speeds up run over run,
  2.13 -> 1.95 -> 1.77 ms ITL: still warming, GPU clocks or the shortened warm-up, not told apart).
  Deltas at b1 carry that uncertainty.
* **Mixtral b16 cells (all schemes)**: bimodal decode step — one run in three is 5-7% faster with the same
  TTFT (ITL 22.3 vs 23.5 ms in BF16 at 512 in; 24.8 vs 27.2 ms at 2048 in), in every scheme alike. The
  median is the slower mode; the bootstrap intervals in the report carry the spread.
* **OLMoE w4a16-gptq b128**: the third run 5% slower (ITL 8.11 vs 7.62 ms).
"""


def spreads(db) -> str:
    rows = db.execute("SELECT model, scheme, provenance, cell, metric, spread, repeats FROM results WHERE kind='perf' "
                      "AND metric = 'throughput' AND spread > ? ORDER BY model, scheme, provenance, cell",
                      (SPREAD_LIMIT,)).fetchall()
    n = db.execute("SELECT count(*) FROM results WHERE kind='perf' AND metric='throughput'").fetchone()[0]
    head = (f"{n} perf cells; {len(rows)} with a throughput spread over {SPREAD_LIMIT:.0%} "
            f"(spread = (max − min) / median of the timed repeats).")
    body = [[f"{m} {s} {p} {c}", metric, f"{100 * sp:.1f}%", ", ".join(f"{v:.4g}" for v in json.loads(rep))]
            for m, s, p, c, metric, sp, rep in rows]
    return head + "\n\n" + WHY + ("\n" + table(["cell", "metric", "spread", "repeats"], body) if body else "")


def main(folder="reports/h200"):
    folder = Path(folder)
    db = sqlite3.connect(folder / "ledger.sqlite")
    parts = ["# H200 notes", "Beside the generated report ([report/README.md](report/README.md)); written by "
             "`evaluate/h200_notes.py` from `ledger.sqlite` and `results/`.",
             "## Cost", cost(folder), "## Cross-check with vLLM's own benchmark", crosscheck(db, folder),
             "## Routing caveat", routing(db, folder), "## Spreads", spreads(db)]
    (folder / "NOTES.md").write_text("\n\n".join(parts) + "\n")
    print(folder / "NOTES.md")


if __name__ == "__main__":
    main(*sys.argv[1:])
