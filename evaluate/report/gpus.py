"""GPUs needed, by scheme (issue 13): a quantized scheme measured on fewer GPUs than bf16 of the same model,
at the same cells, with engine settings equal apart from the layout (reports/h200x2/plan-gpus-needed.yaml:
bf16 with TP=2, fp8 and w4a16-gptq on one GPU). Per cell: throughput per GPU against bf16's (a ratio of
medians with its bootstrap interval), KV capacity on each side, and the GPUs saved."""
import json

import numpy as np
import pandas as pd

from moeq.evaluate import parallel
from moeq.evaluate.report import verdicts
from moeq.evaluate.report.tables import fmt_rate
from moeq.evaluate.report.verdicts import BASELINE

LAYOUT_ARGS = {arg for arg, _ in parallel.FLAGS.values()}  # tensor_parallel_size, enable_expert_parallel, ...
COLUMNS = ["model", "provenance", "backend", "device", "scheme", "gpus", "layout", "settings", "bf16_gpus",
           "bf16_layout", "bf16_settings", "gpus_saved", "cell", "batch", "throughput_per_gpu", "bf16_throughput_per_gpu",
           "per_gpu_pct", "per_gpu_lo", "per_gpu_hi", "kv_cache_tokens", "bf16_kv_cache_tokens", "flag"]


def _unsplit(record: dict) -> str:
    """A settings record with its layout taken out: two groups that differ only in how many GPUs hold the
    model compare."""
    llm = {k: v for k, v in (record.get("llm") or {}).items() if k not in LAYOUT_ARGS}
    rest = {k: v for k, v in record.items() if k not in ("llm", "gpus", "layout", "non_default")}
    return json.dumps({"llm": llm, **rest}, sort_keys=True, default=str)


def table(perf: pd.DataFrame, mem: pd.DataFrame, settings: dict) -> pd.DataFrame:
    if perf.empty:
        return pd.DataFrame(columns=COLUMNS)
    p = perf.assign(unsplit=perf.settings.map(lambda s: _unsplit(settings.get(s) or {})),
                    layout=perf.settings.map(lambda s: (settings.get(s) or {}).get("layout", "1 GPU")))
    kv = mem.set_index(["model", "scheme", "provenance", "backend", "device", "settings"]).kv_cache_tokens.to_dict()
    rows = []
    for (model, prov, backend, device, _), g in p.groupby(["model", "provenance", "backend", "device", "unsplit"]):
        base = g[g.scheme == BASELINE]
        if base.empty:
            continue
        n_base = base.gpus.min()
        b_at = base[base.gpus == n_base].set_index("cell")
        for scheme, q in g[(g.scheme != BASELINE) & (g.gpus < n_base)].groupby("scheme"):
            n = q.gpus.min()
            for a in q[q.gpus == n].sort_values("batch").itertuples():
                if a.cell not in b_at.index:
                    continue
                b = b_at.loc[a.cell]
                point, lo, hi = verdicts.ratio_of_medians(
                    [x / n for x in verdicts.repeats_of(a.repeats, a.throughput)],
                    [x / n_base for x in verdicts.repeats_of(b.repeats, b.throughput)])
                flag = next((f for f in (a.flag, b.flag) if isinstance(f, str) and f), None)
                rows.append({"model": model, "provenance": prov, "backend": backend, "device": device, "scheme": scheme,
                             "gpus": n, "layout": a.layout, "settings": a.settings, "bf16_gpus": n_base,
                             "bf16_layout": b.layout, "bf16_settings": b.settings, "gpus_saved": n_base - n,
                             "cell": a.cell, "batch": a.batch, "throughput_per_gpu": a.throughput / n,
                             "bf16_throughput_per_gpu": b.throughput / n_base, "per_gpu_pct": 100 + point,
                             "per_gpu_lo": 100 + lo, "per_gpu_hi": 100 + hi,
                             "kv_cache_tokens": kv.get((model, scheme, prov, backend, device, a.settings), np.nan),
                             "bf16_kv_cache_tokens": kv.get((model, BASELINE, prov, backend, device, b.settings), np.nan),
                             "flag": flag})
    return pd.DataFrame(rows, columns=COLUMNS)


def unpaired(perf: pd.DataFrame) -> list[str]:
    """Models measured in quantized schemes only, on a device and provenance where no bf16 of theirs ran (issue
    14: Qwen3-235B-A22B w4a16-gptq on one H200 while bf16 needs four): what waits for a pair, said, not dropped."""
    out = []
    for (model, prov, device), g in perf.dropna(subset=["throughput"]).groupby(["model", "provenance", "device"]):
        if (g.scheme == BASELINE).any():
            continue
        runs = sorted({f"{r.scheme} on {r.gpus:.0f} GPU{'s' if r.gpus > 1 else ''}" for r in g.itertuples()})
        out.append(f"{model} ({prov}, {device}): {', '.join(runs)} measured; no bf16 of this model yet, so no pair")
    return out


def sentences(t: pd.DataFrame) -> list[str]:
    """Per model and scheme: "fp8 on 1 GPU saves 1 of bf16's 2 GPUs at X% of its throughput per GPU"."""
    out = []
    for (model, scheme), g in t.groupby(["model", "scheme"], sort=True):
        r0 = g.iloc[0]
        cells = "; ".join(f"b{r.batch:.0f}: {r.per_gpu_pct:.0f}% [{r.per_gpu_lo:.0f}, {r.per_gpu_hi:.0f}]"
                          + (" (flagged)" if isinstance(r.flag, str) else "") for r in g.itertuples())
        out.append(f"{model}: {scheme} on {r0.gpus} GPU{'s' if r0.gpus > 1 else ''} ({r0.layout}) saves {r0.gpus_saved} of "
                   f"bf16's {r0.bf16_gpus} GPUs ({r0.bf16_layout}) at this share of bf16's throughput per GPU: {cells}")
    return out


def display(t: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "Model": t.model, "Scheme": t.scheme, "GPUs (bf16's)": [f"{a} ({b})" for a, b in zip(t.gpus, t.bf16_gpus)],
        "Layout (bf16's)": [f"{a} ({b})" for a, b in zip(t.layout, t.bf16_layout)], "Cell": t.cell,
        "tok/s per GPU (bf16's)": [f"{fmt_rate(a)} ({fmt_rate(b)})" for a, b in zip(t.throughput_per_gpu, t.bf16_throughput_per_gpu)],
        "Per GPU vs bf16 [95% CI]": [f"{p:.0f}% [{lo:.0f}, {hi:.0f}]" for p, lo, hi in zip(t.per_gpu_pct, t.per_gpu_lo, t.per_gpu_hi)],
        "KV tokens (bf16's)": [f"{a:,.0f} ({b:,.0f})" if pd.notna(a) and pd.notna(b) else "—"
                               for a, b in zip(t.kv_cache_tokens, t.bf16_kv_cache_tokens)],
        "GPUs saved": t.gpus_saved, "Flag": t.flag.fillna("")})

