"""`moeq report`: comparison tables, claim verdicts, roofline and plots from the results ledger.

A scheme is compared only with the bf16 row of the same model, provenance, backend and device
(verdicts.GROUP), so numbers from other hardware, or from shape-only weights, never share a ratio.
"""
import json
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd

from moeq.evaluate import render, roofline, verdicts
from moeq.evaluate.verdicts import BASELINE, GROUP
from moeq.quantize.atomic import staged_dir
from moeq.quantize.registry import UserError

KEY = ["model", "scheme", "provenance", "backend", "device"]
PERF_METRICS = ["throughput", "output_throughput", "latency", "ttft", "itl_mean", "itl_p50", "itl_p99", "warmup"]
MEMORY_METRICS = ["weights_bytes", "checkpoint_bytes", "peak_memory_bytes", "kv_cache_tokens",
                  "kv_bytes_per_token", "load_seconds"]
ROOF_COLS = ["roofline", "throughput_ceiling", "pct_of_ceiling", "latency_floor", "ttft_floor", "ttft_x_floor",
             "itl_floor", "itl_x_floor", "decode_bound"]


def read_ledger(path: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """results, items and env, read-only (opening it through Ledger would create a missing file)."""
    if not path.is_file():
        raise UserError(f"no ledger at {path}: run `make eval` first")
    try:
        with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True) as db:
            results, items, env = (pd.read_sql_query(f"SELECT * FROM {t}", db) for t in ("results", "items", "env"))
    except (sqlite3.DatabaseError, pd.errors.DatabaseError) as e:
        raise UserError(f"{path} is not a moeq results ledger ({e}): run `make eval` first") from e
    if results.empty:
        raise UserError(f"the ledger {path} holds no results: run `make eval` first")
    return results, items, env


def with_baseline(df: pd.DataFrame, on: list[str], cols: list[str]) -> pd.DataFrame:
    """Each row beside the `cols` of the bf16 row of its group (suffix _bf16; NaN where there is none)."""
    base = df.loc[df.scheme == BASELINE, GROUP + on + cols]
    return df.merge(base, on=GROUP + on, how="left", suffixes=("", "_bf16"))


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


def _repeats(text, value) -> list[float]:
    return json.loads(text) if isinstance(text, str) else [value]


def perf_table(results: pd.DataFrame, mem: pd.DataFrame, classes: dict) -> pd.DataFrame:
    p = results[results.kind == "perf"]
    tput = p[p.metric == "throughput"][KEY + ["cell", "spread", "n", "repeats", "env_id"]]
    df = wide(p, KEY + ["cell"], PERF_METRICS).merge(tput, on=KEY + ["cell"], how="left")
    shape = df.cell.str.extract(r"^b(\d+)-i(\d+)-o(\d+)$").astype(float)
    df[["batch", "input_len", "output_len"]] = shape.to_numpy()
    df = with_baseline(df, ["cell"], ["throughput", "repeats"])
    deltas = [verdicts.ratio_of_medians(_repeats(r.repeats, r.throughput), _repeats(r.repeats_bf16, r.throughput_bf16))
              if pd.notna(r.throughput) and pd.notna(r.throughput_bf16) else (np.nan,) * 3 for r in df.itertuples()]
    df[["delta_pct", "delta_lo", "delta_hi"]] = np.array(deltas, float).reshape(-1, 3)
    configs = {tuple(r[k] for k in KEY): json.loads(r["note"])
               for _, r in results[(results.kind == "model") & results.note.notna()].iterrows()}
    kv = mem.set_index(KEY).kv_bytes_per_token.to_dict()
    roof = [_roofline(r, configs, kv, classes) for r in df.itertuples()]
    return pd.concat([df, pd.DataFrame(roof, index=df.index, columns=ROOF_COLS)], axis=1)


