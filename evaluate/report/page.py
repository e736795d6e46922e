"""The report as one list of blocks, in reading order: per device the answer first (a sentence per
claim, what to deploy per model, its caveats), then the models x schemes grid, plots, and every table
folded below; render.py writes the list as Markdown and as HTML, so the two never disagree.

Blocks: ("h1"|"h2"|"h3", text), ("p", text), ("table", DataFrame, id), ("img", file, caption),
("details", title, id, [blocks]): folded in HTML, its own Markdown page in README.md's folder.
"""
from datetime import datetime, timezone

import pandas as pd

from moeq import roofline
from moeq.evaluate.report import gpus, headline, plots, routing_load, serving, slower, tables, verdicts
from moeq.evaluate.report.tables import group_title, in_group, scheme_order, settings_text, slug
from moeq.evaluate.report.verdicts import GROUP
from moeq.evaluate.routing import DEGENERATE_ENTROPY


def claim_paragraphs(sentences: list[dict]) -> list[tuple]:
    """One paragraph per claim with a verdict here; the claims nothing here measured, in one line."""
    out = [("p", f"**{c['text']}** (holds if {c['bound']}): {c['sentence']}.") for c in sentences if c["sentence"]]
    silent = [c["text"] for c in sentences if not c["sentence"]]
    return out + [("p", "No scheme measured here is one these claims speak of: " + "; ".join(silent) + ".")] * bool(silent)


def answer(device, groups, tables_, claims, settings) -> list[tuple]:
    """The first screen for one device: claims as sentences, then what to deploy."""
    v, perf, mem, keys = (tables_[k] for k in ("verdicts", "performance", "memory", "keys"))
    out = [("h2", f"{device}: the answer")]
    out += claim_paragraphs(headline.claim_sentences(v, perf, groups, verdicts.scheme_claims(claims["claims"])))
    rec = tables_["recommendations"]
    rec = rec[[headline.group_key(r) in groups for _, r in rec.iterrows()]] if len(rec) else rec
    if len(rec):
        shared = tables.shared_caveats(rec)
        out += [("h3", "What to deploy"),
                ("p", "Per model: the fastest scheme whose whole 95% interval is above bf16, among those whose "
                      "accuracy passes its claim (bf16 where none is), at the smallest and the largest batch."
                      + (f" Caveats of every row: {'; '.join(shared)}." if shared else "")),
                ("table", tables.recommendation_display(rec, shared), slug("deploy", device))]
    return out


def device_body(device, groups, all_groups, tables_, claims, formats, folder) -> list[tuple]:
    """Grid, plots, and the claims of the groups the first screen left out, for one device."""
    v, perf, acc, mem = (tables_[k] for k in ("verdicts", "performance", "accuracy", "memory"))
    stem = slug(device)
    listed = groups or all_groups
    shown = headline.with_bf16(tables_["keys"], listed) or listed  # none with bf16: the grid still shows them
    out = [("h2", f"{device}: models × schemes"),
           ("p", "Throughput change vs bf16 of the same group [95% interval], accuracy change per task (relative, "
                 "paired interval), weights (change vs bf16) and KV capacity; each with its claim's verdict. "
                 f"\"{tables.SHAPE_ONLY_ACCURACY}\": random weights, accuracy not measured."
                 + (" Groups without bf16: their own pages, and \"GPUs needed\"." if len(shown) < len(listed) else "")),
           ("table", tables.grid_display(v, perf, acc, mem, shown), f"{stem}-grid")]
    made = [plots.speedup(folder, stem, all_groups, perf, verdicts.scheme_claims(claims["claims"]), formats),
            plots.memory(folder, stem, all_groups, mem), plots.accuracy(folder, stem, all_groups, acc, verdicts.scheme_claims(claims["claims"]), formats),
            plots.frontier(folder, stem, all_groups, perf)]
    out += [("h2", f"{device}: plots")] + [("img", *m) for m in made if m]
    rest = headline.with_schemes(tables_["keys"], [g for g in all_groups if g not in groups])
    if rest:
        out.append(("h2", f"{device}: claims at other settings"))
        inner = [("table", tables.grid_display(v, perf, acc, mem, rest), f"{stem}-grid-other")] if groups else []
        inner += claim_paragraphs(headline.claim_sentences(v, perf, rest, verdicts.scheme_claims(claims["claims"])))
        rec = tables_["recommendations"]
        rec = rec[[headline.group_key(r) in rest for _, r in rec.iterrows()]] if len(rec) else rec
        if len(rec):
            inner.append(("table", tables.recommendation_display(rec), f"{stem}-deploy-other"))
        out.append(("details", "The grid, sentences and picks for the groups measured at other engine settings: "
                    + ids_or_count(sorted({g[GROUP.index("settings")] for g in rest})), f"{stem}-other-settings", inner))
    return out


