"""Verdicts on the claims that compare a model with a variant of itself rather than a scheme with BF16
(claims.yaml entries with `compare:`, `batch:` or none of the ledger's quantities: issue 12).

Every group (verdicts.GROUP) gets coordinates: its top-k, expert count and expert FFN width (the base
model's registry config, then the settings' `hf_overrides`, which is how a variant is run: `--engine-arg
hf_overrides={"num_experts_per_tok": 1}`), and the fraction of experts kept (a pruned model is a model of
its own, `<base>-keep<NN>`, moeq.pruned). A `compare:` claim pairs a variant group with the reference
group that differs only on the claim's axis: same base model, scheme, provenance, backend, device,
routing, warm-up and every other engine argument, and, for two settings of one model, the same
checkpoint identity (a model rebuilt between the two runs is no pair). Throughput, accuracy and weights are then compared the
way verdicts.py compares a scheme with BF16 (bootstrap of repeats; paired items). A `batch:` claim is a
statement about one group's batch sweep. A claim no ledger row can speak of yet says so and names what
would measure it (`plan:`); one whose recipe cannot run as written says so with the reason measured
(`not_testable:`).
"""
import json

import numpy as np
import pandas as pd

from moeq import pruned, registry
from moeq.evaluate import kernels, speculative
from moeq.evaluate.report import benchmark, verdicts
from moeq.evaluate.report.verdicts import FLAGGED, GROUP, INCONCLUSIVE, NOT_MEASURED, SEED, N_BOOT

NOT_TESTABLE = "not testable as written"
AXES = {  # coordinate -> the config keys that set it, first found wins (hf_overrides use the same keys)
    "top_k": ("num_experts_per_tok",),
    "num_experts": ("num_local_experts", "num_experts", "n_routed_experts"),
    "ffn_width": ("moe_intermediate_size", "intermediate_size"),
}
# `speculation`: the engine's speculative_config as a label (none, ngram, draft:<model>; speculative.label),
# read from the settings, not the model config
COORDINATES = (*AXES, "keep", "speculation")
LINKED = {"keep": "num_experts", "num_experts": "keep"}  # one follows from the other
NO_ROOFLINE = ("no roofline for this device: whether a cell times the model or the host cannot be told, and the "
               "claim speaks of GPU serving; the value is shown, with no verdict")


def _native(config: dict, axis: str):
    return next((config[k] for k in AXES[axis] if config.get(k) is not None), None)


def coordinates(model: str, record: dict, facts: dict | None = None) -> dict:
    """Top-k, expert count, FFN width and kept fraction of a group (each with whether an hf_override set
    it), and the settings minus the overrides that set them (`rest`, what a pair must share)."""
    base, keep = pruned.parse(model)
    config = dict((registry.registry().get(base) or {}).get("config") or {})
    facts = facts or {}
    overrides = dict((record.get("llm") or {}).get("hf_overrides") or {})
    out = {"base": base}
    for axis, keys in AXES.items():
        native = _native(config, axis)
        if native is None and axis in ("top_k", "num_experts"):  # not in the registry: what the engine ran
            native = facts.get(axis)
        if axis == "num_experts" and native is not None and keep < 1:
            out["num_experts_native"] = native
            native = round(native * keep)
        # the model's own key first (a Qwen3 override of num_local_experts is not one vLLM's Qwen3 reads)
        own = [k for k in keys if k in config] or list(keys)
        given = next((overrides[k] for k in own if k in overrides), None)
        out[axis], out[f"{axis}_given"] = (given if given is not None else native), given is not None
    full = out.get("num_experts_native", _native(config, "num_experts"))
    out["keep"] = round(out["num_experts"] / full, 4) if full and out["num_experts"] else keep
    out["keep_given"] = keep < 1 or out["num_experts_given"]
    spec = (record.get("llm") or {}).get(speculative.KEY)
    out["speculation"], out["speculation_given"] = speculative.label(spec), spec is not None
    llm = {k: v for k, v in (record.get("llm") or {}).items() if k not in ("hf_overrides", speculative.KEY)}
    rest = {k: v for k, v in overrides.items() if not any(k in keys for keys in AXES.values())}
    out["rest"] = json.dumps({"llm": llm, "hf_overrides": rest, "routing": record.get("routing"),
                              "warmup_tokens": record.get("warmup_tokens"), "prompts": record.get("prompts")},
                             sort_keys=True, default=str)
    return out


