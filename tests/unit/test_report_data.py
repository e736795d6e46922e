"""The report's data rules without a ledger: which cells get no speed verdict, and how a claim's cells
read as one sentence."""
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from moeq.evaluate.report import headline
from moeq.evaluate.report.build import HOST_BOUND_PCT, physics_flag


def cell(**kw):
    base = dict(pct_of_ceiling=30.0, pct_of_balanced=30.0, roofline="NVIDIA H200", routing="uniform_random",
                throughput_ceiling=1900.0, throughput_ceiling_bf16=1000.0, scheme="fp8", delta_lo=5.0)
    return SimpleNamespace(**(base | kw))


def test_host_bound_cells_get_no_speed_verdict():
    assert physics_flag(cell()) is None
    flag = physics_flag(cell(pct_of_ceiling=HOST_BOUND_PCT / 2, pct_of_balanced=HOST_BOUND_PCT / 2))
    assert flag.startswith("host-bound:") and headline.short_flag(flag) == "host-bound"
    assert headline.short_flag("baseline: " + flag) == "bf16 host-bound"
    assert physics_flag(cell(pct_of_ceiling=120.0)).startswith("faster than physics")


def test_runs_merge_cells_with_one_verdict():
    rows = pd.DataFrame({"cell": ["b1", "b16", "b64"], "verdict": ["fails", "holds", "holds"],
                         "value": [-20.0, 24.0, 33.0], "lo": [-21.0, 23.0, 32.0], "hi": [-19.0, 25.0, 34.0],
                         "note": [np.nan] * 3, "quantity": ["throughput"] * 3})
    labels = {"b1": "b1", "b16": "b16", "b64": "b64"}
    assert headline._runs(rows, labels) == ["fails at b1 (-20.0% [-21.0, -19.0])", "holds at b16–b64 (+24 to +33%)"]
    # a batch bf16 alone was timed at (session 16's Mixtral sweep) stays in the verdict table, not the sentence
    wider = pd.concat([rows, pd.DataFrame({"cell": ["b512"], "verdict": ["not measured"], "value": [np.nan],
                                           "lo": [np.nan], "hi": [np.nan], "note": ["not timed"],
                                           "quantity": ["throughput"]})])
    assert headline._runs(wider, labels | {"b512": "b512"}) == headline._runs(rows, labels)
    assert headline._runs(wider.tail(1), {"b512": "b512"}) == ["not measured at b512 (not timed)"]


def test_a_sweep_extended_for_one_scheme_keeps_the_batches_the_schemes_share():
    """Session 16 swept Mixtral bf16 to batch 512 in the group where every scheme was timed at 1-128: the
    answer's largest batch stays 128, not a batch at which nothing is compared; other shapes stay out."""
    rows = [{"scheme": s, "batch": b, "input_len": 512, "output_len": 128} for s in ("bf16", "fp8", "w8a16")
            for b in (1, 16, 128)] + [{"scheme": "bf16", "batch": b, "input_len": 512, "output_len": 128}
                                      for b in (2, 256, 512)] + [{"scheme": "fp8", "batch": 16, "input_len": 2048,
                                                                  "output_len": 128}]
    sweep = headline.compared_sweep(pd.DataFrame(rows))
    assert sorted(sweep.batch.unique()) == [1, 16, 128] and set(sweep.input_len) == {512}
    assert headline.compared_sweep(pd.DataFrame(columns=["scheme", "batch", "input_len", "output_len"])).empty


def test_committed_h200_report_reads_in_one_sitting():
    """Issue 11: the published report's README stays under 30 KB; everything else is one link away."""
    from pathlib import Path
    readme = Path(__file__).resolve().parents[2] / "reports" / "h200" / "report" / "README.md"
    text = readme.read_text()
    assert len(text.encode()) < 30_000 and "## NVIDIA H200: the answer" in text.split("## Contents")[0]
    for link in __import__("re").findall(r"\]\(([\w.-]+\.md)\)", text):
        assert (readme.parent / link).is_file(), link