def engines_of(perf, acc):
    """The kernel columns of a group's perf and accuracy engines (a lease may score accuracy alone)."""
    return pd.concat([perf, acc[["scheme", "moe_kernel", "moe_config", "moe_dtype", "experts_a16"]]], ignore_index=True)


def group_details(g, tables_, unsupported, settings) -> tuple:
    gkey = dict(zip(GROUP, g))
    perf, acc, mem, keys = (tables_[k] for k in ("performance", "accuracy", "memory", "keys"))
    gp, ga = in_group(perf, gkey), in_group(acc, gkey)
    inner = [("p", "Engine settings: " + settings_text(settings.get(gkey["settings"], {})) + ". Caveats: "
                   + "; ".join(headline.caveats(gkey, engines_of(gp, ga), settings) or ["none"]) + ".")]
    if gkey["provenance"].startswith("shape-only"):
        inner.append(("p", "Shape-only: the real architecture with random weights, so speed and memory are "
                           "measured but accuracy is not measured."))
    schemes = scheme_order(in_group(keys, gkey).scheme)
    inner += [("h3", "Summary"), ("table", tables.summary_display(gkey, schemes, perf, acc, mem, unsupported),
                                  f"{slug(*g)}-summary")]
    if len(gp):
        inner += [("h3", "Performance"), ("table", tables.perf_display(gp), f"{slug(*g)}-performance")]
    if len(ga):
        inner += [("h3", "Accuracy"), ("table", tables.accuracy_display(ga), f"{slug(*g)}-accuracy")]
        elsewhere = sorted(set(ga.baseline_settings) - {gkey["settings"]})
        if elsewhere:  # a kernel variant (build.kernel_baselines): bf16 is not run on the forced kernel
            inner.append(("p", f"Δ and recovery are against bf16 at settings {', '.join(elsewhere)}, which differ from "
                               "this group's only in the MoE kernel choice (vLLM's own there); bf16 has no quantized "
                               "experts for that choice to act on."))
    gr = in_group(tables_["recovery"], gkey)
    if len(gr):
        inner += [("p", "Recovery as quantized-model cards report it: each task's score over bf16's on the same "
                        "items, averaged over tasks; the interval resamples every task's items."),
                  ("table", tables.recovery_display(gr), f"{slug(*g)}-recovery")]
    return ("details", f"{group_title(gkey)} on {gkey['device']} ({gkey['backend']})", slug(*g), inner)


