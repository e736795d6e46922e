"""The report's outputs from its tables: README.md, a self-contained index.html (plots inlined as
base64 PNG, no external scripts, fonts or images), CSV and JSON of every table, and PNG plots.

The page is a list of blocks (heading, paragraph, table, image) written out twice, as Markdown and as
HTML, so the two never disagree.
"""
import base64
import html
import json
import re
from datetime import datetime, timezone

import matplotlib

matplotlib.use("Agg")  # no display on CI machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from moeq import roofline  # noqa: E402
from moeq.evaluate.report import verdicts  # noqa: E402
from moeq.evaluate.report.verdicts import BASELINE, GROUP  # noqa: E402

QUANTITY = {"throughput": "throughput change", "accuracy_loss": "accuracy loss (relative)",
            "memory": "weights-memory reduction", "weights_gb": "weights held (GB)"}
MISSING = "—"


def fmt_bytes(b) -> str:
    if pd.isna(b):
        return MISSING
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= size:
            return f"{b / size:,.2f} {unit}"
    return f"{b:.0f} B"


def fmt_pct(p, lo=np.nan, hi=np.nan) -> str:
    """"+23.1% [+18.0, +27.9]"; the interval is left out where there is none."""
    if pd.isna(p):
        return MISSING
    p, lo, hi = (round(x, 1) + 0.0 for x in (p, lo, hi))  # + 0.0 turns a rounded -0.0 into 0.0
    return f"{p:+.1f}%" + (f" [{lo:+.1f}, {hi:+.1f}]" if pd.notna(lo) and pd.notna(hi) else "")


def fmt(x, spec: str, scale: float = 1, suffix: str = "") -> str:
    return MISSING if pd.isna(x) else f"{x * scale:{spec}}{suffix}"


def fmt_rate(x) -> str:
    """tok/s: whole numbers from 100 up, three significant digits below (CPU rates can be ~10 tok/s)."""
    return MISSING if pd.isna(x) else f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def as_baseline(display: pd.DataFrame) -> pd.DataFrame:
    """bf16 rows say "baseline" in their Δ columns rather than a change against themselves."""
    deltas = [c for c in display.columns if c.startswith("Δ")]
    display.loc[display.Scheme == BASELINE, deltas] = "baseline"
    return display


def slug(*parts) -> str:
    return re.sub(r"[^a-z0-9]+", "-", " ".join(map(str, parts)).lower()).strip("-")[:80]


def in_group(df: pd.DataFrame, gkey: dict) -> pd.DataFrame:
    return df[np.logical_and.reduce([df[k] == v for k, v in gkey.items()])] if len(df) else df


def scheme_order(schemes) -> list[str]:
    return sorted(set(schemes), key=lambda s: (s != BASELINE, s))


def baseline_first(df: pd.DataFrame, then: list[str], first: bool = False) -> pd.DataFrame:
    """Sorted by scheme with bf16 first, then by `then` (or by `then` first, schemes within)."""
    order = ["not_base", "scheme"]
    by = then + order if first else order + then
    return df.assign(not_base=df.scheme != BASELINE).sort_values(by).drop(columns="not_base")


def verdict_display(v: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "Claim": v.text.fillna(""), "Scheme": v.scheme,
        "Where": v.model + " · " + v.provenance + " · " + v.backend + " · " + v.device + " · settings " + v.settings,
        "Cell / task": v.cell.fillna(""), "Quantity": v.quantity.map(QUANTITY).fillna(""),
        # memory is an exact count: its degenerate interval is not shown
        "Measured [95% CI]": [fmt(x, ".1f", suffix=" GB") if q == "weights_gb" else fmt_pct(x, np.nan, np.nan)
                              if q == "memory" else fmt_pct(x, lo, hi)
                              for q, x, lo, hi in zip(v.quantity, v.value, v.lo, v.hi)],
        "Bound": v.bound.fillna(""), "Stated": v.stated_range.fillna(""), "Position": v.position.fillna(""),
        "Verdict": v.verdict,
        "Checkpoint reduction": [fmt_pct(x) if pd.notna(x) else "" for x in v.checkpoint_reduction],
        "Note": v.note.fillna("")})