def test_a_kernel_variant_attaches_only_to_rows_of_its_own_settings():
    from moeq.evaluate.report.build import precision_findings
    fp8 = {"weights": "float8", "activations": "float8"}
    row = lambda scheme, settings, tps, kernel: {"model": "m", "provenance": "shape-only", "backend": "vllm",
                                                 "device": "H200", "settings": settings, "cell": "b1",
                                                 "scheme": scheme, "throughput": tps, "moe_kernel": kernel,
                                                 "moe_config": "tuned" if isinstance(kernel, str) else np.nan}
    perf = pd.DataFrame([row("fp8", "defaults", 900.0, "VLLM_CUTLASS"), row("fp8-block", "defaults", 1200.0, "TRITON"),
                         row("fp8", "old", 800.0, np.nan), row("fp8-block", "old", 1000.0, np.nan),
                         row("fp8", "triton", 1300.0, "TRITON")])
    settings = {"defaults": {"non_default": {"routing": "uniform_random"}}, "old": {"non_default": {"mode": 0}},
                "triton": {"non_default": {"routing": "uniform_random", "moe_backend": "triton"}}}
    found = precision_findings(perf, {"fp8": fp8, "fp8-block": fp8}, settings)
    forced = found.kind.eq("kernel variant")
    f = found[~forced].set_index("settings")
    assert f.variants["defaults"] == "fp8 with moe_backend=triton: 1,300 tok/s (TRITON, tuned)"
    assert f.variants["old"] == ""  # the variant ran at other settings than these rows
    assert f.kernel_a["old"].startswith("not recorded") and f.kernel_a["defaults"] == "VLLM_CUTLASS (tuned)"
    # the scheme against itself on vLLM's kernel: a finding of its own, against its own settings' row only
    (k,) = found[forced].itertuples()
    assert (k.settings, k.scheme_a, k.scheme_b, k.kernel_a) == ("defaults", "fp8 (moe_backend=triton)", "fp8", "TRITON (tuned)")
    assert k.ratio == pytest.approx(1300 / 900) and k.variants.endswith("not side by side")  # no env record: apart
    from moeq.evaluate.report.page import findings_summary  # README's paragraph: the variant's speed, not its tiles
    summary = findings_summary(found)
    assert "fp8 900 vs fp8-block 1,200 tok/s; fp8 with moe_backend=triton: 1,300 tok/s." in summary and "tuned" not in summary
    perf["env_id"] = 7  # one run timed both
    assert precision_findings(perf, {"fp8": fp8, "fp8-block": fp8}, settings).variants.iloc[-1] == "settings triton"
    # a kernel variable is a kernel choice too (session 25: humming with INT8 activations, set by environment)
    int8 = {"routing": "uniform_random", "moe_backend": "humming", "VLLM_HUMMING_INPUT_QUANT_CONFIG": '{"dtype":"int8"}'}
    with_env = pd.concat([perf, pd.DataFrame([row("fp8", "humming-int8", 1800.0, "HUMMING") | {"env_id": 7}])])
    found = precision_findings(with_env, {"fp8": fp8}, settings | {"humming-int8": {"non_default": int8}})
    assert ("fp8 (moe_backend=humming, VLLM_HUMMING_INPUT_QUANT_CONFIG={\"dtype\":\"int8\"})", 2.0) in \
        set(zip(found.scheme_a, found.ratio))
    # within SAME_PRECISION_GAP of vLLM's choice: still listed (a chosen experiment), and the summary counts it
    perf.loc[4, "throughput"] = 850.0
    found = precision_findings(perf, {"fp8": fp8}, settings)
    assert found[found.kind.eq("kernel variant")].ratio.tolist() == [pytest.approx(850 / 900)]
    from moeq.evaluate.report.page import findings_summary
    assert "1 cells, 0.94-0.94× (fp8 (moe_backend=triton); 1 within 10%)" in findings_summary(found)