def blocks(name, ledger_path, tables_, unsupported, env, settings, claims, formats, folder) -> list[tuple]:
    keys, found = tables_["keys"], tables_["findings"]
    headline_groups = headline.headline_groups(keys, settings, [c["fit"] for c in claims["claims"] if "fit" in c])
    devices = sorted(keys.device.unique(), key=lambda d: (not any(g[3] == d for g in headline_groups), d))
    out = [("h1", f"moeq report: {name}"),
           ("p", f"From `{ledger_path}`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Changes are against "
                 "bf16 of the same model, weights, backend, device and engine settings, with 95% intervals. "
                 "Numbers: `summary.csv` (value, low, high, unit per group, scheme, cell and metric) and a CSV/JSON "
                 "per table in this folder.")]
    for d in devices:
        out += answer(d, [g for g in headline_groups if g[3] == d], tables_, claims, settings)
    contents = [f"{d}: models × schemes" for d in devices] + [f"{d}: plots" for d in devices]
    slow = tables_.get("slower", pd.DataFrame())
    contents += ["Findings: one precision, two speeds"] * bool(len(found))
    contents += ["Findings: slower than bf16, in which phase"] * bool(len(slow)) + ["Published recoveries (external)", "How far the embedded models carry", "Routed expert load"] + [
        "Serving under load", "Every table, per group", "Every verdict", "Methods",
        "Provenance"]
    out += [("h2", "Contents"), ("toc", contents)]
    for d in devices:
        # the first screen's groups first, then the others (e.g. legacy settings)
        all_groups = sorted((tuple(g) for g in keys[keys.device == d][GROUP].drop_duplicates().itertuples(index=False)),
                            key=lambda g: (g not in headline_groups, g))
        out += device_body(d, [g for g in headline_groups if g[3] == d], all_groups, tables_, claims, formats, folder)
    if len(found):
        out += [("h2", "Findings: one precision, two speeds"),
                ("p", "Cells where two schemes of the same precision (weight and activation type and bits) differ "
                      "in throughput by more than 10%, with the MoE kernel vLLM chose for each and whether its Triton "
                      "config was tuned for the device; `variants` are the same cells measured with another "
                      "`moe_backend`, which separates the kernel from the format; a row whose A is a scheme with a "
                      "`moe_backend` is that scheme forced onto another kernel against vLLM's own choice, listed whatever the gap."),
                ("p", findings_summary(found)),
                ("details", "Every such cell, with both kernels and any kernel variant", "findings",
                 [("table", tables.findings_display(found), "findings")])]
    if len(slow):
        out += [("h2", "Findings: slower than bf16, in which phase"),
                ("p", slower.INTRO + " " + slower.summary(slow)),
                ("details", "Every such cell: latency, TTFT p99 and ITL p50 against bf16's", "slower",
                 [("table", slower.display(slow), "slower")])]
    out += anchors_section(tables_["anchors"], tables_["recovery"], tables_["anchor_notes"])
    out += outliers_section(tables_["outliers"], tables_["outliers_published"], tables_["builds"],
                            tables_.get("builds_measured", pd.DataFrame()), tables_.get("builds_bf16", pd.DataFrame()))
    out += routing_section(tables_["routing"], tables_["performance"], keys, settings)
    needed, waiting = tables_.get("gpus_needed", pd.DataFrame()), gpus.unpaired(tables_["performance"])
    if len(needed) or waiting:
        out += [("h2", "GPUs needed"),
                ("p", "A quantized scheme on fewer GPUs than bf16 of the same model, same cells and engine settings "
                      "apart from the layout: its throughput per GPU as a share of bf16's (ratio of medians, 95% "
                      "bootstrap interval), and the KV cache each side had. " + " ".join(
                          s + "." for s in gpus.sentences(needed) + waiting))]
        if len(needed):
            out += [("details", "Every cell: throughput per GPU, KV capacity, GPUs saved", "gpus-needed",
                     [("table", gpus.display(needed), "gpus-needed")])]
    out += [("h2", "The guide's other claims"),
            ("p", "Active experts, expert count, FFN width, pruning, batch size, speculative decoding, fused kernels and "
                  "single-GPU fit (issue 12): a variant of a model against the same model differing only there "
                  "(top-k or expert count set through `hf_overrides`, a pruned model against its base), a batch "
                  "sweep's recommended batch, or, where nothing here measures the claim yet, the plan that would. "
                  "Speed on a device with no roofline (a CPU) is shown with no verdict."),
            ("details", "One row per claim and model: verdict, interval, or the plan that would measure it",
             "other-claims", [("table", tables.other_claims_display(tables_["verdicts"], claims["claims"]),
                               "other-claims")])]
    out += serving.section(tables_, folder, "report")
    out += [("h2", "Every table, per group"),
            ("p", "Per group: engine settings and caveats, a summary per scheme, every perf cell with its roofline "
                  "and flag, every accuracy task.")]
    every = [tuple(g) for g in keys[GROUP].drop_duplicates().sort_values(GROUP).itertuples(index=False)]
    out += [group_details(g, tables_, unsupported, settings) for g in every if g in headline_groups]
    others = [group_details(g, tables_, unsupported, settings) for g in every if g not in headline_groups]
    if others:  # one link, however many variants issue 12's plans add
        out.append(("details", f"The {len(others)} other groups: variants (top-k, expert count, speculation, a "
                               "fit claim's KV cache), engine experiments (another MoE kernel, a CUDA-graph size) "
                               "and earlier settings", "other-groups", others))
    out += [("h2", "Every verdict"),
            ("details", "One row per claim × scheme × group × cell or task", "verdicts",
             [("table", tables.verdict_display(tables_["verdicts"]), "verdicts")])]
    out += [("h2", "Methods"),
            ("details", "How each number is compared, measured and judged; the verdict rules; the roofline", "methods",
             [("p", METHODS_MD),
              ("table", pd.DataFrame(verdicts.RULES.items(), columns=["Verdict", "When"]), "verdict-rules"),
              ("p", "Roofline. " + roofline.__doc__.split("\n", 1)[1].strip()
               + " Peak rates come from devices.yaml; devices it lacks (every CPU) show no roofline.")])]
    out += [("h2", "Provenance"),
            ("details", "Where each number comes from: one row per group; `env` is the ledger's environment record "
                        "(library versions, device, commit)", "provenance",
             [("table", tables.provenance_display(keys, env, settings), "provenance")])]
    return out


