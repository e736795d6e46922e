"""What the report's first screen says, from its tables: one sentence per claim, a recommendation per
model (group), the caveats that apply to a group, and the numbers behind them as a long numeric table.

Everything here is computed within one group (verdicts.GROUP); formatting is left to render.py except
for the sentences, which are text by nature.
"""
import json

import numpy as np
import pandas as pd

from moeq.evaluate.kernels import config_kind
from moeq.evaluate.ledger import LEGACY
from moeq.evaluate.report.verdicts import BASELINE, FLAGGED, GROUP, HOLDS, NO_BASELINE, NOT_MEASURED, NOT_TIMED

CONTEXT = 2048  # tokens per sequence for "max concurrent sequences": the 2k context
MISSING = "—"


def pct(p, lo=np.nan, hi=np.nan) -> str:
    """"+23.1% [+18.0, +27.9]"; the interval is left out where there is none."""
    if pd.isna(p):
        return MISSING
    p, lo, hi = (round(x, 1) + 0.0 for x in (p, lo, hi))  # + 0.0 turns a rounded -0.0 into 0.0
    return f"{p:+.1f}%" + (f" [{lo:+.1f}, {hi:+.1f}]" if pd.notna(lo) and pd.notna(hi) else "")


def group_key(row) -> tuple:
    return tuple(row[k] if isinstance(row, (dict, pd.Series)) else getattr(row, k) for k in GROUP)


# Engine arguments that make a group a variant of issue 12's rather than a deployment: top-k or expert count
# (hf_overrides), speculation; and a fit claim's arguments (claims.yaml `fit:`, a KV cache sized by hand).
VARIANT_ARGS = ("hf_overrides", "speculative_config")
# Engine settings that make a group an experiment on the engine (another MoE kernel, its environment, a CUDA-graph
# size) rather than the deployment at vLLM's defaults: the tables, findings and serving pages show it, not the answer
EXPERIMENT_ARGS = ("moe_backend", "compilation_config")


def headline_groups(keys: pd.DataFrame, settings: dict | None = None, fits: list[dict] = ()) -> list[tuple]:
    """The groups the first screen speaks of: those measured at recorded settings, not as a variant
    (VARIANT_ARGS, `fits`: those are in "The guide's other claims") nor as an engine experiment (EXPERIMENT_ARGS,
    a kernel environment variable, Triton tiles supplied by device.sh borrow=) and holding a scheme besides bf16, else
    those not measured as a variant, else every group at recorded settings; a ledger holding only legacy
    rows (settings never recorded) speaks of those."""
    groups = [tuple(g) for g in keys[GROUP].drop_duplicates().itertuples(index=False)]
    sid = GROUP.index("settings")
    current = [g for g in groups if g[sid] != LEGACY]
    record = lambda g: (settings or {}).get(g[sid]) or {}
    variant = lambda a: bool(set(a) & set(VARIANT_ARGS + EXPERIMENT_ARGS)) or any(all(a.get(k) == v for k, v in f.items())
                                                                               for f in fits)
    experiment = lambda r: r.get("kernel_env") or r.get("moe_configs")  # a kernel variable; Triton tiles supplied
    plain = [g for g in current if not variant(record(g).get("llm") or {}) and not experiment(record(g))]
    return sorted(with_schemes(keys, plain) or plain or current or groups)


def with_schemes(keys: pd.DataFrame, groups: list[tuple]) -> list[tuple]:
    """The groups holding a scheme besides bf16: a group of bf16 alone has nothing to compare."""
    compared = {tuple(g) for g in keys[keys.scheme != BASELINE][GROUP].itertuples(index=False)}
    return [g for g in groups if g in compared]


def with_bf16(keys: pd.DataFrame, groups: list[tuple]) -> list[tuple]:
    """The groups holding bf16: without it a group has no Δ (a scheme alone on fewer GPUs pairs in "GPUs needed")."""
    based = {tuple(g) for g in keys[keys.scheme == BASELINE][GROUP].itertuples(index=False)}
    return [g for g in groups if g in based]


def modal_shape(perf: pd.DataFrame) -> tuple | None:
    """(input_len, output_len) most of a group's cells use: its batch sweep."""
    shapes = perf.dropna(subset=["batch"]).groupby(["input_len", "output_len"]).size()
    return shapes.idxmax() if len(shapes) else None


def compared_sweep(perf: pd.DataFrame) -> pd.DataFrame:
    """A group's batch sweep at the batches the most schemes were timed at: a plan that extends bf16's sweep
    alone (session 16: Mixtral bf16 to 512) must not make the smallest or largest batch one no scheme is
    compared at."""
    shape = modal_shape(perf)
    if shape is None:
        return perf.iloc[:0]
    sweep = perf[(perf.input_len == shape[0]) & (perf.output_len == shape[1])]
    schemes = sweep.groupby("batch").scheme.nunique()
    return sweep[sweep.batch.isin(schemes[schemes == schemes.max()].index)]


