"""The report's plots, one figure per device and question, one panel per group (small multiples):
speedup over BF16 vs batch, memory and KV capacity, accuracy recovery, ITL vs throughput.

Each function returns (file name, caption) or None when the device has nothing to draw; the caption is
the image's alt text as well.
"""
import json

import matplotlib

matplotlib.use("Agg")  # no display on CI machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from moeq.evaluate.report import verdicts  # noqa: E402
from moeq.evaluate.report.headline import CONTEXT, modal_shape  # noqa: E402
from moeq.evaluate.report.verdicts import BASELINE, GROUP  # noqa: E402

COLUMNS = 4


def _label(g: tuple) -> str:
    gkey = dict(zip(GROUP, g))
    return f"{gkey['model']} · {gkey['provenance']}\nsettings {gkey['settings']}"


def _panels(n: int, height: float = 3.2, width: float = 3.6):
    cols = min(COLUMNS, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(width * cols, 6.5) + 0.6, height * rows + 0.6), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat


def _save(fig, folder, name, caption):
    fig.tight_layout()
    fig.savefig(folder / name, dpi=100)
    plt.close(fig)
    return name, caption


def _plain_log(ax, axis: str):
    """A log axis labelled 1000, 2000 rather than 10^3, 2x10^3 (and no crowded minor labels)."""
    ax.set(**{f"{axis}scale": "log"})
    getattr(ax, f"{axis}axis").set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:,.4g}"))
    getattr(ax, f"{axis}axis").set_minor_formatter(matplotlib.ticker.NullFormatter())


def _legend(ax):
    """A legend listing each drawn label once (flagged rings are drawn per scheme, named once)."""
    handles = dict(zip(*reversed(ax.get_legend_handles_labels())))
    if handles:
        ax.legend(handles.values(), handles.keys(), fontsize=6)


def _in(df, g):
    return df[np.logical_and.reduce([df[k] == v for k, v in zip(GROUP, g)])] if len(df) else df


def _grid(rows, groups, keep):
    """A figure with one panel per group whose rows `keep` accepts, and (axis, group) pairs; None if none."""
    drawn = [g for g in groups if keep(_in(rows, g))]
    if not drawn:
        return None, []
    fig, axes = _panels(len(drawn))
    return fig, list(zip(axes, drawn))


def _at_main_shape(p):
    """The rows of the group's most measured (input, output) shape, and that shape: one line per scheme
    across batches."""
    shape = modal_shape(p)
    return p[(p.input_len == shape[0]) & (p.output_len == shape[1])], shape


def _colours(schemes) -> dict:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {s: cycle[i % len(cycle)] for i, s in enumerate(sorted(set(schemes) - {BASELINE}))} | {BASELINE: "black"}


def speedup(folder, stem, groups, perf, claims, formats):
    """Throughput over BF16 vs batch (log x), the 1.0 line, each claim's stated band shaded."""
    fig, panels = _grid(perf, groups, lambda d: (d.scheme != BASELINE).any() and d.delta_pct.notna().any())
    if fig is None:
        return None
    colour = _colours(perf.scheme)
    for ax, g in panels:
        p, shape = _at_main_shape(_in(perf, g).dropna(subset=["delta_pct", "batch"]))
        p = p[p.scheme != BASELINE]
        for claim in (c for c in claims if c["quantity"] == "throughput"):
            if any(verdicts.covers(claim, formats.get(s), g[0]) for s in p.scheme.unique()):
                lo, hi = claim["range"]
                ax.axhspan(1 + lo / 100, 1 + hi / 100, alpha=0.12, color="green" if "FP8" in claim["text"] else "blue",
                           label=f"claimed: {claim['text'].split(' raises')[0]} +{lo}-{hi}%")
        ax.axhline(1, color="black", lw=0.8)
        for s, q in p.sort_values("batch").groupby("scheme"):
            err = np.array([q.delta_pct - q.delta_lo, q.delta_hi - q.delta_pct]) / 100
            ax.errorbar(q.batch, 1 + q.delta_pct / 100, yerr=np.nan_to_num(err), marker="o", ms=4, capsize=2,
                        color=colour[s], label=s)
            flagged = q[q.flag.notna()]
            ax.scatter(flagged.batch, 1 + flagged.delta_pct / 100, s=90, facecolors="none", edgecolors="red", zorder=3,
                       label="flagged: no verdict" if len(flagged) else None)
        batches = sorted(p.batch.unique())
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [f"{b:.0f}" for b in batches])
        ax.set_title(_label(g), fontsize=8)
        ax.set(xlabel=f"batch ({shape[0]:.0f} in / {shape[1]:.0f} out)", ylabel="throughput / bf16")
        _legend(ax)
    caption = ("Speedup over BF16 vs batch size, one panel per model and settings group: median throughput "
               "ratio with its 95% bootstrap interval, the 1.0 line (no change) and the claimed band shaded; "
               "red rings mark cells a physics or routing check flags (no verdict)")
    return _save(fig, folder, f"{stem}-speedup.png", caption)


