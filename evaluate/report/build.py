"""`moeq report`: comparison tables, claim verdicts, roofline and plots from the results ledger.

A scheme is compared only with the bf16 row of the same model, provenance, backend, device and engine
settings (verdicts.GROUP), so numbers from other hardware, shape-only weights or other engine settings
never share a ratio.
"""
import json
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd

from moeq import pruned, roofline
from moeq.evaluate import kernels
from moeq.evaluate.report import compare, gpus, headline, render, routing_load, serving, slower, verdicts
from moeq.evaluate.ledger import KEY as LEDGER_KEY, LEGACY, LEGACY_RECORD, build_of
from moeq.evaluate.report.verdicts import BASELINE, GROUP
from moeq.evaluate.settings import KERNEL_ENV
from moeq.atomic import staged_dir
from moeq.errors import UserError

KEY = list(LEDGER_KEY)
PERF_METRICS = ["throughput", "output_throughput", "latency", "ttft", "ttft_p50", "ttft_p99", "itl_mean", "itl_p50",
                "itl_p99", "itl_request_p99", "warmup", "engine_starts", "spec_acceptance_rate", "spec_acceptance_length",
                "host_load", "busy_other_gpus"]
MEMORY_METRICS = ["weights_bytes", "checkpoint_bytes", "peak_memory_bytes", "kv_cache_tokens",
                  "kv_bytes_per_token", "load_seconds"]
ROOF_COLS = ["roofline", "routing", "throughput_ceiling", "pct_of_ceiling", "balanced_ceiling", "pct_of_balanced",
             "latency_floor", "ttft_floor", "ttft_x_floor", "itl_floor", "itl_x_floor", "decode_bound"]


def read_ledger(path: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """results, items, env and engine settings, read-only (opening it through Ledger would create a
    missing file, and migrate an old one). A schema-1 ledger reads as one legacy settings group."""
    if not path.is_file():
        raise UserError(f"no ledger at {path}: run `make eval` first")
    try:
        with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True) as db:
            per_item = "item_rows" if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'item_rows'").fetchone() \
                else "items"  # schema 4 keeps a task's scores as one JSON row, the view one row per item
            results, items, env = (pd.read_sql_query(f"SELECT * FROM {t}", db) for t in ("results", per_item, "env"))
            has_settings = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'settings'").fetchone()
            settings = dict(db.execute("SELECT id, record FROM settings").fetchall()) if has_settings else {}
    except (sqlite3.DatabaseError, pd.errors.DatabaseError) as e:
        raise UserError(f"{path} is not a moeq results ledger ({e}): run `make eval` first") from e
    if results.empty:
        raise UserError(f"the ledger {path} holds no results: run `make eval` first")
    for df in (results, items):
        if "settings" not in df:
            df["settings"] = LEGACY
        if "build" not in df:  # schema 1-2: one build per key
            df["build"] = ""
    settings = {k: json.loads(v) for k, v in settings.items()}
    settings.setdefault(LEGACY, LEGACY_RECORD)
    return results, items, env, settings


def base_of(checkpoint) -> str | None:
    """The model build a row measured, where its checkpoint says: a load-time scheme's '<source>+vllm:<method>',
    a quantized checkpoint's '<identity>+from:<source>' (written since session 8; older rows do not say)."""
    if not isinstance(checkpoint, str) or ("+from:" not in checkpoint and "+vllm:" not in checkpoint):
        return None  # a bf16 build's own identity, or a quantized row written before builds were said
    return build_of("real", checkpoint)