def anchors_section(anchors: pd.DataFrame, recovery: pd.DataFrame, notes: dict) -> list[tuple]:
    """Published recoveries of real quantized MoE models beside moeq's own, marked as external."""
    published = "; ".join(f"{scheme}: {g.recovery_pct.min():.1f}-{g.recovery_pct.max():.1f}% ({len(g)} card"
                          f"{'s' * (len(g) > 1)})" if len(g) > 1 else f"{scheme}: {g.recovery_pct.iloc[0]:.1f}% (1 card)"
                          for scheme, g in anchors.groupby("moeq_scheme"))
    ours = "; ".join(f"{scheme}: {g.recovery_pct.min():.1f}-{g.recovery_pct.max():.1f}%" if len(g) > 1
                     else f"{scheme}: {g.recovery_pct.iloc[0]:.1f}%" for scheme, g in recovery.groupby("scheme"))
    return [("h2", "Published recoveries (external)"),
            ("p", "**Not measured by moeq.** What quantized MoE model cards report for their own models (recovery = "
                  f"quantized / unquantized score, by the nearest moeq scheme): {published}. moeq's own mean "
                  f"recoveries, on the embedded models only: {ours or 'none measured yet'}. "
                  f"{notes.get('dense_note', '')} {notes.get('not_found', '')}"),
            ("details", "Every published figure, with its card and the text it was read from", "anchors",
             [("table", tables.anchors_display(anchors), "anchors")])]


def builds_text(builds: pd.DataFrame) -> str:
    """One sentence per embedded model trained by moeq: is it a real language model, and how was it made; a model
    built more than once names each builder's record and gives each figure's range over them."""
    if "model" not in builds:
        return ""
    speed = ["mfu", "train_s"]  # a build on a CPU (tiny) records no speed or per-group figures
    gpu = builds.dropna(subset=speed) if set(speed) <= set(builds) else builds.iloc[:0]
    out = []
    for model, g in gpu.groupby("model", sort=False):
        def span(col, f, scale=1.0):
            lo, hi = scale * g[col].min(), scale * g[col].max()
            return f(lo) if f(lo) == f(hi) else f"{f(lo)}-{f(hi)}"
        known = lambda col: col in g and g[col].notna().all()
        bpb = lambda col: span(col, "{:.3f}".format)
        held = "; ".join(f"{grp} {bpb('bpb_' + grp)} (unigram {bpb('unigram_bpb_' + grp)}"
                         + (f", tiny {bpb('tiny_bpb_' + grp)}" if known("tiny_bpb_" + grp) else "") + ")"
                         for grp in ("stdlib", "packages") if known("bpb_" + grp))
        stems = ", ".join(f"`{f.removesuffix('.build.json')}`" for f in g.file)  # each figure below a range over them
        name = model if len(g) == 1 else f"{model} ({len(g)} builds: {stems})"
        m = lambda x: f"{x:,.1f}M"
        out.append(f"{name}: {span('params', m, 1e-6)} parameters ({span('active_params', m, 1e-6)} active), trained on "
                   f"{span('train_tokens_seen', m, 1e-6)} tokens ({span('epochs', '{:.2f}'.format)} epochs of "
                   f"{span('train_tokens_unique', m, 1e-6)}) in {span('train_s', '{:,.0f}'.format)} s on "
                   f"{'/'.join(g.device.unique())} ({span('tokens_per_s', '{:,.0f}'.format)} tok/s, MFU "
                   f"{span('mfu', '{:.1f}'.format, 100)}%); held-out bits per byte {held}; least-used expert "
                   f"{span('min_expert_share_of_fair', '{:.0f}'.format, 100)}% of a fair share")
    return "Trained by moeq (`builds/`, the builder's record): " + "; ".join(out) + ". " if out else ""