def cell_labels(perf: pd.DataFrame) -> dict:
    """cell -> "b16" for the group's batch sweep, the full cell name for any other shape."""
    shape = modal_shape(perf)
    return {r.cell: f"b{r.batch:.0f}" + ("" if (r.input_len, r.output_len) == shape else
                                          f" ({r.input_len:.0f} in, {r.output_len:.0f} out)")
            for r in perf.dropna(subset=["batch"]).itertuples()}


def short_flag(flag: str) -> str:
    """"host-bound" from "host-bound: the device ..."; a flag inherited from bf16 says so."""
    base = flag.startswith("baseline: ")
    return ("bf16 " if base else "") + flag.removeprefix("baseline: ").split(":")[0]


# verdict notes too long to repeat in a sentence (the verdict table keeps them whole)
SHORT_NOTES = {NO_BASELINE: "no bf16 at these settings",
               "shape-only weights: accuracy not measured": "shape-only weights"}


def _runs(rows: pd.DataFrame, labels: dict) -> list[str]:
    """Consecutive rows with one verdict as one phrase: "holds at b16–b128 (+58 to +67%)". Cells the scheme
    was not timed at (a sweep extended for bf16 alone) are left to the verdict table, unless it has no other."""
    rows = rows.assign(note=rows.note.astype(object).fillna(""))  # a column of no notes is float NaN
    timed = rows[rows.note != NOT_TIMED]
    out, rows = [], (timed if len(timed) else rows).reset_index(drop=True)
    same = rows.verdict + rows.note.map(short_flag) + rows.cell.map(lambda c: "off" * (c in labels and
                                                                                       " " in labels[c]))
    run_id = (same != same.shift()).cumsum()
    for _, run in rows.groupby(run_id, sort=False):
        first, last = run.iloc[0], run.iloc[-1]
        where = "" if first.cell in ("engine", None) or pd.isna(first.cell) else (
            (" on " if first.quantity == "accuracy_loss" else " at ") + labels.get(first.cell, first.cell)
            + (f"–{labels.get(last.cell, last.cell)}" if len(run) > 1 else ""))
        gb = first.quantity == "weights_gb"
        if first.verdict == FLAGGED:
            out.append(f"no verdict{where} ({short_flag(first.note)})")
        elif first.verdict == NOT_MEASURED:
            note = SHORT_NOTES.get(first.note, first.note)
            out.append(f"not measured{where}" + (f" ({note})" if isinstance(note, str) else ""))
        elif len(run) == 1:
            exact = first.lo == first.hi  # a byte count: no interval to show
            out.append(f"{first.verdict}{where} (" + (f"{first.value:.1f} GB" if gb else pct(first.value) if exact
                                                      else pct(first.value, first.lo, first.hi)) + ")")
        else:
            lo, hi = run.value.min(), run.value.max()
            out.append(f"{first.verdict}{where} ({lo:+.0f} to {hi:+.0f}%)")
    return out


def claim_sentences(v: pd.DataFrame, perf: pd.DataFrame, groups: list[tuple], claims: list[dict]) -> list[dict]:
    """Per claim: {claim, text, bound, sentence} over `groups`; groups whose phrase is the same (e.g.
    "not measured (shape-only weights)") share it."""
    v = v[v.claim.notna()]
    out = []
    for claim in claims:
        phrases = []
        for g in groups:
            gkey = dict(zip(GROUP, g))
            rows = v[(v.claim == claim["id"]) & np.logical_and.reduce([v[k] == x for k, x in gkey.items()])]
            if rows.empty or (rows.note == NO_BASELINE).all():
                continue  # a variant measured without its own bf16 (e.g. another moe_backend): the findings table's
            labels = cell_labels(perf[np.logical_and.reduce([perf[k] == x for k, x in gkey.items()])])
            # the batch sweep first, cells of other shapes after it, so runs never mix the two
            rows = rows.assign(off=rows.cell.map(labels).fillna("").str.contains(" ")).sort_values("off", kind="stable")
            parts = [f"{s} " + ", ".join(_runs(r, labels)) for s, r in rows.groupby("scheme", sort=False)]
            if len({p.split(" ", 1)[1] for p in parts}) == 1 and len(parts) > 1:
                parts = [", ".join(rows.scheme.unique()) + " " + parts[0].split(" ", 1)[1]]
            phrases.append((g, "; ".join(parts)))
        models = pd.Series([g[0] for g, _ in phrases], dtype=object)
        by_phrase = {}
        for g, phrase in phrases:  # a model named with its settings only where it has two groups here
            by_phrase.setdefault(phrase, []).append(g[0] if (models == g[0]).sum() == 1 else
                                                    f"{g[0]} (settings {dict(zip(GROUP, g))['settings']})")
        sentence = ". ".join(f"{', '.join(names)}: {phrase}" for phrase, names in by_phrase.items())
        bound, unit = claim["bound"], " GB" if claim["quantity"] == "weights_gb" else "%"
        out.append({"claim": claim["id"], "text": claim["text"],
                    "bound": f"≥ {bound['min']:+g}{unit}" if "min" in bound else f"≤ {bound['max']:g}{unit}",
                    "sentence": sentence})
    return out


