"""Claims (claims.yaml), bootstrap intervals of the deltas vs BF16, and the verdict on each claim.

A verdict compares the 95% interval [lo, hi] of the measured quantity with the claim's bound b, in
percent: RULES below says exactly how. The position says whether the point estimate lies in, above or
below the claim's stated range.
"""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from moeq.errors import UserError
from moeq.schemes import BASELINE, BF16_FORMAT

CLAIMS_FILE = Path(__file__).with_name("claims.yaml")
QUANTITIES = ("throughput", "accuracy_loss", "memory", "weights_gb")
FORMAT_KEYS = tuple(BF16_FORMAT)
HOLDS, FAILS, INCONCLUSIVE, NOT_MEASURED, FLAGGED = "holds", "fails", "inconclusive", "not measured", "flagged"
GROUP = ["model", "provenance", "backend", "device", "settings"]
NO_BASELINE = "no bf16 row with the same model, provenance, backend, device and engine settings"
NOT_TIMED = "not timed"  # a cell the group timed that this scheme lacks
LEVEL, N_BOOT, SEED = 0.95, 2000, 20240611
RULES = {
    HOLDS: "the whole interval is on the claim's side of the bound b: lo ≥ b for a minimum, hi ≤ b for a maximum",
    FAILS: "the whole interval is on the other side: hi < b for a minimum, lo > b for a maximum",
    INCONCLUSIVE: "the interval straddles b (lo < b ≤ hi for a minimum, lo ≤ b < hi for a maximum), or the "
                  "value was measured but has no interval (a single timed repeat; accuracy without per-item scores)",
    NOT_MEASURED: "no data; the backend could not run the scheme (status unsupported); no bf16 row with the same "
                  "model, provenance, backend, device and engine settings; accuracy on shape-only weights; or a "
                  "scheme whose format is unknown (no recipe)",
    FLAGGED: "the cell fails a physics check (faster than the device's bytes and FLOPs allow, or a speedup larger "
             "than the bytes and FLOPs of the two formats allow), is host-bound (under 1% of the roofline ceiling), "
             "routes on a degenerate dummy router, or was timed while another GPU of its host ran compute work "
             "(shared host): a finding to explain, not evidence for or against the claim; for a claim comparing "
             "variants of one model, also a cell on a device with no roofline",
    "not testable as written": "the guide's recipe cannot run as written on the vLLM measured (its own error is "
                               "quoted); the nearest testable form is a claim of its own"}
# A two-sided bound {within: [a, b]} (a recommended batch): holds if a <= lo and hi <= b, fails if hi < a or
# lo > b, else inconclusive (compare.py).
METHODS = (f"Intervals are {LEVEL:.0%} percentile-bootstrap intervals ({N_BOOT} resamples, seed {SEED}). "
           "Throughput: the timed repeats of the scheme and of BF16 are resampled independently and the "
           "ratio of their medians taken. Accuracy: the items both were scored on are resampled together "
           "(paired) and the ratio of the mean scores taken. Memory is an exact byte count: no interval.")


def load_claims(path: Path = CLAIMS_FILE) -> dict:
    doc = yaml.safe_load(Path(path).read_text())
    ids = [c.get("id") for c in doc["claims"]]
    if dup := sorted({i for i in ids if ids.count(i) > 1}):
        raise UserError(f"{path}: claim id {dup[0]!r} is used twice")
    for c in doc["claims"]:
        if "covers" not in c or "compare" in c or "batch" in c or c.get("quantity") not in QUANTITIES:
            check_other_claim(c, path)  # issue 12's claims: compare.py
            continue
        missing = {"id", "text", "covers", "quantity", "bound", "range"} - set(c)
        if (missing or c["quantity"] not in QUANTITIES or len(set(c["bound"]) & {"min", "max"}) != 1
                or not isinstance(c["covers"], dict) or set(c["covers"]) - set(FORMAT_KEYS)):
            raise UserError(f"{path}: claim {c.get('id')!r} needs id, text, covers (keys among "
                            f"{', '.join(FORMAT_KEYS)}), quantity (one of {', '.join(QUANTITIES)}), "
                            "bound {min: x} or {max: x} and range [lo, hi]")
    return doc


