"""Cells where a scheme is slower than bf16 of its group, and the phase that took the added time (INTRO). A
kernel that loses only where many tokens share a weight tile (prefill, large batches) and one that loses on
every step call for different fixes."""
import pandas as pd

from moeq.evaluate.report.verdicts import BASELINE, GROUP

SLOWER = 10  # percent under bf16, as for two schemes of one precision (build.SAME_PRECISION_GAP)
INTRO = ("A batch's latency is its prefill (to the last first token, TTFT p99) and the decoding after it: the "
         "prefill's share of the time a scheme adds over bf16 names the phase it loses in (over 1: it decodes faster).")
COLUMNS = [*GROUP, "scheme", "cell", "batch", "delta_pct", "latency", "latency_bf16", "ttft_p99", "ttft_p99_bf16",
           "itl_p50", "itl_p50_bf16", "ttft_x", "itl_x", "prefill_share", "phase", "moe_kernel", "moe_kernel_bf16"]


def table(perf: pd.DataFrame) -> pd.DataFrame:
    """Per cell more than SLOWER% under bf16 (with per-token times on both sides): TTFT p99 and ITL p50 as
    multiples of bf16's, the prefill's share of the added latency, and the phase that took most of it."""
    key = GROUP + ["cell"]
    base = perf[perf.scheme == BASELINE][key + ["latency", "ttft_p99", "itl_p50", "moe_kernel"]]
    m = perf[perf.scheme != BASELINE].merge(base, on=key, suffixes=("", "_bf16"))
    m = m[(m.delta_pct < -SLOWER) & m.ttft_p99.notna() & m.ttft_p99_bf16.notna() & m.itl_p50.notna()
          & m.itl_p50_bf16.notna()].copy()
    m["ttft_x"] = m.ttft_p99 / m.ttft_p99_bf16
    m["itl_x"] = m.itl_p50 / m.itl_p50_bf16
    m["prefill_share"] = (m.ttft_p99 - m.ttft_p99_bf16) / (m.latency - m.latency_bf16)
    m["phase"] = ["prefill" if s >= 0.5 else "decode" for s in m.prefill_share]
    return m.reindex(columns=COLUMNS).sort_values(["model", "settings", "scheme", "batch"]).reset_index(drop=True)


def summary(slow: pd.DataFrame) -> str:
    """Per phase: how many cells, at which batches, the two multiples' ranges and the schemes."""
    if slow.empty:
        return f"No cell with per-token times is more than {SLOWER}% under bf16."
    parts = [f"{len(g)} in {phase} (batch {g.batch.min():g}-{g.batch.max():g}: TTFT p99 ×{g.ttft_x.min():.2f}-"
             f"{g.ttft_x.max():.2f}, ITL p50 ×{g.itl_x.min():.2f}-{g.itl_x.max():.2f}; {', '.join(sorted(g.scheme.unique()))})"
             for phase, g in slow.groupby("phase")]
    return f"Of {len(slow)} cells more than {SLOWER}% under bf16, " + ", ".join(parts) + "."


def display(slow: pd.DataFrame) -> pd.DataFrame:
    ms = lambda x: f"{1e3 * x:,.1f}"
    return pd.DataFrame({
        "Model": slow.model, "Settings": slow.settings, "Scheme": slow.scheme, "Cell": slow.cell,
        "Δ throughput": slow.delta_pct.map(lambda x: f"{x:+.1f}%"),
        "Latency, s (bf16)": [f"{a:.2f} ({b:.2f})" for a, b in zip(slow.latency, slow.latency_bf16)],
        "TTFT p99, ms (bf16)": [f"{ms(a)} ({ms(b)})" for a, b in zip(slow.ttft_p99, slow.ttft_p99_bf16)],
        "ITL p50, ms (bf16)": [f"{ms(a)} ({ms(b)})" for a, b in zip(slow.itl_p50, slow.itl_p50_bf16)],
        "Prefill's share of the added time": slow.prefill_share.map(lambda x: f"{x:.2f}"), "Phase": slow.phase,
        "Kernel (bf16's)": [f"{a} ({b})" for a, b in zip(slow.moe_kernel.fillna("not recorded"),
                                                           slow.moe_kernel_bf16.fillna("not recorded"))]})