def summary_display(gkey, schemes, perf, acc, mem, unsupported) -> pd.DataFrame:
    """One row per scheme: memory, throughput and its change per cell, accuracy and its change per task."""
    perf, acc, mem = in_group(perf, gkey), in_group(acc, gkey), in_group(mem, gkey).set_index("scheme")
    cells = perf.sort_values(["batch", "cell"]).cell.unique()
    rows = []
    for s in schemes:
        note = unsupported.get((*gkey.values(), s))
        row = {"Scheme": s, "Status": (note if note.startswith("unsupported") else f"unsupported: {note}")
               if note else "measured"}
        m = mem.loc[s] if s in mem.index else pd.Series(dtype=float)
        row |= {"Weights": fmt_bytes(m.get("weights_bytes")), "Δ weights": fmt_pct(m.get("weights_bytes_delta_pct")),
                "On disk": fmt_bytes(m.get("checkpoint_bytes")),
                "Δ disk": fmt_pct(m.get("checkpoint_bytes_delta_pct"))}
        own = perf[perf.scheme == s].set_index("cell")
        for c in cells:
            r = own.loc[c] if c in own.index else pd.Series(dtype=float)
            row[f"tok/s {c} (spread)"] = fmt_rate(r.get("throughput")) + (
                f" ({r.spread:.1%})" if pd.notna(r.get("spread")) else "")
            row[f"Δ {c}"] = fmt_pct(r.get("delta_pct"), r.get("delta_lo"), r.get("delta_hi"))
        for r in acc[(acc.scheme == s) & acc.primary].itertuples():
            row[f"{r.task} {r.metric}"] = f"{r.value:.4f}" + (f" ± {r.stderr:.4f}" if pd.notna(r.stderr) else "")
            row[f"Δ {r.task}"] = fmt_pct(r.delta_pct, r.delta_lo, r.delta_hi)
        rows.append(row)
    return as_baseline(pd.DataFrame(rows).fillna(MISSING))


def perf_display(perf: pd.DataFrame) -> pd.DataFrame:
    p = baseline_first(perf, ["batch", "cell"])
    ms = lambda col, spec=",.2f": p[col].map(lambda x: fmt(x, spec, 1e3))
    return pd.DataFrame({
        "Scheme": p.scheme, "Cell": p.cell, "n": p.n.map(lambda n: fmt(n, ".0f")),
        "Engines": p.engine_starts.map(lambda n: fmt(n, ".0f")).replace(MISSING, "1"),
        "Throughput tok/s (spread)": [fmt_rate(t) + (f" ({s:.1%})" if pd.notna(s) else "")
                                      for t, s in zip(p.throughput, p.spread)],
        "Δ vs bf16 [95% CI]": [fmt_pct(*r) for r in p[["delta_pct", "delta_lo", "delta_hi"]].itertuples(index=False)],
        "TTFT p50 / p99 ms": [f"{a} / {b}" for a, b in zip(ms("ttft_p50", ",.1f"), ms("ttft_p99", ",.1f"))],
        "ITL p50 / p99 ms": [f"{a} / {b}" if a != MISSING else f"mean {c}, p99 of request means {d}"
                             for a, b, c, d in zip(ms("itl_p50"), ms("itl_p99"), ms("itl_mean"), ms("itl_request_p99"))],
        "MoE kernel (Triton config)": [f"{k} ({c})" if isinstance(k, str) else MISSING
                                       for k, c in zip(p.moe_kernel, p.moe_config)],
        "Ceiling tok/s": [fmt_rate(c) if pd.notna(c) else r for c, r in zip(p.throughput_ceiling, p.roofline)],
        "% of ceiling (balanced)": [fmt(a, ".1f", suffix="%") + (f" ({b:.1f}%)" if pd.notna(b) and b != a else "")
                                    for a, b in zip(p.pct_of_ceiling, p.pct_of_balanced)],
        "ITL / floor": p.itl_x_floor.map(lambda x: fmt(x, ",.1f", suffix="×")),
        "Decode bound": p.decode_bound.fillna(MISSING), "Flag": p.flag.fillna("")}).pipe(as_baseline)