def test_a_kernel_variants_accuracy_pairs_with_bf16_at_the_settings_it_differs_from_only_in_the_kernel():
    """Row 5c: W8A8-INT8 scored on humming with INT8 activations beside bf16 and Triton on one build; bf16 was not
    run on humming (no quantized experts to act on), so the variant's Δ is against bf16 at vLLM's own choice."""
    from moeq.evaluate.report.build import accuracy_table, item_scores, kernel_baselines, recovery_table
    int8 = {"VLLM_HUMMING_INPUT_QUANT_CONFIG": '{"dtype":"int8"}', "moe_backend": "humming"}
    settings = {"plain": {"non_default": {"log": 0}}, "humming": {"non_default": {"log": 0} | int8},
                "graphs": {"non_default": {"log": 0, "graphs": 1}}, "orphan": {"non_default": {"log": 1} | int8}}
    assert kernel_baselines(settings) == {"humming": "plain"}  # orphan: no plain twin, so no baseline
    key = dict(model="m", provenance="real", backend="vllm", device="H200", kind="accuracy", cell="mc",
               metric="acc", n=200, spread=0.03, env_id=1, note=None)
    bf16, int8_items = [1, 0] * 100, [1, 0] * 90 + [0, 0] * 10  # 10 of bf16's 100 correct items lost
    rows = [("bf16", "plain", bf16), ("w8a8-int8", "humming", int8_items), ("w8a8-int8", "orphan", int8_items)]
    results = pd.DataFrame([key | {"scheme": s, "settings": sid, "value": np.mean(v)} for s, sid, v in rows])
    items = pd.DataFrame([{k: key[k] for k in ("model", "provenance", "backend", "device")} | {
        "scheme": s, "settings": sid, "task": "mc", "metric": "acc", "item": i, "value": x}
        for s, sid, v in rows for i, x in enumerate(v)])
    scores = item_scores(items)
    acc = accuracy_table(results, scores, ["acc"], settings).set_index("settings")
    assert acc.baseline_settings["humming"] == "plain" and acc.value_bf16["humming"] == 0.5
    assert acc.delta_pct["humming"] == pytest.approx(-10.0) and acc.paired_items["humming"] == 200
    assert np.isnan(acc.value_bf16["orphan"]) and acc.paired_items["orphan"] == 0
    rec = recovery_table(acc.reset_index(), scores).set_index("settings")
    assert list(rec.index) == ["humming"] and rec.recovery_pct["humming"] == pytest.approx(90.0)
    # without the settings records no row is a variant: each pairs only within its own settings, as before
    assert accuracy_table(results, scores, ["acc"]).set_index("settings").value_bf16.isna().tolist() == [False, True, True]


def test_mean_recovery_averages_tasks_and_resamples_each_tasks_items():
    from moeq.evaluate.report.verdicts import paired_mean_recovery
    same = np.array([1, 0, 1, 1] * 50, float)
    base_b = np.array([1, 0] * 100, float)
    worse_b = base_b.copy()
    worse_b[:20] = 0  # 10 of base's 100 correct items lost: 90% of bf16 on this task
    point, lo, hi = paired_mean_recovery([(same, same), (worse_b, base_b)])
    assert point == 95.0 and lo < 95.0 < hi and hi <= 100.0
    assert paired_mean_recovery([(same, same)]) == (100.0, 100.0, 100.0)
    assert all(np.isnan(paired_mean_recovery([])))


def test_published_anchors_are_consistent_and_name_moeq_schemes():
    from moeq import schemes
    from moeq.evaluate.report.build import anchors_table
    anchors, outliers, notes = anchors_table()
    assert len(anchors) >= 5 and notes["dense_source"].startswith("https://")
    for a in anchors.itertuples():
        assert a.source.startswith("https://") and a.quote, a.card
        assert abs(a.recovery_pct - 100 * a.quantized / a.baseline) < 0.06, a.card  # the card's own arithmetic
        schemes.scheme_format(a.moeq_scheme)  # a recipe moeq has
    assert len(outliers) >= 4
    for o in outliers.itertuples():
        assert o.source.startswith("https://") and o.quote and o.quantity and o.value, o.model