OTHER_QUANTITIES = ("throughput", "accuracy_loss", "memory", "weights_change", "recommended_batch", "speedup",
                    "acceptance_rate", "min_gpu_memory_gb", "best_expert_count")
AXES = ("top_k", "num_experts", "ffn_width", "keep", "speculation")


def check_other_claim(c: dict, path):
    """A claim compared across variants of one model (`compare: {axis, variant, reference}`), about a batch
    sweep (`batch: {share: 0.9}` or `{itl_p99_ms: x}`), about a family of variants (`family: {axis}`: the
    member with the most throughput per GB of weights), about an engine's memory at stated engine arguments
    (`fit: {kv_cache_memory_bytes: B, ...}` with `covers`), or not yet measurable (`plan:` names what would
    measure it; `not_testable: {reason, measured, nearest}` when the guide's recipe cannot run as written)."""
    problem = None
    bound = c.get("bound") or {}
    if {"id", "text", "quantity", "bound"} - set(c):
        problem = "needs id, text, quantity and bound"
    elif c["quantity"] not in OTHER_QUANTITIES:
        problem = f"quantity must be one of {', '.join(OTHER_QUANTITIES)}"
    elif len(set(bound) & {"min", "max", "within"}) != 1 or ("within" in bound and len(bound["within"]) != 2):
        problem = "bound must be {min: x}, {max: x} or {within: [lo, hi]}"
    elif "compare" in c and (c["compare"].get("axis") not in AXES or {"variant", "reference"} - set(c["compare"])):
        problem = f"compare needs axis (one of {', '.join(AXES)}), variant and reference"
    elif "fit" in c and (not isinstance(c["fit"], dict) or not c["fit"] or not isinstance(c.get("covers"), dict)
                         or set(c["covers"]) - set(FORMAT_KEYS)):
        problem = (f"fit needs engine arguments ({{kv_cache_memory_bytes: B, ...}}) and covers (keys among "
                   f"{', '.join(FORMAT_KEYS)})")
    elif "family" in c and c["family"].get("axis") not in AXES:
        problem = f"family needs axis (one of {', '.join(AXES)}): the coordinate its members differ in"
    elif "benchmark" in c and {"file", "variant", "reference"} - set(c["benchmark"]):
        problem = "benchmark needs file (a JSON beside the ledger, under benchmarks/), variant and reference"
    elif "compare" not in c and "batch" not in c and not c.get("plan") and not c.get("not_testable"):
        problem = "a claim no ledger quantity measures needs plan: (what would measure it) or not_testable:"
    elif c.get("not_testable") and {"reason", "measured"} - set(c["not_testable"]):
        problem = "not_testable needs reason and measured (the message the recipe got)"
    if problem:
        raise UserError(f"{path}: claim {c.get('id')!r}: {problem}")


def scheme_claims(claims: list[dict]) -> list[dict]:
    """The claims about a scheme against BF16 of the same model (this module's verdict table)."""
    return [c for c in claims if "compare" not in c and "batch" not in c and c.get("quantity") in QUANTITIES
            and "covers" in c]


def covers(claim: dict, fmt: dict | None, model: str) -> bool:
    """Whether a scheme of this format (and this model) is one the claim speaks of."""
    if not fmt or (claim.get("models") and model not in claim["models"]):
        return False
    return all(fmt.get(k) in values for k, values in claim["covers"].items())


def interval(replicates) -> tuple[float, float]:
    lo, hi = np.percentile(replicates, [50 * (1 - LEVEL), 50 * (1 + LEVEL)])
    return float(lo), float(hi)


def ratio_of_medians(scheme: list[float], base: list[float]) -> tuple[float, float, float]:
    """Percent change of the median, with its interval (NaN when either side has a single repeat)."""
    s, b = np.asarray(scheme, float), np.asarray(base, float)
    point = 100 * (np.median(s) / np.median(b) - 1)
    if len(s) < 2 or len(b) < 2:
        return point, np.nan, np.nan
    rng = np.random.default_rng(SEED)
    reps = np.median(rng.choice(s, (N_BOOT, len(s))), 1) / np.median(rng.choice(b, (N_BOOT, len(b))), 1)
    return (point, *interval(100 * (reps - 1)))