def accuracy_display(acc: pd.DataFrame) -> pd.DataFrame:
    a = baseline_first(acc, ["task", "metric"], first=True)
    return pd.DataFrame({
        "Task": a.task, "Metric": a.metric + np.where(a.primary, " (claims)", ""), "Scheme": a.scheme,
        "Value ± stderr": [fmt(v, ".4f") + (f" ± {s:.4f}" if pd.notna(s) else "") for v, s in zip(a.value, a.stderr)],
        "n": a.n.map(lambda n: fmt(n, ".0f")),
        "Δ vs bf16, relative [95% CI]": [fmt_pct(*r) for r in
                                         a[["delta_pct", "delta_lo", "delta_hi"]].itertuples(index=False)],
        "Paired items": a.paired_items.map(lambda n: fmt(n, ".0f")),
        "Note": a.note.fillna("")}).pipe(as_baseline)


def plots(folder, stem: str, schemes, perf, acc, mem) -> list[tuple[str, str]]:
    """Throughput vs batch, accuracy vs throughput, memory per scheme; returns (file, caption) pairs."""
    made = []

    def save(fig, kind, caption):
        fig.tight_layout()
        fig.savefig(folder / f"{stem}-{kind}.png", dpi=110)
        plt.close(fig)
        made.append((f"{stem}-{kind}.png", caption))

    timed = perf.dropna(subset=["batch", "throughput"])
    if len(timed):
        fig, ax = plt.subplots(figsize=(6.4, 4))
        shapes = timed.groupby(["input_len", "output_len"]).ngroups
        for (s, i, o), p in timed.groupby(["scheme", "input_len", "output_len"]):
            p = p.sort_values("batch")
            reps = [json.loads(r) if isinstance(r, str) else [t] for r, t in zip(p.repeats, p.throughput)]
            err = [[t - min(r) for t, r in zip(p.throughput, reps)], [max(r) - t for t, r in zip(p.throughput, reps)]]
            ax.errorbar(p.batch, p.throughput, yerr=err, marker="o", capsize=3,
                        label=s if shapes == 1 else f"{s} (in {i:.0f}, out {o:.0f})")
        batches = sorted(timed.batch.unique())
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [f"{b:.0f}" for b in batches])
        ax.set(xlabel="batch size", ylabel="throughput, tok/s (median; bars: min to max)")
        ax.legend(fontsize=7)
        save(fig, "throughput", "Throughput vs batch size per scheme")
    top = perf.dropna(subset=["batch"]).sort_values("batch").cell.iloc[-1] if perf.batch.notna().any() else None
    points = [(s, perf[(perf.scheme == s) & (perf.cell == top)].throughput.mean(),
               acc[(acc.scheme == s) & acc.primary].value.mean()) for s in schemes]
    points = [p for p in points if pd.notna(p[1]) and pd.notna(p[2])]
    if points:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for s, x, y in points:
            ax.scatter(x, y)
            ax.annotate(s, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(xlabel=f"throughput at {top}, tok/s", ylabel="mean accuracy over tasks")
        save(fig, "accuracy-throughput", f"Accuracy (mean of the claim metric over tasks) vs throughput at {top}")
    m = mem.set_index("scheme").reindex([s for s in schemes if s in set(mem.scheme)])
    if m.weights_bytes.notna().any():
        fig, ax = plt.subplots(figsize=(6.4, 0.5 * len(m) + 1.5))
        y = np.arange(len(m))
        unit, size = ("GiB", 2**30) if m.weights_bytes.max() >= 2**30 else ("MiB", 2**20)
        ax.barh(y - 0.2, m.weights_bytes / size, 0.4, label="weights in engine")
        ax.barh(y + 0.2, m.checkpoint_bytes / size, 0.4, label="checkpoint on disk")
        ax.set(yticks=y, yticklabels=m.index, xlabel=unit)
        ax.invert_yaxis()
        ax.legend(fontsize=7)
        save(fig, "memory", "Memory per scheme")
    return made


def findings_display(f: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "Model": f.model, "Where": f.provenance + " · " + f.device + " · settings " + f.settings, "Cell": f.cell,
        "A": f.scheme_a, "B": f.scheme_b, "A tok/s": f.throughput_a.map(fmt_rate), "B tok/s": f.throughput_b.map(fmt_rate),
        "A / B": f.ratio.map(lambda x: f"{x:.2f}×"), "A's kernel": f.kernel_a, "B's kernel": f.kernel_b,
        "Variants": f.variants})