def _accuracy_status(v: pd.DataFrame, gkey: dict, schemes: list[str]) -> tuple[list[str], str]:
    """(eligible schemes, what the reader must know about accuracy) for one group."""
    if gkey["provenance"].startswith("shape-only"):
        return schemes, "accuracy not measured on this shape (random weights): recommendation on speed only"
    acc = v[(v.quantity == "accuracy_loss") & np.logical_and.reduce([v[k] == x for k, x in gkey.items()])]
    passing, failing = [], []
    for s in schemes:
        verdicts = set(acc[acc.scheme == s].verdict)
        if verdicts == {HOLDS}:
            passing.append(s)
        else:
            failing.append(f"{s} ({', '.join(sorted(verdicts)) or 'no accuracy claim covers it'})")
    return passing, ("accuracy passes its claim on every task: " + (", ".join(passing) or "none")
                     + ("; not: " + "; ".join(failing) if failing else ""))


def _pick(perf: pd.DataFrame, cell: str, eligible: list[str]) -> dict:
    """The fastest eligible scheme at `cell` whose whole interval is above bf16, else bf16 itself."""
    rows = perf[(perf.cell == cell) & perf.scheme.isin(eligible + [BASELINE])]
    if rows.empty:
        return {"cell": cell, "scheme": None, "why": NOT_TIMED}
    if rows.flag.notna().all():
        return {"cell": cell, "scheme": None, "why": "no speed verdict: " + short_flag(rows.flag.dropna().iloc[0])}
    usable = rows[rows.flag.isna() & (rows.scheme != BASELINE) & (rows.delta_lo > 0)]
    if usable.empty:
        return {"cell": cell, "scheme": BASELINE, "why": "no eligible scheme is faster than bf16 beyond its interval"}
    best = usable.loc[usable.delta_pct.idxmax()]
    return {"cell": cell, "scheme": best.scheme, "delta_pct": best.delta_pct, "delta_lo": best.delta_lo,
            "delta_hi": best.delta_hi, "why": ""}


def recommendations(v, perf, mem, keys, settings, groups) -> pd.DataFrame:
    """Per group with a bf16 row: the scheme for latency (smallest batch) and for throughput (largest
    batch) among those whose accuracy passes its claim, with weights and KV capacity beside bf16's."""
    rows = []
    for g in sorted(groups):
        gkey = dict(zip(GROUP, g))
        sel = lambda df: df[np.logical_and.reduce([df[k] == x for k, x in gkey.items()])] if len(df) else df
        gp, gm = sel(perf), sel(mem).drop_duplicates("scheme").set_index("scheme")
        schemes = sorted(set(sel(keys).scheme))
        if BASELINE not in schemes or gp.empty:
            continue
        eligible, accuracy = _accuracy_status(v, gkey, [s for s in schemes if s != BASELINE])
        sweep = compared_sweep(gp).sort_values("batch")
        for use, cell in (("latency", sweep.cell.iloc[0]), ("throughput", sweep.cell.iloc[-1])):
            p = _pick(gp, cell, eligible)
            s = p["scheme"]
            w = gm.weights_bytes.get(s, np.nan) if s else np.nan
            kv = gm.kv_cache_tokens.get(s, np.nan) if s else np.nan
            rows.append({**gkey, "use": use, "batch": float(sweep.set_index("cell").batch.groupby(level=0).first()[cell]), **p,
                         "weights_bytes": w, "weights_bf16_bytes": gm.weights_bytes.get(BASELINE, np.nan),
                         "max_seqs_2k": kv // CONTEXT, "max_seqs_2k_bf16": gm.kv_cache_tokens.get(BASELINE, np.nan) // CONTEXT,
                         "accuracy": accuracy, "caveats": " | ".join(caveats(gkey, gp, settings))})
    return pd.DataFrame(rows)