def test_each_build_of_a_model_is_a_group_of_its_own():
    from moeq.evaluate.ledger import build_of
    from moeq.evaluate.report.build import label_builds
    from moeq.evaluate.report.page import several_builds_text
    key = dict(model="moe-500m", provenance="real", backend="vllm-cuda", device="H200", settings="s")
    rows = [  # session 7's build (oldbuild1), then session 9's (newbuild): bf16 accuracy rescored, fp8-online not
        ("moe-500m", "bf16", "b1", "oldbuild1", "t1"), ("moe-500m", "bf16", "moeq_xl", "newbuild", "t3"),
        ("moe-500m", "fp8-online", "moeq_xl", "oldbuild1+vllm:fp8", "t2"),
        ("moe-500m", "fp8", "moeq_xl", "q2+from:newbuild", "t4"),
        ("moe-500m", "w8a16", "moeq_xl", "q1", "t2"),  # q1: written before builds were said
        # pruned from the new build (session 15), and that pruned model quantized
        ("moe-500m-keep50", "bf16", "moeq_xl", "p50+from:newbuild", "t5"),
        ("moe-500m-keep50", "fp8", "moeq_xl", "q3+from:p50", "t6"),
    ]
    results = pd.DataFrame([key | dict(model=m, scheme=s, kind="x", cell=c, metric="m", value=1.0, checkpoint=k,
                                       created=t, build=build_of("real", k)) for m, s, c, k, t in rows])
    tiny = pd.DataFrame([key | dict(model="tiny", scheme="bf16", kind="x", cell="b1", metric="m", value=1.0,
                                    checkpoint="tinybuild", created="t1", build="tinybuild")])
    results = pd.concat([results, tiny], ignore_index=True)
    items = pd.DataFrame([dict(key, model=m) | dict(scheme=s, task=c, metric="m", item=0, value=1.0, build=b)
                          for m, s, c, b in zip(results.model, results.scheme, results.cell, results.build)])
    labelled, labelled_items, measured = label_builds(results, items)
    prov = dict(zip(zip(labelled.model, labelled.scheme, labelled.cell), labelled.provenance))
    old, new = "real · build oldbuild", "real · build newbuild"
    assert prov == {("moe-500m", "bf16", "b1"): old, ("moe-500m", "fp8-online", "moeq_xl"): old,
                    ("moe-500m", "bf16", "moeq_xl"): new, ("moe-500m", "fp8", "moeq_xl"): new,
                    ("moe-500m", "w8a16", "moeq_xl"): new,  # says no build: its group's newest bf16
                    ("moe-500m-keep50", "bf16", "moeq_xl"): new,  # the build it was pruned from
                    ("moe-500m-keep50", "fp8", "moeq_xl"): new,
                    ("tiny", "bf16", "b1"): "real"}  # one build: its provenance as it was
    assert sorted(zip(labelled_items.model, labelled_items.scheme, labelled_items.provenance)) == sorted(
        (m, s, prov[(m, s, c)]) for m, s, c in zip(results.model, results.scheme, results.cell))
    assert sorted(measured.provenance) == [new, new, old] and list(measured.sort_values("first").rows) == [2, 3, 2]
    assert "real · build oldbuild (2 rows" in several_builds_text(measured)
    # one build only: nothing relabelled
    one = results[results.checkpoint.isin(["tinybuild"])]
    assert label_builds(one, items)[2].empty
    # two builds' rows of one cell (schema 3 keeps both): each keeps its own per-item scores
    both = pd.concat([results.iloc[[1]], results.iloc[[1]].assign(checkpoint="oldbuild1", build="oldbuild1",
                                                                  created="t0")], ignore_index=True)
    both_items = pd.concat([items.iloc[[1]], items.iloc[[1]].assign(build="oldbuild1", value=0.0)], ignore_index=True)
    got = label_builds(both, both_items)[1]
    assert dict(zip(got.provenance, got.value)) == {new: 1.0, old: 0.0}


def test_accuracy_rows_say_when_experts_ran_on_16_bit_activations():
    """Session 9: vLLM 0.26 ran moe-500m's W8A8-INT8 experts as int8_w8a16, so its accuracy row measures weight
    rounding only; the accuracy table says so from the kernel its engine logged (FP8's row stays unmarked)."""
    from moeq.evaluate.report.build import KEY, with_experts_a16
    from moeq.evaluate.report.tables import accuracy_display
    key = dict(model="moe-500m", provenance="real", backend="vllm-cuda", device="H200", settings="s")
    log = "Using default MoE config. Config file not found at /c/E=16,N=1536,device_name=NVIDIA_H200,dtype={}.json"
    w8a8 = json.dumps({"format": {"weight_bits": 8, "activation_bits": 8}})
    results = pd.DataFrame([key | dict(scheme=s, kind=k, cell=c, metric=m, note=n) for s, k, c, m, n in [
        ("w8a8-int8", "engine", "kernel", "vllm_log", log.format("int8_w8a16")),
        ("fp8", "engine", "kernel", "vllm_log", log.format("fp8_w8a8")),
        ("w8a8-int8", "model", "config", "config", w8a8), ("fp8", "model", "config", "config", w8a8)]])
    assert set(KEY) <= set(results.columns)
    acc = pd.DataFrame([key | dict(scheme=s, task="moeq_mc4_xl", metric="acc", primary=True, value=0.87, stderr=0.004,
                                   n=5996, delta_pct=-0.1, delta_lo=-0.3, delta_hi=0.1, paired_items=5996, note=np.nan)
                        for s in ("bf16", "fp8", "w8a8-int8")])
    notes = dict(zip(acc.scheme, accuracy_display(with_experts_a16(acc, results)).Note))
    assert notes["w8a8-int8"].startswith("experts ran on 16-bit activations (vLLM's int8_w8a16)")
    assert notes["fp8"] == "" and notes["bf16"] == ""