def kind(claim: dict) -> str:
    """scheme (vs BF16, verdicts.py), compare, batch, fit (an engine's memory at stated engine arguments),
    family (family.py), benchmark (a JSON a script wrote beside the ledger), or planned (no ledger quantity yet)."""
    if "fit" in claim:
        return "fit"
    if "benchmark" in claim:
        return "benchmark"
    if "family" in claim:
        return "family"
    if "compare" in claim:
        return "compare"
    if "batch" in claim:
        return "batch"
    if claim.get("quantity") in verdicts.QUANTITIES and "covers" in claim:
        return "scheme"
    return "planned"


def within(point, lo, hi, bound: dict) -> str:
    """A two-sided bound {within: [a, b]}: holds if the interval is inside it, fails if wholly outside."""
    a, b = bound["within"]
    if pd.isna(point):
        return NOT_MEASURED
    if pd.isna(lo) or pd.isna(hi):
        return INCONCLUSIVE
    return verdicts.HOLDS if a <= lo and hi <= b else verdicts.FAILS if hi < a or lo > b else INCONCLUSIVE


def judge(point, lo, hi, bound: dict) -> str:
    return within(point, lo, hi, bound) if "within" in bound else verdicts.judge(point, lo, hi, bound)


def _group_table(keys: pd.DataFrame, settings: dict, configs: dict, checkpoints: dict) -> pd.DataFrame:
    rows = []
    for g in keys[GROUP + ["scheme"]].drop_duplicates().itertuples(index=False):
        gkey = dict(zip(GROUP + ["scheme"], g))
        key = tuple(gkey[k] for k in ("model", "scheme", "provenance", "backend", "device", "settings"))
        rows.append(gkey | coordinates(gkey["model"], settings.get(gkey["settings"], {}), configs.get(key))
                    | {"checkpoint": ",".join(sorted(checkpoints.get(key) or []))})
    return pd.DataFrame(rows, columns=GROUP + ["scheme", "base", *COORDINATES, *(f"{c}_given" for c in COORDINATES),
                                               "rest", "checkpoint"])


def matches(row, spec) -> bool:
    """A coordinate spec: a value, a list of values, {min: x, max: y}, or {prefix: p or [p, ...]} (a label's
    start: `{prefix: "draft:"}` matches every draft)."""
    if isinstance(spec, dict) and "prefix" in spec:
        starts = spec["prefix"] if isinstance(spec["prefix"], list) else [spec["prefix"]]
        return isinstance(row, str) and row.startswith(tuple(starts))
    if isinstance(spec, dict):
        return row is not None and spec.get("min", -np.inf) <= row <= spec.get("max", np.inf)
    return row in (spec if isinstance(spec, list) else [spec])


def pairs(groups: pd.DataFrame, claim: dict) -> list[tuple[pd.Series, pd.Series]]:
    """(variant, reference) group pairs for a compare claim."""
    spec = claim["compare"]
    axis = spec["axis"]
    others = [c for c in COORDINATES if c not in (axis, LINKED.get(axis))]
    share = ["base", "scheme", "provenance", "backend", "device", "rest", *others]
    out = []
    for _, v in groups.iterrows():
        if not matches(v[axis], spec["variant"]) or (claim.get("models") and v.base not in claim["models"]) \
                or not all(matches(v[k], x) for k, x in (claim.get("where") or {}).items()):
            continue
        for _, r in groups.iterrows():
            native = spec["reference"] == "native"
            if (not r[f"{axis}_given"] if native else matches(r[axis], spec["reference"])) \
                    and all(r[k] == v[k] for k in share) \
                    and not (r.model == v.model and r.settings == v.settings) \
                    and (r.model != v.model or r.checkpoint == v.checkpoint):  # one model: the same weights
                out.append((v, r))
    return out