def _roofline(r, configs: dict, kv: dict, classes: dict) -> dict:
    key = tuple(getattr(r, k) for k in KEY)
    device, config = roofline.match_device(r.device), configs.get(key, {})
    if device is None:
        return {"roofline": "no roofline: no peak rates for this device in devices.yaml"}
    if any(config.get(k) is None for k in roofline.CONFIG_KEYS) or pd.isna(r.batch):
        return {"roofline": "no roofline: model config or cell shape missing from the ledger"}
    f = roofline.floors(config, device, int(r.batch), int(r.input_len), int(r.output_len), classes.get(r.scheme),
                        kv.get(key) if pd.notna(kv.get(key, np.nan)) else None)
    return f | {"roofline": device["name"], "pct_of_ceiling": 100 * r.throughput / f["throughput_ceiling"],
                "ttft_x_floor": r.ttft / f["ttft_floor"], "itl_x_floor": r.itl_mean / f["itl_floor"]}


def accuracy_table(results: pd.DataFrame, items: pd.DataFrame, metric_order: list[str]) -> pd.DataFrame:
    """Per task and metric: value, stderr, relative change vs bf16 with a paired interval over items.
    Shape-only rows are left out: random weights have no accuracy worth reporting."""
    a = results[(results.kind == "accuracy") & (~results.provenance.str.startswith("shape-only"))]
    df = a[KEY + ["cell", "metric", "value", "spread", "n", "env_id", "note"]]
    df = df.rename(columns={"cell": "task", "spread": "stderr"})
    df = with_baseline(df.reset_index(drop=True), ["task", "metric"], ["value"])
    scores = {k: g.set_index("item").value for k, g in items.groupby(KEY + ["task", "metric"])}
    est = []
    for r in df.itertuples():
        mine = scores.get((r.model, r.scheme, r.provenance, r.backend, r.device, r.task, r.metric))
        base = scores.get((r.model, BASELINE, r.provenance, r.backend, r.device, r.task, r.metric))
        if mine is not None and base is not None:
            both = pd.concat([mine, base], axis=1, join="inner")
            est.append((*verdicts.paired_ratio_of_means(both.iloc[:, 0], both.iloc[:, 1]), len(both)))
        else:
            est.append((100 * (r.value / r.value_bf16 - 1), np.nan, np.nan, 0))
    df[["delta_pct", "delta_lo", "delta_hi", "paired_items"]] = np.array(est, float).reshape(-1, 4)
    # The claims use one metric per task: the first of metric_order, preferring one with per-item scores.
    rank = df.metric.map({m: i for i, m in enumerate(metric_order)})
    ranked = df[rank.notna()].assign(rank=rank, unpaired=df.paired_items == 0).sort_values(["unpaired", "rank"])
    df["primary"] = df.index.isin(ranked.groupby(KEY + ["task"]).head(1).index)
    return df


def build_report(ledger_path: Path, name: str = "default", out_root: Path = Path("reports"), log=print) -> Path:
    """Write reports/<name>/ (README.md, index.html, CSV/JSON tables, PNG plots); return that folder."""
    ledger_path = Path(ledger_path)
    if not name or Path(name).name != name or name.startswith("."):
        raise UserError(f"report name {name!r} must be a plain folder name")
    final = Path(out_root) / name
    if final.resolve() in ledger_path.resolve().parents:
        raise UserError(f"the report folder {final} holds the ledger {ledger_path}, and a report replaces its "
                        "folder whole: choose another --name or --out")
    results, items, env = read_ledger(ledger_path)
    from moeq.quantize.recipes import all_recipes
    classes = {n: r.claim for n, r in all_recipes().items()}
    claims = verdicts.load_claims()
    mem = memory_table(results)
    perf = perf_table(results, mem, classes)
    acc = accuracy_table(results, items, claims["accuracy_metrics"])
    status = results[(results.kind == "status") & (results.status == "unsupported")]
    unsupported = {(r.model, r.provenance, r.backend, r.device, r.scheme): r.note for r in status.itertuples()}
    keys = results[KEY + ["env_id"]].drop_duplicates()  # which schemes each group has, and its env records
    verdict = verdicts.verdict_table(claims, classes, keys, perf, acc, mem, unsupported)
    tables = {"verdicts": verdict, "performance": perf, "accuracy": acc, "memory": mem}
    with staged_dir(final) as tmp:
        render.write_all(tmp, name, ledger_path, tables, keys, unsupported, env, log)
    counts = verdict.verdict.value_counts().to_dict()
    log(f"report {final}: " + ", ".join(f"{n} {v}" for v, n in counts.items()))
    return final