def several_builds_text(measured: pd.DataFrame, bf16: pd.DataFrame = pd.DataFrame()) -> str:
    """The models measured on more than one build: each build's rows are a group of their own; bf16's scores
    across them say how far retraining alone moves a score."""
    if measured.empty:
        return ""
    days = lambda r: str(r.first)[:10] + ("" if str(r.first)[:10] == str(r.last)[:10] else f" to {str(r.last)[:10]}")
    parts = [f"{m}: " + ", ".join(f"{r.provenance} ({r.rows} rows, {days(r)})"
                                  for r in g.sort_values("first").itertuples()) for m, g in measured.groupby("model")]
    spread = [f"{m} ({g.provenance.nunique()} builds, settings {s}): " + ", ".join(
                  f"{task} {metric} {100 * t.value.min():.1f}-{100 * t.value.max():.1f}% (stderr up to "
                  f"{100 * t.stderr.max():.1f} points)" for (task, metric), t in g.groupby(["task", "metric"]))
              for (m, s), g in bf16.groupby(["model", "settings"])] if len(bf16) else []
    return ("Measured on more than one build (builds are not bitwise reproducible, so each is other weights; every "
            f"build's rows are kept as a group of their own and nothing pairs across them): {'; '.join(parts)}. "
            + (f"bf16 across builds, the spread retraining alone makes: {'; '.join(spread)}. " if spread else ""))


def outliers_section(measured: pd.DataFrame, published: pd.DataFrame, builds: pd.DataFrame,
                     several: pd.DataFrame = pd.DataFrame(), bf16: pd.DataFrame = pd.DataFrame()) -> list[tuple]:
    """What the embedded models are, and their activation outliers and weight kurtosis beside published values
    for real LLMs."""
    lines = []
    for model, g in measured.groupby("model"):
        act, wts = g[g.quantity.str.startswith("activation")], g[g.quantity == "weight kurtosis"]
        top, kurt = act.loc[act["max"].idxmax()], wts.loc[wts["max"].idxmax()]
        lines.append(f"{model}: largest activation max/median {top['max']:,.0f} (layer {top.layer}, the input of "
                     f"{top.tensor}), largest weight kurtosis {kurt['max']:.2f} ({kurt.tensor}; a Gaussian's is 3)")
    body = [("p", builds_text(builds) + several_builds_text(several, bf16)
                  + "Quantization error in real LLMs comes largely from activation outliers that grow with scale. "
                  "Measured by `moeq outliers` on held-out text (files beside the ledger, `outliers/`): "
                  + ("; ".join(lines) + "." if lines else "nothing yet for this ledger's models.")
                  + (f" Published for real LLMs (**external**, not the same quantity everywhere; all with sources "
                     f"below): {published.model[0]}, {published.quantity[0]}: {published.value[0]} ({published.title[0]}). "
                     "Accuracy rows of a model whose outliers are far smaller than real models' carry only so far."
                     if len(published) else ""))]
    if len(measured):
        body.append(("details", "Every layer kind of every measured model", "outliers",
                     [("table", tables.outliers_display(measured), "outliers")]))
    if len(published):
        body.append(("details", "Published outlier and kurtosis figures for real LLMs (external)", "outliers-published",
                     [("table", tables.published_outliers_display(published), "outliers-published")]))
    return [("h2", "How far the embedded models carry")] + body


def ids_or_count(ids: list[str]) -> str:
    """Settings ids listed while few, counted past four: each new group would otherwise lengthen the first screen
    (every group's own page names its settings)."""
    return ", ".join(ids) if len(ids) <= 4 else f"{len(ids)} settings groups"