def held(v: pd.Series, axis: str) -> str:
    """The coordinates a pair shares that its model does not have natively, named beside the variant: a
    pruning pair of two top-2 variants of a top-8 model is not the model pruned."""
    given = [f"{c} {v[c]:g}" if isinstance(v[c], (int, float)) else f"{c} {v[c]}"
             for c in COORDINATES if c not in (axis, LINKED.get(axis)) and v.get(f"{c}_given")]
    return f" at {', '.join(given)}" if given else ""


def select(df: pd.DataFrame, g: pd.Series) -> pd.DataFrame:
    return df[np.logical_and.reduce([df[k] == g[k] for k in GROUP + ["scheme"]])] if len(df) else df


def cell_flag(r) -> str | None:
    if isinstance(r.flag, str) and not r.flag.startswith("baseline: "):
        return r.flag
    if not isinstance(r.roofline, str) or r.roofline.startswith("no roofline"):
        return NO_ROOFLINE
    return None


def _bytes_allow(a, b) -> str | None:
    """The change the two sides' roofline ceilings allow (bytes and FLOPs per step, top-k and expert count
    as overridden): the guide's "+50-80% for one expert" is this ratio at batch 1, what vLLM delivers the
    measured one."""
    ca, cb = (getattr(x, "throughput_ceiling", np.nan) for x in (a, b))
    return f"the roofline allows {100 * (ca / cb - 1):+.0f}%" if pd.notna(ca) and pd.notna(cb) and cb > 0 else None


def _kernel_difference(a, b) -> str | None:
    """What differs between the two sides' MoE kernels, which is then part of the change: a variant with an
    expert count vLLM has no tuned Triton config for (Mixtral with 4 or 2 experts on the H200) runs on the
    default config while its reference runs on a tuned one, or on one supplied beside vLLM's."""
    kernel = [getattr(x, "moe_kernel", None) for x in (a, b)]
    if all(isinstance(k, str) for k in kernel) and kernel[0] != kernel[1]:
        return f"MoE kernels differ: {kernel[0]} vs {kernel[1]}"
    ka, kb = (kernels.config_kind(getattr(x, "moe_config", None)) for x in (a, b))
    if None not in (ka, kb) and ka != kb:
        return f"MoE Triton configs differ: {a.moe_config} vs {b.moe_config}"
    return None


def _host_difference(a, b) -> str | None:
    """Two sides timed on different hosts (another session's machine): on the H200's real shapes one engine
    config retimed on another day moved 0.4-1.1%, while host-bound cells moved far more between engines."""
    differ = [f"{x} vs {y}" for x, y in (tuple(getattr(s, k, None) for s in (a, b)) for k in ("host", "host_cpu"))
              if isinstance(x, str) and isinstance(y, str) and x and y and x != y]  # CPUs recorded since session 11
    return f"timed on different hosts: {'; '.join(differ)}" if differ else None


def _hosts_of_sweep(p: pd.DataFrame) -> str:
    """A sweep whose batches were timed on several hosts (a plan filling in batches a session before had not):
    the large, GPU-bound batches that decide the rule agree across hosts, host-bound small ones need not."""
    hosts = sorted({h for h in p.get("host", pd.Series(dtype=object)) if isinstance(h, str) and h})
    if len(hosts) < 2:
        return ""
    per = "; ".join(f"{h}: b" + ", ".join(f"{b:g}" for b in sorted(p[p.host == h].batch)) for h in hosts)
    return f"; its batches were timed on {len(hosts)} hosts ({per}): host-bound small batches may not compare across them"


def _decode_steps(row) -> tuple[float, float] | None:
    """A cell's mean decode step (vLLM's ITL: one gap per step that gave a request tokens, however many) and how
    many such steps the batch's decode spanned: its slowest request sets the batch's latency, while the ITL and
    acceptance are averages over requests (at batch 16, likely one prompt the draft cannot predict; per-request
    decode times are not recorded)."""
    itl, decode = getattr(row, "itl_mean", np.nan), getattr(row, "latency", np.nan) - getattr(row, "ttft", np.nan)
    return (itl, decode / itl) if itl > 0 and decode > 0 else None