def memory(folder, stem, groups, mem):
    """Weights per scheme and the sequences of CONTEXT tokens the KV cache holds beside them."""
    rows = pd.concat([_in(mem, g).drop_duplicates("scheme").assign(label=f"{g[0]} · {g[-1]} · ") for g in groups])
    rows = rows.dropna(subset=["weights_bytes"])
    if rows.empty:
        return None
    rows = rows.assign(label=rows.label + rows.scheme)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.24 * len(rows) + 1.2), sharey=True)
    y = np.arange(len(rows))
    colour = rows.scheme.map(_colours(rows.scheme))
    left.barh(y, rows.weights_bytes / 2**30, color=colour)
    left.set(yticks=y, yticklabels=rows.label, xlabel="weights held by the engine, GiB (log)", title="Weights")
    right.barh(y, rows.kv_cache_tokens // CONTEXT, color=colour)
    right.set(xlabel=f"sequences of {CONTEXT} tokens the KV cache holds (log)", title="KV capacity")
    left.invert_yaxis()
    if rows.kv_cache_tokens.isna().all():
        right.text(0.5, 0.5, "KV capacity not recorded", ha="center", transform=right.transAxes)
    for ax in (left, right)[:1 + rows.kv_cache_tokens.notna().any()]:
        _plain_log(ax, "x")  # log: an 8 MiB model and a 90 GiB one, 150 sequences and 32,000, on one chart
    for ax in (left, right):
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    caption = (f"Memory per scheme: weights the engine holds (GiB) and KV capacity as the number of {CONTEXT}-token "
               "sequences that fit at once, per model, settings group and scheme")
    return _save(fig, folder, f"{stem}-memory.png", caption)


def accuracy(folder, stem, groups, acc, claims, formats):
    """Accuracy recovery (scheme / bf16) per task, with the paired 95% interval as error bars."""
    drawn = [g for g in groups if len(_in(acc, g)) and (_in(acc, g).scheme != BASELINE).any()]
    if not drawn:
        return None
    most = max((_in(acc, g).primary & (_in(acc, g).scheme != BASELINE)).sum() for g in drawn)
    fig, axes = _panels(len(drawn), height=0.22 * most + 1.2, width=5)
    for ax, g in zip(axes, drawn):
        a = _in(acc, g)
        a = a[a.primary & (a.scheme != BASELINE)].sort_values(["task", "scheme"])
        y = np.arange(len(a))
        err = np.nan_to_num(np.array([a.delta_pct - a.delta_lo, a.delta_hi - a.delta_pct]))
        ax.errorbar(100 + a.delta_pct, y, xerr=err, fmt="o", ms=4, capsize=2, color="black")
        ax.axvline(100, color="black", lw=0.8)
        accuracy_claims = [c for c in claims if c["quantity"] == "accuracy_loss"]
        for claim, colour in zip(accuracy_claims, ("red", "purple", "orange")):
            if any(verdicts.covers(claim, formats.get(s), g[0]) for s in a.scheme):
                ax.axvline(100 - claim["bound"]["max"], ls="--", lw=0.8, color=colour,
                           label=f"{claim['text'].split(' loses')[0]}: claimed loss ≤ {claim['bound']['max']}%")
        ax.set(yticks=y, xlabel="accuracy, % of bf16 on the same items")
        ax.set_yticklabels(a.scheme + " · " + a.task, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(_label(g), fontsize=8)
        _legend(ax)
    caption = ("Accuracy recovery: each scheme's score as a percentage of BF16's on the same items, per task, "
               "with its paired 95% bootstrap interval; dashed lines mark the claimed loss bounds")
    return _save(fig, folder, f"{stem}-accuracy.png", caption)


def frontier(folder, stem, groups, perf):
    """Inter-token latency against throughput across the batch sweep: lower right is better."""
    fig, panels = _grid(perf, groups, lambda d: d.throughput.notna().any())
    if fig is None:
        return None
    colour = _colours(perf.scheme)
    for ax, g in panels:
        p, _ = _at_main_shape(_in(perf, g).dropna(subset=["batch", "throughput"]))
        for s, q in p.sort_values("batch").groupby("scheme"):
            itl = q.itl_p50.fillna(q.itl_mean) * 1e3
            ax.plot(q.throughput, itl, marker="o", ms=4, color=colour[s], label=s)
        for r in p[p.scheme == BASELINE].itertuples():
            ax.annotate(f"b{r.batch:.0f}", (r.throughput, (r.itl_p50 if pd.notna(r.itl_p50) else r.itl_mean) * 1e3),
                        fontsize=6, textcoords="offset points", xytext=(3, -8))
        _plain_log(ax, "x")
        _plain_log(ax, "y")
        ax.set_title(_label(g), fontsize=8)
        ax.set(xlabel="throughput, tok/s", ylabel="ITL p50, ms")
        _legend(ax)
    caption = ("Inter-token latency (p50, ms) against throughput (tok/s) over the batch sweep, log-log, one panel "
               "per model and settings group; points are batch sizes (labelled on bf16), lower right is better")
    return _save(fig, folder, f"{stem}-frontier.png", caption)


def serving(folder, stem, serve):
    """Latency against achieved request rate under Poisson load, one row of panels per model, settings group
    and prompt shape (TTFT p99 left, ITL p99 right with p50 dotted: a scheme can be faster at the median and
    slower at the p99 its SLO reads), one line per scheme, the SLO's bounds dashed."""
    ladders = serve[serve["mode"] == "rate"].dropna(subset=["request_throughput"])
    keys = list(ladders.groupby(GROUP + ["input_len", "output_len"]).groups)
    if not keys:
        return None
    fig, axes = plt.subplots(len(keys), 2, figsize=(10, 3.2 * len(keys) + 0.4), squeeze=False)
    colour = _colours(ladders.scheme)
    for (left, right), key in zip(axes, keys):
        rows = ladders[np.logical_and.reduce([ladders[k] == v for k, v in zip(GROUP + ["input_len", "output_len"], key)])]
        for s, q in rows.sort_values("level").groupby("scheme"):
            for ax, metric in ((left, "ttft_p99"), (right, "itl_p99")):
                ax.plot(q.request_throughput, q[metric] * 1e3, marker="o", ms=4, color=colour[s], label=s)
                sat = q[q.saturated == 1]
                ax.scatter(sat.request_throughput, sat[metric] * 1e3, s=90, facecolors="none", edgecolors="red",
                           zorder=3, label="saturated" if len(sat) else None)
            if q.itl_p50.notna().any():
                right.plot(q.request_throughput, q.itl_p50 * 1e3, ls=":", lw=1, color=colour[s])
        right.plot([], [], ls=":", lw=1, color="grey", label="ITL p50")
        slo = json.loads(rows.slo.iloc[0] or "null") or {}
        for ax, k, name in ((left, "ttft", "TTFT p99, ms"), (right, "itl", "ITL p99, ms")):
            if k in slo:
                ax.axhline(slo[k] * 1e3, ls="--", lw=0.8, color="red", label=f"SLO {slo[k] * 1e3:g} ms")
            _plain_log(ax, "x")
            _plain_log(ax, "y")
            ax.set(xlabel="achieved requests/s", ylabel=name)
            ax.set_title(f"{key[0]} · {key[1]} · settings {key[4]} · {key[5]:.0f} in / {key[6]:.0f} out", fontsize=8)
            _legend(ax)
    caption = ("Serving under Poisson load: TTFT p99 and ITL p99 (ms, log; ITL p50 dotted) against the request rate "
               "the server achieved (log), one line per scheme over the rate ladder; red rings mark saturated rates (output "
               "tokens made under 90% as fast as arriving requests owed them; runs before keep-up was measured are "
               "not judged), the dashed line the SLO's bound")
    return _save(fig, folder, f"{stem}-serving.png", caption)