def settings_text(record: dict) -> str:
    """What a reader must know about an engine's settings: what vLLM would not have picked."""
    if "llm" not in record:
        return record.get("legacy", "engine settings unknown")
    extra = record.get("non_default") or {}
    label = f"{record['label']}: " if record.get("label") else ""
    return label + ("vLLM defaults" if not extra else "non-default: " + ", ".join(
        f"{k}={json.dumps(v)}" for k, v in extra.items() if k not in ("disable_log_stats", "kv_cache_memory_bytes"))
        + (" (vLLM's other settings: defaults)" if extra else ""))


def blocks(name, ledger_path, tables, keys, unsupported, env, settings, folder) -> list[tuple]:
    v, perf, acc, mem, found = (tables[k] for k in ("verdicts", "performance", "accuracy", "memory", "findings"))
    out = [("h1", f"moeq report: {name}"),
           ("p", f"From `{ledger_path}`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Every table is also in "
                 "this folder as CSV and JSON (numbers unrounded)."),
           ("h2", "Claims"), ("table", verdict_display(v), "verdicts")]
    if len(found):
        out += [("h2", "Findings: one precision, two speeds"),
                ("p", "Cells where two schemes of the same precision (weight and activation type and bits) differ "
                      "in throughput by more than 10%, with the MoE kernel vLLM chose for each and whether its Triton "
                      "config was tuned for the device; `variants` are the same cells measured with another "
                      "`moe_backend`, which separates the kernel from the format."),
                ("table", findings_display(found), "findings")]
    out += [("h2", "Methods"), ("p", METHODS_MD),
            ("table", pd.DataFrame(verdicts.RULES.items(), columns=["Verdict", "When"]), "verdict-rules"),
            ("p", "Roofline. " + roofline.__doc__.split("\n", 1)[1].strip()
             + " Peak rates come from devices.yaml; devices it lacks (every CPU) show no roofline.")]
    out += [("h2", "Provenance"), ("p", "Where each number comes from: one section below per group; `env` "
                                        "is the ledger's environment record (library versions, device, commit)."),
            ("table", provenance_display(keys, env, settings), "provenance")]
    for g, k in keys.groupby(GROUP):
        gkey = dict(zip(GROUP, g))
        schemes = scheme_order(k.scheme)
        stem = slug(*g)
        out.append(("h2", f"{gkey['model']}: {gkey['provenance']} weights, {gkey['backend']} on {gkey['device']}, "
                          f"settings {gkey['settings']}"))
        out.append(("p", "Engine settings: " + settings_text(settings.get(gkey["settings"], {})) + "."))
        if gkey["provenance"].startswith("shape-only"):
            out.append(("p", "Shape-only: the real architecture with random weights, so speed and memory are "
                             "measured but accuracy is not measured."))
        summary = summary_display(gkey, schemes, perf, acc, mem, unsupported)
        out += [("h3", "Summary"), ("table", summary, f"{stem}-summary")]
        gp, ga = in_group(perf, gkey), in_group(acc, gkey)
        if len(gp):
            out += [("h3", "Performance"), ("table", perf_display(gp), f"{stem}-performance")]
        if len(ga):
            out += [("h3", "Accuracy"), ("table", accuracy_display(ga), f"{stem}-accuracy")]
        out += [("img", f, c) for f, c in plots(folder, stem, schemes, gp, ga, in_group(mem, gkey))]
    return out


METHODS_MD = (
    "Comparisons: a scheme is compared only with the bf16 row of the same model, provenance (real weights or "
    "shape-only), backend, device and engine settings (the settings id; the scheme's own vLLM `quantization` "
    "argument aside). Performance: each cell (batch B, input length I, output length O) runs once "
    "untimed, then n timed repeats (over 2+ engine starts where `Engines` says so, so that the interval holds "
    "engine-restart variance; else within one engine only); tables show the median of the repeats, and spread = "
    "(max − min) / median. Throughput = B·(I+O) / latency. TTFT p50/p99 over the requests of a run; ITL p50/p99 "
    "over every inter-token gap of every request (vLLM's own per-token statistic), each the median over runs; "
    "rows measured before 2026-11-30 kept only per-request mean ITLs (shown as such). The MoE kernel and "
    "whether its Triton config was tuned for the device are what vLLM logged at engine start. Accuracy: lm-eval scores ± their "
    "stderr; Δ is relative (scheme / bf16 − 1), and an accuracy loss is −Δ; the claims use, per task, the first "
    "of exact_match, acc_norm, acc with per-item scores. Memory: the weights the engine holds (parameters and "
    "buffers, so quantization scales count), relative to bf16; checkpoint size on disk as a second column. "
    + verdicts.METHODS)