def _acceptance(row, ref=None) -> str:
    """A speculative cell's acceptance and, beside its plain reference, the decode-time ratio as its two
    factors: steps spanned and a step's cost (their product is the decode-time ratio, not a prediction).
    Session 16 (moe-500m on the H200): a step cost 2-3.5x a plain one (a small target's plain step is
    launch-bound), and the batch-16 decodes spanned nearly as many steps as plain decoding."""
    rate, length = getattr(row, "spec_acceptance_rate", np.nan), getattr(row, "spec_acceptance_length", np.nan)
    if pd.isna(rate):
        return ""
    note = f"; acceptance {rate:.3f} ({length:.2f} tokens per drafted step)"
    mine, plain = _decode_steps(row), (_decode_steps(ref) if ref is not None else None)
    if mine and plain:
        cost = mine[0] / plain[0]
        note += (f"; a decode step took {cost:.2f}x a plain one (mean ITL {1e3 * mine[0]:.2f} vs {1e3 * plain[0]:.2f} ms) "
                 f"and the batch's decode spanned {mine[1]:.0f} of them against {plain[1]:.0f}"
                 + (" (its slowest request sets it)" if getattr(row, "batch", 1) > 1 else "")
                 + f": decode x{plain[1] / mine[1] / cost:.2f}, the rest is prefill")
    return note


def measured_pair(quantity: str, v, r, perf, items, acc, mem) -> list[dict]:
    if quantity == "speedup":  # throughput as a ratio (x), with the variant's acceptance beside
        rows = measured_pair("throughput", v, r, perf, items, acc, mem)
        pv, pr = select(perf, v).set_index("cell"), select(perf, r).set_index("cell")
        for f in rows:
            f.update({k: 1 + f[k] / 100 for k in ("value", "lo", "hi")})
            ref = pr.loc[f["cell"]] if f["cell"] in pr.index else None
            if f["cell"] in pv.index and (note := _acceptance(pv.loc[f["cell"]], ref).lstrip("; ")):
                f["note"] = note + (f"; {f['note']}" if f.get("note") else "")
        return rows
    if quantity == "throughput":
        pv, pr = select(perf, v).set_index("cell"), select(perf, r).set_index("cell")
        out = []
        for cell in [c for c in pv.sort_values("batch").index if c in pr.index]:
            a, b = pv.loc[cell], pr.loc[cell]
            point, lo, hi = verdicts.ratio_of_medians(*(verdicts.repeats_of(x.repeats, x.throughput) for x in (a, b)))
            flag = cell_flag(a) or cell_flag(b)
            note = "; ".join(x for x in (flag, _bytes_allow(a, b), _kernel_difference(a, b), _host_difference(a, b)) if x)
            out.append({"cell": cell, "value": point, "lo": lo, "hi": hi} | ({"flag": flag} if flag else {})
                       | ({"note": note} if note else {}))
        return out
    if quantity == "accuracy_loss":
        out = []
        for a in select(acc, v).query("primary").itertuples():
            iv = items[np.logical_and.reduce([items[k] == v[k] for k in GROUP + ["scheme"]])
                       & (items.task == a.task) & (items.metric == a.metric)].set_index("item").value
            ir = items[np.logical_and.reduce([items[k] == r[k] for k in GROUP + ["scheme"]])
                       & (items.task == a.task) & (items.metric == a.metric)].set_index("item").value
            both = pd.concat([iv, ir], axis=1, join="inner")
            if len(both):
                point, lo, hi = verdicts.paired_ratio_of_means(both.iloc[:, 0], both.iloc[:, 1])
                note = f"{a.metric}, {len(both)} paired items"
            else:
                ref = acc[(acc.task == a.task) & (acc.metric == a.metric)
                          & np.logical_and.reduce([acc[k] == r[k] for k in GROUP + ["scheme"]])]
                if ref.empty:
                    continue
                point, lo, hi, note = 100 * (a.value / ref.value.iloc[0] - 1), np.nan, np.nan, f"{a.metric}: no items to pair"
            out.append({"cell": a.task, "value": -point, "lo": -hi, "hi": -lo, "note": note})
        return out
    wv, wr = select(mem, v).weights_bytes, select(mem, r).weights_bytes
    if wv.empty or wr.empty:
        return []
    change = 100 * (wv.iloc[0] / wr.iloc[0] - 1)
    value = change if quantity == "weights_change" else -change  # memory: a reduction, as verdicts.py
    return [{"cell": "engine", "value": value, "lo": value, "hi": value, "note": "weights held by the engine, exact"}]