def _ratio_replicates(s: np.ndarray, b: np.ndarray, rng) -> np.ndarray:
    """N_BOOT ratios of means over items resampled alike for both (in chunks: tasks can have 10k+ items
    and a 2000 x n index array at once would take too much memory)."""
    reps = []
    for start in range(0, N_BOOT, 250):
        idx = rng.integers(0, len(s), (min(250, N_BOOT - start), len(s)))
        with np.errstate(divide="ignore", invalid="ignore"):
            reps.append(s[idx].mean(1) / b[idx].mean(1))
    return np.concatenate(reps)


def paired_ratio_of_means(scheme, base) -> tuple[float, float, float]:
    """Percent change of the mean score over the same items, resampling items."""
    s, b = np.asarray(scheme, float), np.asarray(base, float)
    point = 100 * (s.mean() / b.mean() - 1) if b.mean() else np.nan
    reps = _ratio_replicates(s, b, np.random.default_rng(SEED))
    reps = reps[np.isfinite(reps)]
    return (point, *interval(100 * (reps - 1))) if len(reps) and np.isfinite(point) else (point, np.nan, np.nan)


def paired_mean_recovery(pairs: list[tuple]) -> tuple[float, float, float]:
    """Recovery (scheme / bf16, %) averaged over tasks, as quantized-model cards report it, with a
    bootstrap interval that resamples each task's items independently (pairs: (scheme, bf16) per task)."""
    pairs = [(np.asarray(s, float), np.asarray(b, float)) for s, b in pairs if len(s) and np.mean(b)]
    if not pairs:
        return np.nan, np.nan, np.nan
    point = 100 * float(np.mean([s.mean() / b.mean() for s, b in pairs]))
    rng = np.random.default_rng(SEED)
    reps = 100 * np.mean([_ratio_replicates(s, b, rng) for s, b in pairs], axis=0)
    reps = reps[np.isfinite(reps)]
    return (point, *interval(reps)) if len(reps) else (point, np.nan, np.nan)


def judge(point: float, lo: float, hi: float, bound: dict) -> str:
    if pd.isna(point):
        return NOT_MEASURED
    if pd.isna(lo) or pd.isna(hi):
        return INCONCLUSIVE
    if "min" in bound:
        return HOLDS if lo >= bound["min"] else FAILS if hi < bound["min"] else INCONCLUSIVE
    return HOLDS if hi <= bound["max"] else FAILS if lo > bound["max"] else INCONCLUSIVE


def range_position(point: float, stated: list) -> str:
    if pd.isna(point):
        return ""
    return "below range" if point < stated[0] else "above range" if point > stated[1] else "in range"


def _select(df: pd.DataFrame, gkey: dict, scheme: str | None = None) -> pd.DataFrame:
    mask = np.logical_and.reduce([df[k] == v for k, v in gkey.items()])
    return df[mask & (df.scheme == scheme)] if scheme else df[mask]