def caveats(gkey: dict, perf: pd.DataFrame, settings: dict) -> list[str]:
    """The badges a group's numbers need beside them."""
    rec = settings.get(gkey["settings"], {})
    out = []
    if gkey["provenance"].startswith("shape-only"):
        out.append("shape-only weights")
        routing = rec.get("routing", "model")
        out.append("routing: the dummy weights' own routers" if routing == "model" else f"routing: {routing}")
    extra = {k: x for k, x in (rec.get("non_default") or {}).items()
             if k not in ("disable_log_stats", "kv_cache_memory_bytes", "routing")}
    if rec.get("label") or "llm" not in rec:  # a named settings group: its name, the details in its section
        out.append(rec.get("label") or rec.get("legacy") or "engine settings unknown")
    elif extra:
        out.append("non-default: " + ", ".join(f"{k}={json.dumps(x)}" for k, x in extra.items()))
    kernels = perf.groupby("scheme").moe_kernel.first().dropna()
    if len(kernels) and kernels.nunique() > 1:
        out.append("kernels: " + "; ".join(f"{k} ({', '.join(s)})" for k, s in
                                           kernels.groupby(kernels).groups.items()))
    configs = perf.groupby("scheme").moe_config.first().map(config_kind)
    for kind, said in (("default", "untuned Triton config"), ("supplied", "Triton config not vLLM's own (VLLM_TUNED_CONFIG_FOLDER)")):
        if schemes := sorted(configs[configs == kind].index):
            out.append(f"{said}: " + ", ".join(schemes))
    a16 = perf[perf.experts_a16.fillna(False).astype(bool)].groupby("scheme").moe_dtype.first()
    if len(a16):
        out.append("experts ran with 16-bit activations: " + ", ".join(
            f"{s} (vLLM's {d} kernel)" if isinstance(d, str) else s for s, d in a16.items()))
    if perf.moe_kernel.isna().all():
        out.append("kernels not recorded")
    if "busy_other_gpus" in perf and (perf.busy_other_gpus > 0).any():  # evaluate/host.py: why it matters
        shared = perf[perf.busy_other_gpus > 0]
        load = f"; host load up to {shared.host_load.max():.2f} per core" if shared.host_load.notna().any() else ""
        out.append(f"timed beside work on another GPU of the host: {len(shared)} of {perf.busy_other_gpus.notna().sum()} "
                   f"cells ({', '.join(sorted(shared.scheme.unique()))}{load}): small-batch rows and spreads are "
                   "partly the neighbour's")
    return out


def numbers(perf: pd.DataFrame, acc: pd.DataFrame, mem: pd.DataFrame) -> pd.DataFrame:
    """The report's numbers, one row per (group, scheme, cell, metric), with value, low, high and unit
    (low/high: the 95% interval for a change, min and max of the repeats for a rate)."""
    key = GROUP + ["scheme"]
    rep = [json.loads(r) if isinstance(r, str) else [t] for r, t in zip(perf.repeats, perf.throughput)]
    p = perf.assign(rep_lo=[min(r) for r in rep], rep_hi=[max(r) for r in rep])
    parts = [
        p[key + ["cell"]].assign(metric="throughput", value=p.throughput, low=p.rep_lo, high=p.rep_hi, unit="tok/s"),
        p[key + ["cell"]].assign(metric="throughput_change_vs_bf16", value=p.delta_pct, low=p.delta_lo,
                                 high=p.delta_hi, unit="%"),
        p[key + ["cell"]].assign(metric="ttft_p50", value=p.ttft_p50.fillna(p.ttft), unit="s"),
        p[key + ["cell"]].assign(metric="itl_p50", value=p.itl_p50.fillna(p.itl_mean), unit="s"),
        acc[key + ["task"]].rename(columns={"task": "cell"}).assign(
            metric=acc.metric, value=acc.value, low=acc.value - 1.96 * acc.stderr,
            high=acc.value + 1.96 * acc.stderr, unit="score"),
        acc[key + ["task"]].rename(columns={"task": "cell"}).assign(
            metric=acc.metric + "_change_vs_bf16", value=acc.delta_pct, low=acc.delta_lo, high=acc.delta_hi, unit="%")]
    m = mem.drop_duplicates(key)
    for metric, col, unit in (("weights", "weights_bytes", "bytes"), ("checkpoint", "checkpoint_bytes", "bytes"),
                              ("weights_change_vs_bf16", "weights_bytes_delta_pct", "%"),
                              ("kv_cache_tokens", "kv_cache_tokens", "tokens")):
        parts.append(m[key].assign(cell="engine", metric=metric, value=m[col], unit=unit))
    parts.append(m[key].assign(cell="engine", metric=f"max_sequences_{CONTEXT}_tokens",
                               value=m.kv_cache_tokens // CONTEXT, unit="sequences"))
    out = pd.concat(parts, ignore_index=True).dropna(subset=["value"])
    return out[key + ["cell", "metric", "value", "low", "high", "unit"]]