def label_builds(results: pd.DataFrame, items: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """A model measured on more than one build (an embedded model rebuilt between sessions: GPU training is not
    bitwise reproducible, so each build is other weights) carries its build in its rows' provenance ("real ·
    build e358b9e1"): every build's rows stay in the report, each a group of its own, and nothing pairs across
    them. A model pruned from it carries the build it was pruned from, so that it pairs with that build only.
    A row that does not say its build (written before builds were recorded) belongs to its group's newest
    bf16 build. Returns (results, items, one row per model and build: rows, first and last measured)."""
    none = pd.DataFrame(columns=["model", "build", "provenance", "rows", "first", "last"])
    real = results[results.provenance == "real"].dropna(subset=["checkpoint"])
    bf16 = real.checkpoint[real.scheme == BASELINE]
    # a pruned checkpoint '<own>+from:<build>': what is quantized from it names <own>
    pruned_from = dict(c.split("+from:", 1) for c in bf16 if "+from:" in c)

    def base(checkpoint):  # the build a checkpoint names (None: it names none)
        b = base_of(checkpoint)
        return pruned_from.get(b, b)
    newest = real[real.scheme == BASELINE].sort_values("created").groupby(GROUP).checkpoint.last()
    if newest.empty:
        return results, items, none
    newest = newest.map(lambda c: base(c) or c)
    row_base = real.checkpoint.map(base).fillna(bf16)
    build = row_base.fillna(real[GROUP].join(newest.rename("current"), on=GROUP).current).dropna()
    model = real.model[build.index]
    family = model.map(lambda m: pruned.parse(m)[0])  # a pruned model is labelled when the model it came from is
    rebuilt = build[model == family].groupby(model).nunique().loc[lambda n: n > 1].index
    build = build[(build.groupby(model).transform("nunique") > 1) | family.isin(rebuilt)]
    if build.empty:
        return results, items, none
    labelled = results.provenance[build.index] + " · build " + build.str[:8]
    moved = results.loc[build.index, KEY + ["build", "cell"]].assign(labelled=labelled).drop_duplicates(KEY + ["build", "cell"])
    results = results.copy()
    results.loc[build.index, "provenance"] = labelled
    items = items.merge(moved.rename(columns={"cell": "task"}), on=KEY + ["build", "task"], how="left")
    items = items.assign(provenance=items.labelled.fillna(items.provenance)).drop(columns="labelled")
    table = (results.loc[build.index].assign(build=build).groupby(["model", "build", "provenance"])
             .created.agg(rows="size", first="min", last="max").reset_index())
    return results, items, table


def with_baseline(df: pd.DataFrame, on: list[str], cols: list[str], settings: str = "settings") -> pd.DataFrame:
    """Each row beside the `cols` of the bf16 row of its group (suffix _bf16; NaN where there is none), bf16 taken
    at the settings in column `settings` (a kernel variant's: baseline_settings)."""
    base = df.loc[df.scheme == BASELINE, GROUP + on + cols].rename(columns={"settings": settings})
    group = [settings if k == "settings" else k for k in GROUP]
    return df.merge(base, on=group + on, how="left", suffixes=("", "_bf16"))


def wide(rows: pd.DataFrame, index: list[str], metrics: list[str]) -> pd.DataFrame:
    """One row per index, one column per metric value (all of `metrics`, NaN where absent)."""
    if rows.empty:
        return pd.DataFrame(columns=index + metrics)
    df = rows.pivot_table(index=index, columns="metric", values="value", aggfunc="first").reset_index()
    return df.reindex(columns=index + metrics)


def memory_table(results: pd.DataFrame) -> pd.DataFrame:
    m = results[results.kind == "memory"]
    df = wide(m, KEY, MEMORY_METRICS)
    source = m[m.metric == "peak_memory_bytes"].set_index(KEY).note.rename("peak_memory_source")
    df = df.join(source, on=KEY).join(m.groupby(KEY).env_id.first(), on=KEY)
    df = with_baseline(df, [], ["weights_bytes", "checkpoint_bytes"])
    for col in ("weights_bytes", "checkpoint_bytes"):
        df[f"{col}_delta_pct"] = 100 * (df[col] / df[f"{col}_bf16"] - 1)
    return df


def kernel_table(results: pd.DataFrame, kind: str = "engine") -> pd.DataFrame:
    """Per engine: the MoE kernel vLLM logged, and whether its Triton config was tuned for the device
    (summarised anew from the recorded log lines). kind "serve-engine": the servers of `moeq serve-bench`."""
    logs = results[(results.kind == kind) & (results.metric == "vllm_log")]
    rows = [dict(zip(KEY, (getattr(r, k) for k in KEY))) | kernels.summary((r.note or "").splitlines())
            for r in logs.itertuples()]
    # what the experts compute with, read from vLLM's worker (rows since H200 session 6; older rows: NaN)
    quant = results[(results.kind == kind) & (results.metric == "moe_quant")].set_index(KEY).note.rename("moe_quant")
    return pd.DataFrame(rows, columns=KEY + ["moe_kernel", "moe_config", "moe_dtype", "cuda_graph_tokens"]).join(quant, on=KEY)


def perf_table(results: pd.DataFrame, mem: pd.DataFrame, settings: dict,
               probes: pd.DataFrame | None = None) -> pd.DataFrame:
    """probes: `moeq routing` probes (routing_load.read_probes); rows on a degenerate dummy router are flagged."""
    p = results[results.kind == "perf"]
    tput = p[p.metric == "throughput"][KEY + ["cell", "spread", "n", "repeats", "env_id"]]
    df = wide(p, KEY + ["cell"], PERF_METRICS).merge(tput, on=KEY + ["cell"], how="left")
    shape = df.cell.str.extract(r"^b(\d+)-i(\d+)-o(\d+)$").astype(float)
    df[["batch", "input_len", "output_len"]] = shape.to_numpy()
    df = with_baseline(df, ["cell"], ["throughput", "repeats"])
    deltas = [verdicts.ratio_of_medians(verdicts.repeats_of(r.repeats, r.throughput), verdicts.repeats_of(r.repeats_bf16, r.throughput_bf16))
              if pd.notna(r.throughput) and pd.notna(r.throughput_bf16) else (np.nan,) * 3 for r in df.itertuples()]
    df[["delta_pct", "delta_lo", "delta_hi"]] = np.array(deltas, float).reshape(-1, 3)
    configs = model_configs(results)
    kv = mem.set_index(KEY).kv_bytes_per_token.to_dict()
    roof = [_roofline(r, configs, kv, settings) for r in df.itertuples()]
    df = pd.concat([df, pd.DataFrame(roof, index=df.index, columns=ROOF_COLS)], axis=1)
    df["gpus"] = [gpus_of(settings, tuple(getattr(r, k) for k in KEY)) for r in df.itertuples()]
    df["throughput_per_gpu"] = df.throughput / df.gpus  # so an engine on 2 GPUs compares fairly with one on 1
    kv_tokens = mem.set_index(KEY).kv_cache_tokens.to_dict()
    df["kv_sequences"] = [kv_sequences(r, kv_tokens.get(tuple(getattr(r, k) for k in KEY))) for r in df.itertuples()]
    df = with_experts_a16(df, results)
    df = with_baseline(df, ["cell"], ["throughput_ceiling"])
    probes = pd.DataFrame(columns=routing_load.COLUMNS) if probes is None else probes
    # a degenerate dummy router is the cause of any physics flag on its rows, so it is named first
    df["flag"] = ["; ".join(f for f in (routing_load.flag(r.model, r.scheme, r.provenance, routing_of(
        settings, tuple(getattr(r, k) for k in KEY)), probes), physics_flag(r), shared_host_flag(r)) if f) or None
                  for r in df.itertuples()]
    # a comparison is no better than its baseline: a flagged bf16 cell flags every scheme's delta in it
    base = df[df.scheme == BASELINE].set_index(GROUP + ["cell"]).flag.dropna()
    df["flag"] = [f if isinstance(f, str) or r.scheme == BASELINE or key not in base.index else f"baseline: {base[key]}"
                  for f, r, key in zip(df.flag, df.itertuples(), map(tuple, df[GROUP + ["cell"]].to_numpy()))]
    return df


def kv_sequences(r, kv_cache_tokens) -> float:
    """The sequences of the cell's length the engine's KV cache held at once, where fewer than its batch
    (else NaN): vLLM then runs the batch in waves, so the cell times a queue, not B sequences decoding
    together (Qwen3-235B-A22B w4a16-gptq on one H200: 42,320 tokens, 66 of b128's 640-token sequences)."""
    if pd.isna(kv_cache_tokens) or pd.isna(r.batch):
        return np.nan
    held = int(kv_cache_tokens // (r.input_len + r.output_len))
    return held if held < r.batch else np.nan


def unquantized_experts(fmt: dict | None, kernel_dtype, quant_note=None) -> bool:
    """A checkpoint that asks for quantized activations whose experts vLLM ran on 16-bit activations (vLLM
    0.26 runs a dynamic per-token W8A8-INT8 MoE as int8_w8a16: NOTES.md, H200 session 6). Told by the
    experts' quant config read from vLLM's worker where recorded (kernels.moe_quant), else by the variant in
    the name of the Triton config vLLM looked up (every row with a logged Triton config)."""
    if not isinstance(fmt, dict) or fmt.get("activation_bits", 16) >= 16:
        return False
    if isinstance(quant_note, str) and ": activations " in quant_note:
        return ": activations unquantized" in quant_note
    return isinstance(kernel_dtype, str) and kernel_dtype.endswith("a16")


def model_configs(results: pd.DataFrame) -> dict:
    return {tuple(r[k] for k in KEY): json.loads(r["note"])
            for _, r in results[(results.kind == "model") & results.note.notna()].iterrows()}


def gpus_of(settings: dict, key: tuple) -> int:
    """GPUs the engine occupied (TP x PP x DP; settings records before the layouts existed: one)."""
    return int(settings.get(key[KEY.index("settings")], {}).get("gpus", 1))


def routing_of(settings: dict, key: tuple) -> str:
    rec = settings.get(key[KEY.index("settings")], {})
    return rec.get("routing", "model") if "llm" in rec else "unknown"


def _roofline(r, configs: dict, kv: dict, settings: dict) -> dict:
    key = tuple(getattr(r, k) for k in KEY)
    device, config = roofline.match_device(r.device, gpus_of(settings, key)), configs.get(key, {})
    if device is None:
        return {"roofline": "no roofline: no peak rates for this device in devices.yaml"}
    if any(config.get(k) is None for k in roofline.CONFIG_KEYS) or pd.isna(r.batch):
        return {"roofline": "no roofline: model config or cell shape missing from the ledger"}
    routing = routing_of(settings, key)
    shape = (config, device, int(r.batch), int(r.input_len), int(r.output_len),
             kv.get(key) if pd.notna(kv.get(key, np.nan)) else None)
    f = roofline.floors(*shape, routing=routing)
    balanced = roofline.floors(*shape)["throughput_ceiling"]
    return f | {"roofline": device["name"], "routing": routing, "pct_of_ceiling": 100 * r.throughput / f["throughput_ceiling"],
                "balanced_ceiling": balanced, "pct_of_balanced": 100 * r.throughput / balanced,
                "ttft_x_floor": r.ttft / f["ttft_floor"], "itl_x_floor": r.itl_mean / f["itl_floor"]}


# Below this share of the roofline ceiling (the device could do the work 100x faster) a cell times the host,
# not the device: the embedded 4M-parameter model on an H200 runs at 0.02-0.8% of its ceiling, every real
# MoE shape measured there at 6% or more.
HOST_BOUND_PCT = 1


def physics_flag(r) -> str | None:
    """Why a cell cannot be taken at face value, if it cannot (core/roofline.py)."""
    if pd.notna(r.pct_of_ceiling) and r.pct_of_ceiling > 100:
        return (f"faster than physics: {r.pct_of_ceiling:.0f}% of the {r.roofline} ceiling under {r.routing} "
                "routing; the measurement is wrong")
    if pd.notna(r.pct_of_balanced) and r.pct_of_balanced > 100:
        return (f"{r.pct_of_balanced:.0f}% of the balanced-routing ceiling: the routers ({r.routing}) send tokens to "
                "fewer experts than balanced routing would, so this measures routing, not the model")
    if pd.notna(r.pct_of_ceiling) and r.pct_of_ceiling < HOST_BOUND_PCT:
        return (f"host-bound: {r.pct_of_ceiling:.2f}% of the {r.roofline} ceiling, so the device's bytes and FLOPs "
                "are a sliver of each step and the rest is host-side scheduling; this measures vLLM's Python "
                "overhead, not the format")
    bound = r.throughput_ceiling / r.throughput_ceiling_bf16 if pd.notna(r.throughput_ceiling_bf16) else np.nan
    if r.scheme != BASELINE and pd.notna(bound) and pd.notna(r.delta_lo) and 1 + r.delta_lo / 100 > bound:
        return (f"speedup above what bytes and FLOPs allow ({bound:.2f}x): the baseline runs below its roofline, "
                "so this measures kernel tuning, not quantization")
    return None


def shared_host_flag(r) -> str | None:
    """A cell timed while another GPU of its host ran compute work (evaluate/host.py) shared the host's cores
    with it: session 11's moe-500m cells, beside the other GPU's quantizations and lm-eval engines, spread
    10-39% against 1.3-3.5% alone, and their b1 deltas (+28% to +51%) followed the order they were timed in."""
    if pd.notna(r.busy_other_gpus) and r.busy_other_gpus > 0:
        return (f"shared host: timed while {r.busy_other_gpus:.0f} other GPU(s) of the host ran compute work, so "
                "the host's cores were shared and the timing is partly the neighbour's")
    return None


def item_scores(items: pd.DataFrame) -> dict:
    """Per-item scores by (ledger key..., task, metric), indexed by item."""
    return {k: g.set_index("item").value for k, g in items.groupby(KEY + ["task", "metric"])}


def paired_items(scores: dict, key: tuple, task: str, metric: str, baseline_settings: str | None = None) -> tuple | None:
    """A scheme's and its bf16's scores on the items both answered, or None where either has none. bf16 is
    looked up under `baseline_settings` where given (a kernel variant's: kernel_baselines)."""
    mine = scores.get((*key, task, metric))
    swap = {"scheme": BASELINE, "settings": baseline_settings}
    base = scores.get((*(swap.get(k) or v for k, v in zip(KEY, key)), task, metric))
    if mine is None or base is None:
        return None
    both = pd.concat([mine, base], axis=1, join="inner")
    return both.iloc[:, 0], both.iloc[:, 1]


def accuracy_table(results: pd.DataFrame, scores: dict, metric_order: list[str], settings: dict | None = None) -> pd.DataFrame:
    """Per task and metric: value, stderr, relative change vs bf16 with a paired interval over items.
    Shape-only rows are left out: random weights have no accuracy worth reporting. A kernel variant's rows
    (kernel_baselines) are compared with bf16 at the settings they differ from only in the kernel choice."""
    a = results[(results.kind == "accuracy") & (~results.provenance.str.startswith("shape-only"))]
    df = a[KEY + ["cell", "metric", "value", "spread", "n", "env_id", "note"]]
    df = df.rename(columns={"cell": "task", "spread": "stderr"}).reset_index(drop=True)
    bases = kernel_baselines(settings or {})
    df["baseline_settings"] = df.settings.map(lambda sid: bases.get(sid, sid))
    df = with_baseline(df, ["task", "metric"], ["value"], settings="baseline_settings")
    est = []
    for r in df.itertuples():
        pair = paired_items(scores, tuple(getattr(r, k) for k in KEY), r.task, r.metric, r.baseline_settings)
        if pair is not None:
            est.append((*verdicts.paired_ratio_of_means(*pair), len(pair[0])))
        else:
            est.append((100 * (r.value / r.value_bf16 - 1), np.nan, np.nan, 0))
    df[["delta_pct", "delta_lo", "delta_hi", "paired_items"]] = np.array(est, float).reshape(-1, 4)
    # The claims use one metric per task: the first of metric_order, preferring one with per-item scores.
    rank = df.metric.map({m: i for i, m in enumerate(metric_order)})
    ranked = df[rank.notna()].assign(rank=rank, unpaired=df.paired_items == 0).sort_values(["unpaired", "rank"])
    df["primary"] = df.index.isin(ranked.groupby(KEY + ["task"]).head(1).index)
    return with_experts_a16(df, results)


def bf16_by_build(acc: pd.DataFrame, measured: pd.DataFrame) -> pd.DataFrame:
    """bf16's claim metric per task on each build of a model built more than once, at the engine settings the most
    of its builds were scored under: how far retraining alone moves a score (no scheme pairs across builds)."""
    cols = ["model", "settings", "provenance", "task", "metric", "value", "stderr"]
    if measured.empty or acc.empty:
        return pd.DataFrame(columns=cols)
    a = acc[acc.primary & (acc.scheme == BASELINE) & acc.provenance.isin(measured.provenance)]
    builds = a.groupby(["model", "settings"]).provenance.nunique()
    common = builds[builds > 1].groupby(level="model").idxmax().tolist()  # (model, settings) with the most builds
    return a[pd.MultiIndex.from_frame(a[["model", "settings"]]).isin(common)][cols].reset_index(drop=True)


def with_experts_a16(df: pd.DataFrame, results: pd.DataFrame) -> pd.DataFrame:
    """Adds the MoE kernel vLLM ran and `experts_a16`: a scheme asking for quantized activations whose experts
    ran on 16-bit ones (its accuracy then measures weight rounding only)."""
    df = df.merge(kernel_table(results), on=KEY, how="left")
    formats = scheme_formats(results)
    df["experts_a16"] = [unquantized_experts(f, d, q) for f, d, q in zip(df.scheme.map(formats), df.moe_dtype, df.moe_quant)]
    return df


def recovery_table(acc: pd.DataFrame, scores: dict) -> pd.DataFrame:
    """Per group and scheme: recovery (scheme / bf16) averaged over the tasks the claims use, with a
    paired bootstrap interval over each task's items, as published quantized-model cards report it."""
    primary = acc[acc.primary & (acc.scheme != BASELINE) & (acc.paired_items > 0)]
    rows = []
    for key, g in primary.groupby(KEY):
        pairs = [paired_items(scores, key, r.task, r.metric, r.baseline_settings) for r in g.itertuples()]
        point, lo, hi = verdicts.paired_mean_recovery(pairs)
        rows.append({**dict(zip(KEY, key)), "tasks": ", ".join(sorted(g.task)), "n_tasks": len(pairs),
                     "recovery_pct": point, "recovery_lo": lo, "recovery_hi": hi})
    return pd.DataFrame(rows, columns=[*KEY, "tasks", "n_tasks", "recovery_pct", "recovery_lo", "recovery_hi"])


ANCHORS_FILE = Path(__file__).with_name("anchors.yaml")


def anchors_table(path: Path = ANCHORS_FILE) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Published figures (external): recoveries of quantized MoE models, outlier figures of real LLMs, and
    the file's notes."""
    import yaml
    doc = yaml.safe_load(Path(path).read_text())
    cols = ["model", "card", "moeq_scheme", "format", "benchmarks", "baseline", "quantized", "recovery_pct",
            "computed", "source", "quote"]
    notes = {k: v for k, v in doc.items() if k not in ("anchors", "outliers")}
    return pd.DataFrame(doc["anchors"]).reindex(columns=cols), pd.DataFrame(doc.get("outliers", [])), notes


SAME_PRECISION_GAP = 10  # percent: two schemes of one precision further apart than this need a cause
FINDING_COLUMNS = GROUP + ["cell", "scheme_a", "scheme_b", "throughput_a", "throughput_b", "ratio", "kernel_a",
                           "kernel_b", "variants", "variant_speeds", "kind"]  # variant_speeds: variants without kernels


def precision_findings(perf: pd.DataFrame, formats: dict, settings: dict) -> pd.DataFrame:
    """Cells where two schemes of the same precision (weight and activation type and bits) differ by more
    than SAME_PRECISION_GAP, each beside the kernels vLLM chose and any measured kernel variant (the
    same model, device and cell with other settings that differ only in moe_backend); then every cell a scheme
    was timed forced onto another kernel, against vLLM's choice, whatever the gap (kernel_variants)."""
    p = perf.dropna(subset=["throughput"])
    precision = lambda s: json.dumps(formats.get(s), sort_keys=True) if formats.get(s) else None
    rows = []
    for key, cellrows in p.groupby(GROUP + ["cell"]):
        gkey = dict(zip(GROUP + ["cell"], key))
        by = cellrows.set_index("scheme")
        for a in by.index:
            for b in by.index:
                if a >= b or precision(a) is None or precision(a) != precision(b) or BASELINE in (a, b):
                    continue
                ratio = by.throughput[a] / by.throughput[b]
                if abs(100 * (ratio - 1)) <= SAME_PRECISION_GAP:
                    continue
                variants = p[(p.model == gkey["model"]) & (p.device == gkey["device"]) & (p.cell == gkey["cell"])
                             & (p.provenance == gkey["provenance"]) & (p.settings != gkey["settings"])
                             & p.scheme.isin([a, b])]
                found = [v for v in variants.itertuples()
                         if _without_backend(settings, v.settings) == _without_backend(settings, gkey["settings"])]
                said = lambda kernel: "; ".join(filter(None, (_variant(v, settings, kernel) for v in found)))
                rows.append({**gkey, "scheme_a": a, "scheme_b": b, "throughput_a": by.throughput[a],
                             "throughput_b": by.throughput[b], "ratio": ratio,
                             "kernel_a": _kernel(by, a), "kernel_b": _kernel(by, b),
                             "variants": said(True), "variant_speeds": said(False), "kind": "two schemes"})
    return pd.DataFrame(rows + kernel_variants(p, settings), columns=FINDING_COLUMNS)


def kernel_variants(p: pd.DataFrame, settings: dict) -> list[dict]:
    """One scheme, one cell, two kernels: a row measured with a moe_backend or a kernel variable (KERNEL_ENV:
    humming's activation type) against vLLM's own choice for the same scheme, cell and otherwise equal settings.
    Every such cell, whatever the gap: a variant is a chosen experiment, and leaving out the cells where it gains
    little or loses would make its range a selection (Qwen3's humming W8A8 at b1 is 0.94×). Rows of two runs
    (other env records: another call or session) are said to be so: not timed side by side."""
    backend = p.settings.map(lambda sid: _kernel_choice(settings, sid))
    rows = []
    for v, choice in zip(p[backend.notna()].itertuples(), backend.dropna()):
        base = p[(p.model == v.model) & (p.device == v.device) & (p.provenance == v.provenance) & (p.cell == v.cell)
                 & (p.scheme == v.scheme) & backend.isna()]
        for b in base.itertuples():
            ratio = v.throughput / b.throughput
            if _without_backend(settings, b.settings) != _without_backend(settings, v.settings):
                continue
            env = getattr(v, "env_id", np.nan), getattr(b, "env_id", np.nan)
            apart = "" if pd.notna(env[0]) and env[0] == env[1] else ": timed apart (another env record), not side by side"
            rows.append({"model": b.model, "provenance": b.provenance, "backend": b.backend, "device": b.device,
                         "settings": b.settings, "cell": b.cell, "scheme_a": f"{v.scheme} ({choice})",
                         "scheme_b": b.scheme, "throughput_a": v.throughput, "throughput_b": b.throughput, "ratio": ratio,
                         "kernel_a": f"{v.moe_kernel} ({v.moe_config})", "kernel_b": f"{b.moe_kernel} ({b.moe_config})",
                         "variants": f"settings {v.settings}{apart}", "kind": "kernel variant"})
    return rows


def _kernel(by: pd.DataFrame, scheme: str) -> str:
    kernel = by.moe_kernel.get(scheme)
    return f"{kernel} ({by.moe_config.get(scheme)})" if isinstance(kernel, str) else "not recorded (rows before kernels were)"


KERNEL_CHOICE = ("moe_backend", *KERNEL_ENV)  # what picks or shapes the experts' kernel, not the engine around it


def _kernel_choice(settings: dict, sid: str) -> str | None:
    """`moe_backend=humming, VLLM_HUMMING_INPUT_QUANT_CONFIG={...}`: the kernel a row was forced onto, if any."""
    chosen = settings.get(sid, {}).get("non_default", {})
    return ", ".join(f"{k}={chosen[k]}" for k in KERNEL_CHOICE if k in chosen) or None


def _without_backend(settings: dict, sid: str) -> dict | None:
    """A row's non-default engine settings but its kernel choice: a kernel variant differs from its row only there."""
    record = settings.get(sid)
    return None if record is None else {k: v for k, v in record.get("non_default", {}).items() if k not in KERNEL_CHOICE}


def kernel_baselines(settings: dict) -> dict:
    """A kernel variant's settings id -> the one settings id without a kernel choice that it otherwise equals
    (vLLM's own kernel choice). bf16 there is the variant's baseline: bf16 has no quantized experts for the
    choice to act on (the humming W8A8 rows of row 5c: scored beside bf16 and Triton, not with bf16 on humming)."""
    plain = {}
    for sid in settings:
        if not _kernel_choice(settings, sid):
            plain.setdefault(json.dumps(_without_backend(settings, sid), sort_keys=True), []).append(sid)
    matches = {sid: plain.get(json.dumps(_without_backend(settings, sid), sort_keys=True), [])
               for sid in settings if _kernel_choice(settings, sid)}
    return {sid: m[0] for sid, m in matches.items() if len(m) == 1}


def _variant(v, settings: dict, kernel: bool = True) -> str | None:
    choice = _kernel_choice(settings, v.settings)
    return choice and f"{v.scheme} with {choice}: {v.throughput:,.0f} tok/s" + (f" ({v.moe_kernel}, {v.moe_config})" * kernel)


def host_labels(env: pd.DataFrame) -> pd.DataFrame:
    """By env id: the host that timed a cell, its OS and kernel build (`host`; H200 hosts were fc-v657 or
    fc-v973) and, since H200 session 11, its CPU (`host_cpu`), so a comparison across hosts can say so."""
    records = [json.loads(r) for r in env.record]
    return pd.DataFrame({"host": [r.get("platform", "").split("-with-")[0] for r in records],
                         "host_cpu": [r.get("host_cpu") or "" for r in records]}, index=env.id.rename("env_id"))


def scheme_formats(results: pd.DataFrame) -> dict:
    """scheme -> weight/activation type and bits: as the engine recorded it, else from the repository's
    recipe of that name (rows measured before formats were recorded), else unknown (None)."""
    from moeq import schemes
    recorded = {key[KEY.index("scheme")]: c["format"] for key, c in model_configs(results).items() if c.get("format")}
    out = {}
    for scheme in results.scheme.unique():
        try:
            out[scheme] = recorded.get(scheme) or schemes.scheme_format(scheme)
        except UserError:
            out[scheme] = None
    return out


def read_builds(folder: Path) -> pd.DataFrame:
    """What the builder recorded for each embedded model (builds/NAME.build.json beside the ledger, copied from
    the build's moeq_build.json): size, tokens, speed, held-out bits per byte against unigram and tiny, routing."""
    rows = []
    for f in sorted(Path(folder).glob("*.build.json")):
        d = json.loads(f.read_text())
        bpb = d.get("bits_per_byte", {})
        row = {k: d.get(k) for k in ("model", "params", "active_params", "train_tokens_seen", "train_tokens_unique",
                                     "epochs", "tokens_per_s", "mfu", "device", "ce_ratio", "min_expert_share_of_fair")}
        row["train_s"] = d.get("timings", {}).get("train_s")
        for group, r in bpb.get("model", {}).items():
            row |= {f"bpb_{group}": r["bpb"], f"unigram_bpb_{group}": r.get("unigram_bpb"),
                    f"tiny_bpb_{group}": bpb.get("tiny", {}).get(group, {}).get("bpb")}
        rows.append(row | {"file": f.name})
    return pd.DataFrame(rows)


def read_outliers(folder: Path) -> pd.DataFrame:
    """`moeq outliers` results beside the ledger (outliers/outliers-*.json): per model and tensor, the largest
    activation max/median (and its layer) and the median over layers; per weight, the largest kurtosis."""
    rows = []
    for f in sorted(Path(folder).glob("outliers-*.json")):
        d = json.loads(f.read_text())
        per = {}
        for layer in d["layers"]:
            for name, a in layer["activations"].items():
                per.setdefault(("activation max / median", name), []).append((a["ratio"], layer["layer"]))
            for name, w in layer["weights"].items():
                per.setdefault(("weight kurtosis", name), []).append((w.get("kurtosis", w.get("kurtosis_max")), layer["layer"]))
        for (quantity, tensor), vals in per.items():
            top = max(vals)
            rows.append({"model": d["model"], "quantity": quantity, "tensor": tensor, "max": top[0], "layer": top[1],
                         "median_over_layers": float(np.median([v for v, _ in vals])), "layers": len(vals),
                         "tokens": d["tokens"], "text": d["text"], "file": f.name})
    return pd.DataFrame(rows, columns=["model", "quantity", "tensor", "max", "layer", "median_over_layers", "layers",
                                       "tokens", "text", "file"])


def read_benchmarks(folder: Path) -> dict:
    """The JSON files benchmark scripts wrote beside the ledger (benchmarks/fused_moe.py --out), by file name."""
    out = {}
    for f in sorted(Path(folder).glob("*.json")):
        try:
            out[f.name] = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"benchmark file {f} is not readable JSON ({e}): rerun the benchmark that wrote it") from e
    return out


def build_report(ledger_path: Path, name: str = "default", out_root: Path = Path("reports"), log=print) -> Path:
    """Write reports/<name>/ (README.md, index.html, CSV/JSON tables, PNG plots); return that folder."""
    ledger_path = Path(ledger_path)
    if not name or Path(name).name != name or name.startswith("."):
        raise UserError(f"report name {name!r} must be a plain folder name")
    final = Path(out_root) / name
    if final.resolve() in ledger_path.resolve().parents:
        raise UserError(f"the report folder {final} holds the ledger {ledger_path}, and a report replaces its "
                        "folder whole: choose another --name or --out")
    results, items, env, settings = read_ledger(ledger_path)
    results, items, builds_measured = label_builds(results, items)
    formats = scheme_formats(results)
    claims = verdicts.load_claims()
    mem = memory_table(results)
    probes = routing_load.read_probes(ledger_path.parent / "routing")  # `moeq routing --out routing/NAME.json`
    perf = perf_table(results, mem, settings, probes).join(host_labels(env), on="env_id")
    scores = item_scores(items)
    acc = accuracy_table(results, scores, claims["accuracy_metrics"], settings)
    status = results[(results.kind == "status") & (results.status == "unsupported")]
    unsupported = {(*(getattr(r, k) for k in GROUP), r.scheme): r.note for r in status.itertuples()}
    keys = serving.offline(results)[KEY + ["env_id"]].drop_duplicates()  # which schemes each group has, its env records
    verdict = verdicts.verdict_table(claims, formats, keys, perf, acc, mem, unsupported)
    # the guide's other claims (issue 12): variants of one model against each other, batch sweeps, plans
    checkpoints = results.dropna(subset=["checkpoint"]).groupby(KEY).checkpoint.agg(set).to_dict()
    others = compare.comparison_table(claims, keys, perf, items, acc, mem, settings, model_configs(results), checkpoints,
                                      read_benchmarks(ledger_path.parent / "benchmarks"), formats)
    columns = list(dict.fromkeys([*verdict.columns, *others.columns]))  # either may be empty
    verdict = pd.concat([d for d in (verdict, others) if len(d)] or [verdict], ignore_index=True).reindex(columns=columns)
    groups = [tuple(g) for g in keys[GROUP].drop_duplicates().itertuples(index=False)]
    tables = {"summary": headline.numbers(perf, acc, mem), "verdicts": verdict, "performance": perf, "accuracy": acc,
              "recovery": recovery_table(acc, scores), "outliers": read_outliers(ledger_path.parent / "outliers"),
              "builds": read_builds(ledger_path.parent / "builds"), "builds_measured": builds_measured,
              "builds_bf16": bf16_by_build(acc, builds_measured),
              "routing": probes,
              "memory": mem, "findings": precision_findings(perf, formats, settings), "slower": slower.table(perf),
              "recommendations": headline.recommendations(verdict, perf, mem, keys, settings, groups), "keys": keys,
              "gpus_needed": gpus.table(perf, mem, settings)}
    anchors, published_outliers, tables["anchor_notes"] = anchors_table()
    tables |= {"anchors": anchors, "outliers_published": published_outliers}
    serve = serving.serve_table(results)  # issue 17: `moeq serve-bench` rows
    engines = kernel_table(results, serving.ENGINE_KIND)
    tables |= {"serving": serve, "serving_capacity": serving.capacity_table(serve, engines),
               "serving_claims": serving.claim_table(serve, verdicts.scheme_claims(claims["claims"]), formats)}
    with staged_dir(final) as tmp:
        render.write_all(tmp, name, ledger_path, tables, unsupported, env, settings, claims, formats, log)
    counts = verdict.verdict.value_counts().to_dict()
    log(f"report {final}: " + ", ".join(f"{n} {v}" for v, n in counts.items()))
    return final
