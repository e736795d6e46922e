"""Serving under load (`moeq serve-bench`, ledger kind "serve"): the rate ladder and concurrency sweep per
scheme, the request rate each scheme sustains under its SLO, and the throughput claims restated there.

Capacity under the SLO: at each ladder rate, the headroom is the smallest of bound / p99 over the SLO's
keys and keep-up / SUSTAINED (output tokens made during the send window over those owed, serve_load.keep_up);
a rate is inside when it is >= 1. The capacity is the achieved request throughput where the headroom crosses
1, interpolated (in log headroom) between the last rate inside and the first outside. A ladder that never
left the SLO gives a lower bound, one outside from its first rate an upper bound: neither is turned into a
number. With 2+ runs at the two rates around each ladder's crossing (`--repeats` at every rate, `--knee-repeats` at
those two only), each point's runs are resampled (a run's metrics together) for a 95% bootstrap interval of the
ratio. A run whose
p99 has a 95% interval (its requests resampled) that holds the SLO's bound is marked "at the bound": one more
run of that rate could land on the other side. Runs measured before these marks and the kernel counts existed
(sessions 8-18 on the H200) read "—" for kernels compiled and carry no mark either way. Their saturation is
not judged either: it was recorded under the completion-span rule, which read a server that admits every
request and slows down as keeping up (Mixtral bf16 at 32 req/s: 21.5 req/s done, "no"); their capacity
rests on the SLO's keys alone. The kernel column also names the largest step the server captured in a CUDA graph,
from its log (servers since H200 session 22; earlier rows did not keep that line; vLLM 0.26's default is 512 tokens):
a step of more tokens runs outside the graphs. "Gaps over the ITL bound" is the share of a run's inter-token gaps
longer than the SLO's ITL bound (the p99 bound holds while at most 1% pass it); runs before H200 session 24 did not
keep it and read "—".
"""
import json
import re

import numpy as np
import pandas as pd

from moeq import roofline
from moeq.evaluate.ledger import KEY as LEDGER_KEY
from moeq.evaluate.report import verdicts
from moeq.evaluate.report.verdicts import BASELINE, GROUP, INCONCLUSIVE, NOT_MEASURED
from moeq.evaluate.serve_load import SUSTAINED, ladder_outcome, slo_text

KEY = list(LEDGER_KEY)
ENGINE_KIND = "serve-engine"  # serve-bench's record of its server's MoE kernel
CELL = re.compile(r"^serve-i(\d+)~(\d+)-o(\d+)-([rc])([0-9.e+-]+)$")
SHAPE = ["input_len", "input_spread", "output_len"]
METRICS = ["request_throughput", "output_throughput", "throughput", "goodput", "ttft_p50", "ttft_p99", "itl_p50",
           "itl_p99", "tpot_p99", "e2el_p50", "e2el_p99", "arrival_rate", "keep_up", "saturated", "slo_met",
           "completed", "failed", "pause_max", "itl_over_slo", "jit_compiles", "jit_reruns", "slo_at_bound"]
NO_ROOFLINE = "no verdict: speed on a device with no roofline (a CPU)"
UNSTABLE = ("a ladder went back inside the SLO after leaving it, so its p99s are noise at this many runs per rate; "
            "repeat each rate (--repeats), or let --knee-repeats 2+ settle the disputed rates, for a capacity")


def offline(results: pd.DataFrame) -> pd.DataFrame:
    """The rows serve-bench did not write (its runs, its server's kernel, a scheme its server refused): a group of
    those alone has no offline claim or cell, and this page covers them."""
    return results[~(results.kind.isin(("serve", ENGINE_KIND)) | (results.cell == "serve-status"))]