def test_a_model_built_twice_names_each_builders_record():
    from moeq.evaluate.report.page import builds_text
    rec = dict(params=4.9e8, active_params=8.2e7, train_tokens_seen=2e8, epochs=2.0, train_tokens_unique=1e8,
               train_s=450.0, device="NVIDIA H200", tokens_per_s=4.6e5, mfu=0.23, min_expert_share_of_fair=0.18)
    builds = pd.DataFrame([rec | {"model": "moe-500m", "file": "moe-500m.build.json"},
                           rec | {"model": "moe-500m", "file": "moe-500m-307add14.build.json", "train_s": 462.0,
                                  "mfu": 0.224},
                           rec | {"model": "other", "file": "other.build.json"},
                           {"model": "tiny", "file": "tiny.build.json", "params": 3.9e6}])  # built on a CPU: no speed
    text = builds_text(builds)
    assert text.startswith("Trained by moeq") and "tiny" not in text
    assert ("moe-500m (2 builds: `moe-500m`, `moe-500m-307add14`): 490.0M parameters (82.0M "
            "active)") in text
    assert "in 450-462 s on NVIDIA H200 (460,000 tok/s, MFU 22.4-23.0%)" in text and "; other: 490.0M" in text


def test_caveats_every_recommendation_shares_are_said_once():
    from moeq.evaluate.report import tables
    rec = pd.DataFrame({"use": ["throughput", "latency", "throughput"],
                        "caveats": ["routing: uniform_random | kernels: A", "x", "kernels: B | routing: uniform_random"]})
    assert tables.shared_caveats(rec) == ["routing: uniform_random"]
    assert tables.shared_caveats(rec.iloc[:1]) == []  # one group: nothing to factor out


def test_a_scheme_slower_than_bf16_is_placed_in_the_phase_that_took_the_time():
    """Session 19's shape: Mixtral w8a16 at b512 (TTFT p99 14.0 s against 7.2, ITL p50 71.7 ms against 53.1)
    loses mostly in prefill; a batch-1 loss with the same TTFT is in decoding; a scheme under 10% is not listed."""
    from moeq.evaluate.report import slower
    key = dict(model="mixtral", provenance="shape-only", backend="vllm-cuda", device="NVIDIA H200", settings="s")
    row = lambda scheme, cell, batch, delta, lat, ttft, itl: key | dict(
        scheme=scheme, cell=cell, batch=batch, delta_pct=delta, latency=lat, ttft_p99=ttft, itl_p50=itl,
        moe_kernel="MARLIN" if scheme == "w8a16" else "TRITON")
    perf = pd.DataFrame([row("bf16", "b512", 512, 0.0, 21.6, 7.2, 0.0531), row("w8a16", "b512", 512, -36.6, 34.0, 14.0, 0.0717),
                         row("fp8", "b512", 512, 81.5, 11.9, 4.1, 0.0345),
                         row("bf16", "b1", 1, 0.0, 1.04, 0.04, 0.0079), row("w8a16", "b1", 1, -20.0, 1.30, 0.04, 0.0099),
                         row("w4a16", "b1", 1, -5.0, 1.09, 0.04, 0.0083)])
    slow = slower.table(perf).set_index(["scheme", "batch"])
    assert sorted(slow.index) == [("w8a16", 1), ("w8a16", 512)]
    assert slow.loc[("w8a16", 512), "prefill_share"] == pytest.approx(6.8 / 12.4) and slow.loc[("w8a16", 512), "phase"] == "prefill"
    assert slow.loc[("w8a16", 1), "prefill_share"] == 0 and slow.loc[("w8a16", 1), "phase"] == "decode"
    assert slow.loc[("w8a16", 512), "ttft_x"] == pytest.approx(14.0 / 7.2)
    text = slower.summary(slower.table(perf))
    assert text == ("Of 2 cells more than 10% under bf16, 1 in decode (batch 1-1: TTFT p99 ×1.00-1.00, ITL p50 ×1.25-1.25; "
                    "w8a16), 1 in prefill (batch 512-512: TTFT p99 ×1.94-1.94, ITL p50 ×1.35-1.35; w8a16).")
    assert slower.summary(slower.table(perf[perf.scheme != "w8a16"])).startswith("No cell")