def routing_section(probes: pd.DataFrame, perf: pd.DataFrame, keys: pd.DataFrame, settings: dict) -> list[tuple]:
    """Which routing each settings group used, the expert load `moeq routing` measured for it, and the rows a
    degenerate dummy router flags (issue 9)."""
    used = {}
    for sid in sorted(keys.settings.unique()):
        used.setdefault(routing_load.routing_used(settings.get(sid, {})), []).append(sid)
    text = "Routing behind the rows, per settings group (each group's page names its own): " + "; ".join(
        f"{ids_or_count(ids)}: {how}" for how, ids in used.items()) + ". "
    if probes.empty:
        return [("h2", "Routed expert load"),
                ("p", text + "Routing was not probed for this ledger's models: no `moeq routing` results beside the "
                             "ledger (`routing/*.json`, written by `moeq routing CKPT:dummy CKPT:dummy:uniform_random "
                             "--out routing/NAME.json`).")]
    bad = probes[probes.verdict == "degenerate"]
    hit = perf[perf.flag.fillna("").str.contains(routing_load.FLAG_HEAD)]
    flagged = "; ".join(f"{m} at settings {s}, {len(g)} perf cells" for (m, s), g in hit.groupby(["model", "settings"]))
    text += ("`moeq routing` measured the expert load vLLM routes for random-token prompts (median over layers; "
             "files beside the ledger, `routing/`). Degenerate, an expert no token reaches in the median layer or "
             f"normalized entropy below {DEGENERATE_ENTROPY}: "
             + ("; ".join(f"{r.model} {r.scheme}, {r.routing} (busiest expert {r.max_over_mean:.1f}× the mean, "
                          f"idlest {r.min_over_mean:.2f}×, entropy {r.entropy:.2f})" for r in bad.itertuples()) or "none")
             + ". Rows measured on a degenerate router measure that router, not the model: rows on dummy weights' "
               f"own routers whose probe degenerated are flagged ({flagged or 'none in this ledger'}); rows routed by "
               "a simulation (uniform_random) are not.")
    return [("h2", "Routed expert load"), ("p", text),
            ("details", "Every probe: the median layer's load", "routing",
             [("table", tables.routing_display(probes), "routing")])]


def findings_summary(found: pd.DataFrame) -> str:
    """How many cells, and the ones whose cause a kernel variant measured, in one paragraph."""
    from moeq.evaluate.report.build import SAME_PRECISION_GAP as GAP  # build imports this module (via render)
    own = found.kind.eq("kernel variant")
    forced = found[own]
    close = int((100 * (forced.ratio - 1)).abs().le(GAP).sum())
    found = found[~own]
    measured = found[found.variants != ""]
    lines = [f"{r.model} {r.cell} ({r.settings}): {r.scheme_a} {r.throughput_a:,.0f} vs {r.scheme_b} "
             f"{r.throughput_b:,.0f} tok/s; {r.variant_speeds}" for r in measured.drop_duplicates(["model", "cell", "variants"])
             .itertuples()]
    return (f"{len(found)} cells in {found.groupby(['model', 'settings']).ngroups} groups. "
            + ("Measured with a kernel variant: " + " · ".join(lines) + "." if lines
               else "No kernel variant measured yet: each cell names the kernels only.")
            + (f" A scheme forced onto another kernel (`moe_backend`) against vLLM's choice: {len(forced)} cells, "
               f"{forced.ratio.min():.2f}-{forced.ratio.max():.2f}× ({', '.join(sorted(forced.scheme_a.unique()))}"
               f"; {close} within {GAP}%)." if len(forced) else ""))


METHODS_MD = (
    "Comparisons: a scheme is compared only with the bf16 row of the same model, provenance (real weights or "
    "shape-only), backend, device and engine settings (the settings id; the scheme's own vLLM `quantization` "
    "argument aside). Performance: vLLM's offline `LLM` with its engine in moeq's engine process "
    "(`VLLM_ENABLE_V1_MULTIPROCESSING=0`; `vllm bench` and servers run it in a process of its own, as rows whose "
    "settings say `engine_process: separate` do), greedy, "
    "`ignore_eos` and `min_tokens` = O; each cell (batch B, input length I, output length O) runs once "
    "untimed (decoding `warmup_tokens` tokens where the settings name them), then n timed repeats (over 2+ engine starts where `Engines` says so, so that the interval holds "
    "engine-restart variance; else within one engine only); tables show the median of the repeats, and spread = "
    "(max − min) / median. Throughput = B·(I+O) / latency. TTFT p50/p99 over the requests of a run; ITL p50/p99 "
    "over every inter-token gap of every request (vLLM's own per-token statistic), each the median over runs; "
    "rows measured before 2026-11-30 kept only per-request mean ITLs (shown as such). The MoE kernel and "
    "whether its Triton config was tuned for the device are what vLLM logged at engine start. Accuracy: lm-eval scores ± their "
    "stderr; Δ is relative (scheme / bf16 − 1), and an accuracy loss is −Δ; recovery is scheme / bf16 per task and, per scheme, averaged over the claims' tasks (as quantized-model cards report it), its interval resampling each task's items; the claims use, per task, the first "
    "of exact_match, acc_norm, acc with per-item scores. A recommendation's KV capacity is the KV cache's token "
    f"count divided by {headline.CONTEXT} (sequences of that length that fit at once). Memory: the weights the engine holds (parameters and "
    "buffers, so quantization scales count), relative to bf16; checkpoint size on disk as a second column. "
    + verdicts.METHODS)