def serve_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (group, scheme, cell): shape, mode (rate or concurrency), level, metrics, SLO, runs."""
    s = results[results.kind == "serve"]
    cols = KEY + ["cell", *SHAPE, "mode", "level", *METRICS, "slo", "runs"]
    if s.empty:
        return pd.DataFrame(columns=cols)
    df = s.pivot_table(index=KEY + ["cell"], columns="metric", values="value", aggfunc="first").reset_index()
    df = df.reindex(columns=KEY + ["cell"] + METRICS)
    shape = df.cell.str.extract(CELL.pattern)
    df["input_len"], df["input_spread"], df["output_len"] = shape[0].astype(float), shape[1].astype(float) / 100, shape[2].astype(float)
    df["mode"] = shape[3].map({"r": "rate", "c": "concurrency"})
    df["level"] = shape[4].astype(float)
    df.loc[df.keep_up.isna(), "saturated"] = np.nan  # the completion-span rule's flag: not judged (docstring)
    loads = {tuple(r[k] for k in KEY + ["cell"]): json.loads(r["note"]) for _, r in s[s.metric == "load"].iterrows()}
    df["slo"] = [json.dumps(loads.get(tuple(r[k] for k in KEY + ["cell"]), {}).get("slo_s")) for _, r in df.iterrows()]
    runs = {}
    for _, r in s[s.repeats.notna()].iterrows():
        runs.setdefault(tuple(r[k] for k in KEY + ["cell"]), {})[r["metric"]] = json.loads(r["repeats"])
    df["runs"] = [json.dumps(runs.get(tuple(r[k] for k in KEY + ["cell"]), {})) for _, r in df.iterrows()]
    return df.reindex(columns=cols).sort_values(KEY + ["mode", "level"]).reset_index(drop=True)


def headroom(point: dict, slo: dict) -> float:
    """min(bound / p99 per SLO key, keep-up / SUSTAINED): >= 1 inside the SLO."""
    known = lambda m: point.get(m) is not None and pd.notna(point[m]) and point[m] > 0
    ratios = [bound / point[f"{k}_p99"] if known(f"{k}_p99") else np.inf for k, bound in slo.items()]
    if point.get("keep_up") is not None and pd.notna(point["keep_up"]):
        ratios.append(max(point["keep_up"], 1e-6) / SUSTAINED)  # 0 (nothing done while sending) stays loggable
    return float(min(ratios))


def capacity(points: list[tuple[float, float]]) -> tuple[float, str]:
    """From (achieved req/s, headroom) in ladder order: (req/s where the headroom crosses 1, how known):
    'at' (interpolated), 'lower bound' (never outside), 'upper bound' (outside from the first rate)."""
    inside = [i for i, (_, h) in enumerate(points) if h >= 1]
    if not points:
        return np.nan, "not measured"
    if not inside or inside[0] != 0:
        return points[0][0], "upper bound"
    last = _first_out(points)
    if last is None:
        return points[-1][0], "lower bound"
    if any(h >= 1 for _, h in points[last + 1:]):
        # back inside after leaving (session 8: Qwen3 bf16 out at 8 req/s, in at 16 and 32, one run per rate):
        # p99 noise, not a capacity; a crossing picked from it would make any ratio (it made +388%)
        return np.nan, "not monotonic"
    (x0, h0), (x1, h1) = points[last - 1], points[last]
    t = np.log(h0) / (np.log(h0) - np.log(h1))
    return float(x0 + t * (x1 - x0)), "at"


def _first_out(points: list[tuple[float, float]]) -> int | None:
    """The index of the first rate outside the SLO (headroom < 1): the crossing lies just below it."""
    return next((i for i, (_, h) in enumerate(points) if h < 1), None)


def _point(row, slo, run: int | None = None) -> tuple[float, float]:
    runs = json.loads(row.runs) if isinstance(row.runs, str) else {}
    value = lambda m: runs[m][run] if run is not None and m in runs else getattr(row, m, None)
    p = {m: value(m) for m in ("request_throughput", "keep_up", "ttft_p99", "itl_p99",
                               "tpot_p99", "e2el_p99")}
    return p["request_throughput"], headroom(p, slo)


def ladder_rows(serve: pd.DataFrame) -> dict:
    """(group..., scheme, input_len, input_spread, output_len) -> that ladder's rate rows, by rate."""
    rates = serve[serve["mode"] == "rate"].sort_values("level")
    return {k: g for k, g in rates.groupby(GROUP + ["scheme", *SHAPE])}