def recommended_batch(perf: pd.DataFrame, rule: dict) -> tuple[float, float, float, str]:
    """One group's batch sweep -> (batch, lo, hi, note): the smallest batch whose median throughput is at
    least `share` of the sweep's best (`rule: {share: 0.9}`), or the largest whose ITL p99 stays under
    `itl_p99_ms`; the interval resamples each batch's timed repeats (bootstrap)."""
    sweep = perf.dropna(subset=["batch"]).sort_values("batch")
    if sweep.batch.nunique() < 3:
        return np.nan, np.nan, np.nan, "fewer than three batch sizes measured"
    batches = sweep.batch.to_numpy()
    top, measured = batches.max(), ", ".join(f"{b:g}" for b in batches)
    def open_end(point) -> str:  # the plans sweep to 512 (issue 12); a shorter sweep says it must go on
        return (f"; {'it is' if point == top else 'its interval reaches'} the largest batch measured ({top:g}), so the "
                "answer may lie above it" + ("" if top >= 512 else " (the sweep must go further, to 512 or the KV limit)"))
    if "itl_p99_ms" in rule:
        itl = sweep.itl_p99.to_numpy() * 1e3
        if np.isnan(itl).all():
            return np.nan, np.nan, np.nan, "no per-gap ITL p99 recorded (rows before it was)"
        ok = batches[itl < rule["itl_p99_ms"]]
        point = ok.max() if len(ok) else np.nan
        note = f"largest batch with ITL p99 under {rule['itl_p99_ms']:g} ms (an SLO of ours), of {measured}"
        return point, point, np.inf if point == top else point, note + (open_end(point) if point == top else "")
    reps = [np.asarray(verdicts.repeats_of(r.repeats, r.throughput), float) for r in sweep.itertuples()]
    pick = lambda med: batches[np.argmax(med >= rule["share"] * med.max())]
    point = pick(np.array([np.median(x) for x in reps]))
    rng = np.random.default_rng(SEED)
    boots = [pick(np.array([np.median(rng.choice(x, len(x))) for x in reps])) for _ in range(N_BOOT // 4)]
    lo, hi = np.percentile(boots, [2.5, 97.5])
    note = f"smallest batch reaching {rule['share']:.0%} of the sweep's best throughput, of {measured}"
    if hi == top:  # the best may lie beyond the sweep: then so may 90% of it
        return float(point), float(lo), np.inf, note + open_end(point)
    return float(point), float(lo), float(hi), note


def fit_rows(claim: dict, groups: pd.DataFrame, mem: pd.DataFrame, settings: dict, formats: dict) -> list[dict]:
    """A fit claim (`fit:` engine arguments, e.g. KV for one 2k sequence and one sequence at a time; `covers:` as
    a scheme claim's): per covered scheme, the device memory its engine held at exactly those arguments
    (reports/h200/plan-fit.yaml), which is the smallest GPU it starts in, in GB (10^9 bytes): one exact reading."""
    out = []
    args = ", ".join(f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in claim["fit"].items())
    for _, g in groups.iterrows():
        llm = (settings.get(g.settings) or {}).get("llm") or {}
        if any(llm.get(k) != v for k, v in claim["fit"].items()) or not verdicts.covers(claim, formats.get(g.scheme), g.base):
            continue
        for r in select(mem, g).dropna(subset=["peak_memory_bytes"]).itertuples():
            gb = r.peak_memory_bytes / 1e9
            out.append({**{c: g[c] for c in GROUP}, "scheme": g.scheme, "cell": "engine", "value": gb, "lo": gb, "hi": gb,
                        "note": f"device memory in use by an engine with {args} ({r.peak_memory_source}); weights "
                                f"{r.weights_bytes / 1e9:.1f} GB of it"})
    return out


def _row(claim: dict, **fields) -> dict:
    bound = claim.get("bound") or {}
    side = next(iter(bound), None)
    return {"claim": claim["id"], "text": claim["text"], "quantity": claim.get("quantity"),
            "bound_side": side, "bound": bound[side] if side in ("min", "max") else np.nan,
            "range_low": (claim.get("range") or [np.nan, np.nan])[0],
            "range_high": (claim.get("range") or [np.nan, np.nan])[1],
            "unit": claim.get("unit", "%"), "plan": claim.get("plan"), **fields}


def comparison_table(claims: dict, keys: pd.DataFrame, perf, items, acc, mem, settings: dict, configs: dict,
                     checkpoints: dict | None = None, benchmarks: dict | None = None, formats: dict | None = None) -> pd.DataFrame:
    """One row per claim x (variant, reference) pair x cell or task; claims nothing in this ledger speaks
    of yet get one row, `not measured` (with the plan that would measure them) or `not testable as written`."""
    groups = _group_table(keys, settings, configs, checkpoints or {})
    rows = []
    for claim in claims["claims"]:
        k = kind(claim)
        if k == "scheme":
            continue
        found = []
        if k == "benchmark":
            found = benchmark.benchmark_rows(claim, benchmarks or {})
        elif k == "fit":
            found = fit_rows(claim, groups, mem, settings, formats or {})
        elif k == "family":
            from moeq.evaluate.report import family  # it builds on this module's pairing rules
            found = family.family_rows(claim, groups, perf, mem)
        elif k == "compare":
            for v, r in pairs(groups, claim):
                ref = f"{r.model} · settings {r.settings}" + (f" ({claim['compare']['axis']} {r[claim['compare']['axis']]})")
                for f in measured_pair(claim["quantity"], v, r, perf, items, acc, mem) or [{"note": "no data"}]:
                    found.append({**{g: v[g] for g in GROUP}, "scheme": v.scheme, "reference": ref,
                                  "variant": f"{claim['compare']['axis']} {v[claim['compare']['axis']]}" + held(v, claim['compare']['axis']), **f})
        elif k == "batch":
            for _, g in groups.iterrows():
                # an engine-level variant (top-k, expert count or width overridden, speculation) is no model's own
                # batch behaviour; a pruned checkpoint is a model of its own, but not the model a claim names
                if any(g[f"{c}_given"] for c in COORDINATES if c != "keep") or \
                        (claim.get("models") and (g.base not in claim["models"] or g.keep < 1)) or \
                        not all(matches(g[c], x) for c, x in (claim.get("where") or {}).items()):
                    continue
                p = select(perf, g)
                if p.dropna(subset=["batch"]).batch.nunique() < 3:  # not a batch sweep (a fit engine's one cell)
                    continue
                shape = p.dropna(subset=["batch"]).groupby(["input_len", "output_len"]).size().idxmax()
                p = p[(p.input_len == shape[0]) & (p.output_len == shape[1])]
                point, lo, hi, note = recommended_batch(p, claim["batch"])
                note += _hosts_of_sweep(p)
                flags = {f for f in map(cell_flag, p.itertuples()) if f}
                f = {"value": point, "lo": lo, "hi": hi, "note": note}
                if flags:
                    f |= {"flag": sorted(flags)[0], "note": note + "; " + sorted(flags)[0]}
                found.append({**{c: g[c] for c in GROUP}, "scheme": g.scheme, "cell": f"b* ({shape[0]:g} in, {shape[1]:g} out)", **f})
        for f in found:
            rows.append(_row(claim, **f, verdict=FLAGGED if f.get("flag") else judge(
                f.get("value", np.nan), f.get("lo", np.nan), f.get("hi", np.nan), claim["bound"]),
                position=verdicts.range_position(f.get("value", np.nan), claim["range"]) if claim.get("range") else ""))
        if not found:
            if claim.get("not_testable"):
                nt = claim["not_testable"]
                note = f"{nt['reason']} ({nt['measured']})" + (f"; nearest testable form: {nt['nearest']}" if nt.get("nearest") else "")
                rows.append(_row(claim, verdict=NOT_TESTABLE, note=note))
            else:
                rows.append(_row(claim, verdict=NOT_MEASURED,
                                 note="no rows in this ledger; measured by " + (claim.get("plan") or "no plan yet")))
    cols = ["claim", "text", "quantity", *GROUP, "scheme", "variant", "reference", "cell", "value", "lo", "hi", "unit",
            "bound_side", "bound", "range_low", "range_high", "position", "verdict", "flag", "plan", "note"]
    return pd.DataFrame(rows, columns=cols)