def test_a_batch_the_kv_cache_cannot_hold_at_once_says_how_many_it_held():
    """Session 25: Qwen3-235B-A22B w4a16-gptq on one H200 had 42,320 tokens of KV, so b128 of 640-token
    sequences ran in waves (TTFT p99 16 s, below b64's throughput): the table says so beside the bound."""
    from moeq.evaluate.report.build import kv_sequences
    from moeq.evaluate.report.tables import perf_display
    row = lambda b: SimpleNamespace(batch=float(b), input_len=512.0, output_len=128.0)
    assert kv_sequences(row(128), 42_320) == 66
    assert np.isnan(kv_sequences(row(64), 42_320)) and np.isnan(kv_sequences(row(128), np.nan))
    perf = pd.DataFrame({"scheme": ["w4a16-gptq"] * 2, "cell": ["b64-i512-o128", "b128-i512-o128"],
                         "batch": [64.0, 128.0], "decode_bound": ["memory"] * 2, "kv_sequences": [np.nan, 66.0]})
    for col in ("n", "engine_starts", "throughput", "spread", "delta_pct", "delta_lo", "delta_hi", "gpus",
                "throughput_per_gpu", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99", "itl_mean", "itl_request_p99",
                "moe_kernel", "moe_dtype", "moe_config", "moe_quant", "throughput_ceiling", "roofline",
                "pct_of_ceiling", "pct_of_balanced", "itl_x_floor"):
        perf[col] = np.nan
    perf["flag"] = pd.Series([None] * 2, dtype=object)
    shown = perf_display(perf).set_index("Cell")["Decode bound"]
    assert shown["b64-i512-o128"] == "memory"
    assert shown["b128-i512-o128"] == "memory; KV cache holds 66 of 128 at once"


def test_bf16_across_builds_is_read_at_the_settings_most_builds_share():
    from moeq.evaluate.report.build import bf16_by_build
    from moeq.evaluate.report.page import several_builds_text
    old, new, third = (f"real · build {b}" for b in ("aaaa", "bbbb", "cccc"))
    measured = pd.DataFrame({"model": "m", "build": ["a", "b", "c"], "provenance": [old, new, third],
                             "rows": 4, "first": "2026-12-01", "last": "2026-12-01"})
    row = lambda prov, settings, value, scheme="bf16", primary=True, task="mc": dict(
        model="m", scheme=scheme, provenance=prov, settings=settings, task=task, metric="acc_norm", value=value,
        stderr=0.004, primary=primary)
    acc = pd.DataFrame([row(old, "s1", 0.877), row(new, "s1", 0.8846), row(third, "s1", 0.866),
                        row(old, "topk4", 0.70), row(new, "topk4", 0.71),  # a variant's settings: fewer builds
                        row(new, "s1", 0.80, scheme="fp8"),  # not bf16
                        row(new, "s1", 0.10, primary=False, task="other")])  # not the claim metric
    got = bf16_by_build(acc, measured)
    assert sorted(got.value) == [0.866, 0.877, 0.8846] and set(got.settings) == {"s1"}
    text = several_builds_text(measured, got)
    assert "m (3 builds, settings s1): mc acc_norm 86.6-88.5% (stderr up to 0.4 points)" in text
    assert bf16_by_build(acc, measured.iloc[:0]).empty and "retraining" not in several_builds_text(measured)