def provenance_display(keys, env, settings) -> pd.DataFrame:
    rows = []
    for g, k in keys.groupby(GROUP):
        records = env[env.id.isin(k.env_id.dropna().astype(int))]
        rows.append(dict(zip(["Model", "Provenance", "Backend", "Device", "Settings"], g)) | {
            "Engine settings": settings_text(settings.get(g[-1], {})),
            "Schemes": ", ".join(scheme_order(k.scheme)),
            "env": "; ".join(f"{i}: {_short(r)}" for i, r in zip(records.id, records.record)) or MISSING})
    return pd.DataFrame(rows)


def _short(record: str) -> str:
    """An env record flattened to key=value pairs, for one table cell."""
    flat = pd.json_normalize(json.loads(record)).iloc[0]
    return ", ".join(f"{k}={v}" for k, v in flat.items())


def to_markdown(blocks) -> str:
    parts = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            parts.append("#" * int(kind[1]) + " " + rest[0])
        elif kind == "p":
            parts.append(rest[0])
        elif kind == "table":
            parts.append(rest[0].to_markdown(index=False, disable_numparse=True) if len(rest[0]) else "_(none)_")
        elif kind == "img":
            parts.append(f"![{rest[1]}]({rest[0]})")
    return "\n\n".join(parts) + "\n"


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:110em;color:#222}
table{border-collapse:collapse;font-size:.85em;margin:1em 0}
th,td{border:1px solid #ccc;padding:.3em .5em;text-align:left}
th{background:#f0f0f0}td.holds{background:#d4f4d4}td.fails{background:#f8d0d0}td.inconclusive{background:#fbf0c0}
td.not-measured{background:#e8e8e8;color:#555}td.flagged{background:#e6d8f5}figure{margin:1em 0}code{background:#f4f4f4;padding:0 .2em}"""


def to_html(blocks, folder) -> str:
    parts = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            parts.append(f"<{kind}>{html.escape(rest[0])}</{kind}>")
        elif kind == "p":
            parts.append("<p>" + re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(rest[0])) + "</p>")
        elif kind == "table":
            table = rest[0].to_html(index=False, table_id=rest[1], border=0, na_rep=MISSING)
            parts.append(re.sub(r"<td>(holds|fails|inconclusive|not measured|flagged)</td>",
                                lambda m: f'<td class="{m[1].replace(" ", "-")}">{m[1]}</td>', table))
        elif kind == "img":
            data = base64.b64encode((folder / rest[0]).read_bytes()).decode()
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(rest[1])}">'
                         f"<figcaption>{html.escape(rest[1])}</figcaption></figure>")
    title = html.escape(blocks[0][1])
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def write_all(folder, name, ledger_path, tables, keys, unsupported, env, settings, log=print):
    for table_name, df in tables.items():
        df.to_csv(folder / f"{table_name}.csv", index=False)
        df.to_json(folder / f"{table_name}.json", orient="records", indent=2)
    page = blocks(name, ledger_path, tables, keys, unsupported, env, settings, folder)
    summaries = [(b[1], b[2]) for b in page if b[0] == "table" and b[2].endswith("-summary")]
    summary = pd.concat([df.assign(group=stem.removesuffix("-summary")) for df, stem in summaries])
    summary.to_csv(folder / "summary.csv", index=False)
    summary.to_json(folder / "summary.json", orient="records", indent=2, force_ascii=False)
    (folder / "README.md").write_text(to_markdown(page))
    (folder / "index.html").write_text(to_html(page, folder))
    log(f"wrote {len(tables) + 1} tables (CSV, JSON), README.md, index.html and "
        f"{sum(b[0] == 'img' for b in page)} plots")