def runs_per_rate(g: pd.DataFrame) -> str:
    """'1', or '1; 3 at 16, 32 req/s' where the knee was repeated."""
    n = {r.level: len(json.loads(r.runs).get("request_throughput", [0])) for r in g.itertuples()}
    low = min(n.values())
    more = {k: v for k, v in n.items() if v > low}
    return f"{low}" + (f"; {max(more.values())} at {', '.join(f'{k:g}' for k in more)} req/s" if more else "")


def capacity_table(serve: pd.DataFrame, kernels: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per ladder: the highest rate sustained under the SLO, saturation, the interpolated capacity, and the
    MoE kernel the server's engine chose and its largest CUDA graph (kernels: per engine key, from the server log)."""
    graphs = lambda n: "" if pd.isna(n) else f"; CUDA graphs to {n:.0f} tokens"
    found = {tuple(r[:len(KEY)]): f"{r.moe_kernel} ({r.moe_config}){graphs(getattr(r, 'cuda_graph_tokens', None))}" for r in
             (kernels if kernels is not None else pd.DataFrame(columns=KEY)).itertuples(index=False)}
    rows = []
    for key, g in ladder_rows(serve).items():
        slo = json.loads(g.slo.iloc[0] or "null") or {}
        outcome = ladder_outcome([(r.level, None if pd.isna(r.saturated) else bool(r.saturated), bool(r.slo_met))
                                  for r in g.itertuples()])
        cap, how = capacity([_point(r, slo) for r in g.itertuples()])
        rows.append({**dict(zip(GROUP + ["scheme", *SHAPE], key)), "slo": slo_text(slo) if slo else "",
                     "rates": ", ".join(f"{x:g}" for x in g.level), "max_rate_under_slo": outcome["max_rate_under_slo"],
                     "saturated_at": outcome["saturated_at"], "capacity": cap, "capacity_kind": how,
                     "outcome": outcome["text"], "runs_per_rate": runs_per_rate(g),
                     "moe_kernel": found.get(tuple(g.iloc[0][k] for k in KEY), "not recorded")})
    return pd.DataFrame(rows)


def capacity_ratio(base: pd.DataFrame, other: pd.DataFrame, slo: dict) -> tuple[float, float, float]:
    """Percent more requests/s the other ladder sustains than the base under the SLO, with a bootstrap
    interval when both ladders' rates either side of the crossing have 2+ runs (NaN interval otherwise; a rate of
    one run is held fixed in the resamples); NaN when a capacity is not a crossing."""
    cap = lambda g, pick=None: capacity([_point(r, slo, pick(r) if pick else None) for r in g.itertuples()])
    (b, bk), (o, ok) = cap(base), cap(other)
    if bk != "at" or ok != "at":
        return np.nan, np.nan, np.nan
    point = 100 * (o / b - 1)
    n_runs = lambda g: [len(json.loads(r.runs).get("request_throughput", [])) for r in g.itertuples()]

    def knee_runs(g):  # runs at the rates either side of its crossing (both capacities are 'at': 1 <= i)
        i = _first_out([_point(r, slo) for r in g.itertuples()])
        return n_runs(g)[i - 1:i + 1]
    if min(knee_runs(base) + knee_runs(other)) < 2:
        return point, np.nan, np.nan
    rng = np.random.default_rng(verdicts.SEED)
    reps = []
    for _ in range(verdicts.N_BOOT // 4):  # each replicate re-interpolates two ladders: a quarter of the resamples
        pick = lambda r: int(rng.integers(len(json.loads(r.runs)["request_throughput"])))
        (rb, kb), (ro, ko) = cap(base, pick), cap(other, pick)
        if kb == ko == "at":
            reps.append(100 * (ro / rb - 1))
    return (point, *verdicts.interval(reps)) if len(reps) > 10 else (point, np.nan, np.nan)


MULTIPLES = {"itl_p50": "ITL p50", "itl_p99": "ITL p99", "ttft_p99": "TTFT p99"}


def where_it_differs(base: pd.DataFrame, other: pd.DataFrame, slo: dict) -> dict:
    """At the lower of the two ladders' first rates outside the SLO (where the capacities part), the other
    scheme's latencies as multiples of bf16's: a scheme can decode faster at the median and still leave a p99
    SLO first, when its slowest steps are slower (Qwen3 fp8 on the H200, NOTES.md, session 21)."""
    outs = [_first_out([_point(r, slo) for r in g.itertuples()]) for g in (base, other)]
    if None in outs:
        return {}
    rate = min(g.level.iloc[i] for g, i in zip((base, other), outs))
    b, o = (g[g.level == rate] for g in (base, other))
    if b.empty or o.empty:
        return {}
    ratio = lambda m: (o[m].iloc[0] / b[m].iloc[0]) if m in b and m in o and b[m].iloc[0] > 0 else np.nan
    return {"at_rate": rate, **{f"{m}_x": ratio(m) for m in MULTIPLES}}


def claim_table(serve: pd.DataFrame, claims: list[dict], formats: dict) -> pd.DataFrame:
    """The throughput claims at equal SLO: per claim, group, shape and covered scheme, the change in
    requests/s sustained under the SLO against bf16's ladder of the same group and shape."""
    ladders = ladder_rows(serve)
    rows = []
    for claim in (c for c in claims if c["quantity"] == "throughput"):
        found = False
        for key, g in ladders.items():
            gkey = dict(zip(GROUP + ["scheme", *SHAPE], key))
            if gkey["scheme"] == BASELINE or not verdicts.covers(claim, formats.get(gkey["scheme"]), gkey["model"]):
                continue
            found = True
            base = ladders.get((*key[:len(GROUP)], BASELINE, *key[len(GROUP) + 1:]))
            slo = json.loads(g.slo.iloc[0] or "null") or {}
            pct, lo, hi = capacity_ratio(base, g, slo) if base is not None else (np.nan,) * 3
            if base is None:
                verdict, why = NOT_MEASURED, "no bf16 ladder in this group and shape"
            elif np.isnan(pct):
                kinds = {capacity([_point(r, slo) for r in x.itertuples()])[1] for x in (base, g)}
                verdict, why = INCONCLUSIVE, (UNSTABLE if "not monotonic" in kinds else
                                              "a capacity is only bounded (a ladder never left, or never entered, the SLO)")
            elif roofline.match_device(gkey["device"]) is None:
                verdict, why = NO_ROOFLINE, ""
            else:
                verdict = verdicts.judge(pct, lo, hi, claim["bound"])
                why = "" if pd.notna(lo) else "one run at a rate either side of a crossing: no interval"
            rows.append({"claim": claim["text"], **gkey, "slo": slo_text(slo) if slo else "", "change_pct": pct,
                         "low": lo, "high": hi, "verdict": verdict, "why": why,
                         **(where_it_differs(base, g, slo) if pd.notna(pct) else {})})
        if not found:
            rows.append({"claim": claim["text"], "verdict": NOT_MEASURED,
                         "why": "no serve rows of a scheme it covers (`make serve-bench`)"})
    return pd.DataFrame(rows)


def sentence(r) -> str:
    """'fp8 serves +23.0% [+15.2, +31.0] requests per second vs bf16 at the same p99 latency (...)'."""
    if r.verdict == NOT_MEASURED and pd.isna(r.get("scheme")):
        return f"{r.claim}: not measured under load ({r.why})"
    head = f"{r.claim}, under load on {r.model} ({r.device}, settings {r.settings}): {r.scheme}"
    if pd.isna(r.change_pct):
        return f"{head}: {r.verdict} ({r.why})"
    return (f"{head} serves {r.change_pct:+.1f}%{_interval(r)} requests per second vs bf16 at the same p99 latency "
            f"({r.slo}): {r.verdict}" + (f" ({r.why})" if r.why else "") + _differs(r))


def _interval(r) -> str:
    return f" [{r.low:+.1f}, {r.high:+.1f}]" if pd.notna(r.low) else ""


def _differs(r) -> str:
    """'; at 16 req/s, where ..., its ITL p50 ×0.77, ITL p99 ×1.06 and TTFT p99 ×1.29 bf16's (...)'."""
    found = [(name, r.get(f"{m}_x")) for m, name in MULTIPLES.items()]
    found = [(name, x) for name, x in found if pd.notna(x)]
    if pd.isna(r.get("at_rate")) or not found:
        return ""
    text = ", ".join(f"{name} ×{x:.2f}" for name, x in found[:-1]) + (" and " if len(found) > 1 else "")
    text += f"{found[-1][0]} ×{found[-1][1]:.2f}"
    split = (pd.notna(r.get("itl_p50_x")) and pd.notna(r.get("itl_p99_x")) and r.itl_p50_x < 1 < r.itl_p99_x)
    return (f"; at {r.at_rate:g} req/s, where the first of the two left the SLO, its {text} bf16's"
            + (" (faster typical steps, slower slowest ones: a p99 bound is decided by the slowest)" if split else ""))


def _ratios(claims: pd.DataFrame) -> str:
    """' Requests per second at equal SLO against bf16: fp8 on mixtral (settings ...) +86.1% (inconclusive); ...'"""
    rows = claims[claims.change_pct.notna()] if "change_pct" in claims else claims.iloc[:0]
    if rows.empty:
        return ""
    return (" Requests per second at equal SLO against bf16: " + "; ".join(
        f"{r.scheme} on {r.model} (settings {r.settings}) {r.change_pct:+.1f}%{_interval(r)} ({r.verdict})"
        for r in rows.itertuples()) + ".")


def _ms(x) -> str:
    return "—" if pd.isna(x) else f"{1e3 * x:,.1f}"


def capacity_display(cap: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "Model": cap.model, "Weights": cap.provenance, "Device": cap.device, "Settings": cap.settings, "Scheme": cap.scheme,
        "Prompt tokens (in ± spread / out)": [f"{r.input_len:.0f} ± {100 * r.input_spread:.0f}% / {r.output_len:.0f}"
                                             for r in cap.itertuples()],
        "SLO": cap.slo, "Rates tried, req/s": cap.rates,
        "Capacity under the SLO, req/s": ["not placed: the ladder went back inside the SLO after leaving it"
                                          if r.capacity_kind == "not monotonic" else
                                          ("≥ " if r.capacity_kind == "lower bound" else "< " if r.capacity_kind ==
                                           "upper bound" else "") + f"{r.capacity:.3g}" for r in cap.itertuples()],
        "Ladder": cap.outcome, "Runs per rate": cap.runs_per_rate, "MoE kernel (Triton config)": cap.moe_kernel})


def rows_display(serve: pd.DataFrame) -> pd.DataFrame:
    s = serve.sort_values(GROUP + ["scheme", "mode", "level"], ascending=[True] * len(GROUP) + [True, False, True])
    return pd.DataFrame({
        "Model": s.model, "Settings": s.settings, "Scheme": s.scheme,
        "Load": [f"{r.level:g} req/s" if r.mode == "rate" else f"{r.level:g} in flight" for r in s.itertuples()],
        "Done, req/s": s.request_throughput.map(lambda x: f"{x:.3g}"), "Out tok/s": s.output_throughput.map(lambda x: f"{x:,.0f}"),
        "Goodput, req/s": s.goodput.map(lambda x: f"{x:.3g}"), "TTFT p50 / p99, ms": [f"{_ms(a)} / {_ms(b)}" for a, b in zip(s.ttft_p50, s.ttft_p99)],
        "ITL p50 / p99, ms": [f"{_ms(a)} / {_ms(b)}" for a, b in zip(s.itl_p50, s.itl_p99)],
        "E2E p99, ms": s.e2el_p99.map(_ms), "Longest pause, ms": s.pause_max.map(_ms),
        "Gaps over the ITL bound": s.itl_over_slo.map(lambda x: f"{100 * x:.2f}%" if pd.notna(x) else "—"),
        # kernels the server compiled during the kept run, and runs redone because one compiled (serve_bench)
        "Kernels compiled (runs redone)": [f"{c:.0f} ({r:.0f})" if pd.notna(c) else "—"
                                           for c, r in zip(s.jit_compiles, s.jit_reruns.fillna(0))],
        "Failed": [f"{f:.0f} of {c + f:.0f}" if pd.notna(f) and pd.notna(c) else "—" for f, c in zip(s.failed, s.completed)],
        "Saturated (keep-up)": ["—" if r.mode != "rate" else "not judged" if pd.isna(r.saturated) else
                                f"{'yes' if r.saturated else 'no'} ({r.keep_up:.2f})" for r in s.itertuples()],
        "SLO met": [{1.0: "yes", 0.0: "no"}.get(m, "—") + (" (at the bound)" if b == 1.0 else "")
                    for m, b in zip(s.slo_met, s.slo_at_bound)]})


def section(tables_: dict, folder, stem: str) -> list[tuple]:
    """The README's short paragraph and the serving page (its own Markdown page, folded in index.html)."""
    from moeq.evaluate.report import plots
    serve, cap, claims = tables_["serving"], tables_["serving_capacity"], tables_["serving_claims"]
    out = [("h2", "Serving under load")]
    if serve.empty:
        return out + [("p", "Not measured: this ledger has no serve rows (`make serve-bench MODEL= SCHEME=`), so "
                            "the throughput claims are not restated at equal SLO.")]
    counts = claims.verdict.value_counts().to_dict() if len(claims) else {}
    out.append(("p", f"vLLM's OpenAI-compatible server under Poisson load (`moeq serve-bench`): {len(cap)} rate "
                     f"ladders and {int((serve['mode'] == 'concurrency').sum())} fixed-concurrency runs. The "
                     "throughput claims at equal SLO: " + (", ".join(f"{n} {v}" for v, n in counts.items()) or "none")
                + "." + _ratios(claims)))
    inner = [("p", __doc__.split("\n\n", 1)[1].replace("\n", " ").strip()),
             ("h3", "The throughput claims at equal SLO")]
    inner += [("p", sentence(r) + ".") for _, r in claims.iterrows()]
    inner += [("h3", "Capacity under the SLO, per scheme"), ("table", capacity_display(cap), "serving-capacity")]
    if made := plots.serving(folder, stem, serve):
        inner.append(("img", *made))
    inner += [("h3", "Every run")]
    if (failing := serve[serve.failed.fillna(0) > 0]).shape[0]:  # vLLM's client counts them apart from the metrics
        inner.append(("p", f"{len(failing)} of {len(serve)} runs had failed requests ({failing.failed.sum():.0f} of "
                           f"{(failing.failed + failing.completed).sum():.0f} sent): the latencies and throughputs "
                           "are those of the completed requests only; `moeq serve-bench` logs their causes."))
    inner += [("table", rows_display(serve), "serving-runs")]
    return out + [("details", "Serving: rate ladders, capacity under the SLO, the claims at equal SLO", "serving", inner)]