def _measured(perf, acc, mem, quantity, gkey, scheme) -> list[dict]:
    """The claim's quantity for one scheme in one group: one dict per perf cell, task, or engine."""
    if quantity == "throughput":
        own = _select(perf, gkey, scheme).set_index("cell")
        # every cell the group timed, so a cell this scheme lacks shows up as not measured
        cells = _select(perf, gkey).sort_values(["batch", "cell"]).cell.unique()
        return [({"cell": c, "value": own.delta_pct[c], "lo": own.delta_lo[c], "hi": own.delta_hi[c]}
                 | ({"flag": own.flag[c], "note": own.flag[c]} if isinstance(own.flag[c], str) else {}))
                if c in own.index else {"cell": c, "note": NOT_TIMED} for c in cells]
    if quantity == "accuracy_loss":
        # a loss is the negated relative change, so its interval flips too
        return [{"cell": r.task, "value": -r.delta_pct, "lo": -r.delta_hi, "hi": -r.delta_lo,
                 "note": (f"{r.metric}, {r.paired_items:.0f} paired items" if r.paired_items
                          else f"{r.metric}: no per-item scores to pair, so no interval")
                         + (f"; {r.note}" if isinstance(r.note, str) and r.note else "")}
                for r in _select(acc, gkey, scheme).query("primary").itertuples()]
    if quantity == "weights_gb":
        return [{"cell": "engine", "value": r.weights_bytes / 1e9, "lo": r.weights_bytes / 1e9,
                 "hi": r.weights_bytes / 1e9, "note": "weights held by the engine, exact (GB = 10^9 bytes)"}
                for r in _select(mem, gkey, scheme).itertuples()]
    return [{"cell": "engine", "value": -r.weights_bytes_delta_pct, "lo": -r.weights_bytes_delta_pct,
             "hi": -r.weights_bytes_delta_pct, "checkpoint_reduction": -r.checkpoint_bytes_delta_pct,
             "note": "weights held by the engine, exact"} for r in _select(mem, gkey, scheme).itertuples()]


def verdict_table(claims: dict, formats: dict, keys: pd.DataFrame, perf, acc, mem,
                  unsupported: dict) -> pd.DataFrame:
    """One row per claim x covered scheme x group (x perf cell or task). `keys`: the ledger's
    (model, scheme, provenance, backend, device, settings) rows; `formats`: scheme -> its format (weight
    and activation type and bits); `unsupported`: (*group, scheme) -> the backend's reason."""
    rows = []
    for g, in_group in keys.groupby(GROUP):
        gkey, present = dict(zip(GROUP, g)), set(in_group.scheme)
        for claim in scheme_claims(claims["claims"]):
            bound, absolute = claim["bound"], claim["quantity"] == "weights_gb"
            (side, limit), = bound.items()
            # the schemes this group measured (BF16 too, for an absolute claim)
            covered = sorted(s for s, f in formats.items() if covers(claim, f, gkey["model"]) and s in present)
            for scheme in covered:
                if (claim["quantity"] == "accuracy_loss" and gkey["provenance"].startswith("shape-only")
                        and BASELINE in present):
                    found = [{"note": "shape-only weights: accuracy not measured"}]  # whether vLLM runs it or not
                elif (*g, scheme) in unsupported and not (
                        # accuracy can still be scored on decompressed weights (each such row says so)
                        claim["quantity"] == "accuracy_loss" and _measured(perf, acc, mem, "accuracy_loss", gkey, scheme)):
                    found = [{"note": unsupported[(*g, scheme)]}]
                elif BASELINE not in present and not absolute:
                    found = [{"note": NO_BASELINE}]
                else:
                    found = _measured(perf, acc, mem, claim["quantity"], gkey, scheme) or [{"note": "no data"}]
                for f in found:
                    value, lo, hi = (f.get(k, np.nan) for k in ("value", "lo", "hi"))
                    rows.append({"claim": claim["id"], "text": claim["text"], "quantity": claim["quantity"],
                                 **gkey, "scheme": scheme, "bound_side": side, "bound": limit,
                                 "range_low": claim["range"][0], "range_high": claim["range"][1],
                                 "unit": "GB" if absolute else "%", **f,
                                 "verdict": FLAGGED if f.get("flag") else judge(value, lo, hi, bound),
                                 "position": range_position(value, claim["range"])})
        for scheme in sorted(present - {s for s, f in formats.items() if f} - {BASELINE}):
            rows.append({**gkey, "scheme": scheme, "verdict": NOT_MEASURED,
                         "note": "no recipe for this scheme, so its format and claims are unknown"})
    cols = ["claim", "text", "quantity", *GROUP, "scheme", "cell", "value", "lo", "hi", "unit", "bound_side", "bound",
            "range_low", "range_high", "position", "verdict", "checkpoint_reduction", "flag", "note"]
    return pd.DataFrame(rows, columns=cols)


def repeats_of(text, value) -> list[float]:
    """A cell's timed repeats as the ledger stores them (JSON), or its one value when none were kept."""
    return json.loads(text) if isinstance(text, str) else [value]
