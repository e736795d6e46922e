"""Speculative decoding without an engine (issue 12, claim 6): speculative_config is checked with a clear
error, drafts come from the registry and share their target's tokenizer, acceptance is computed from
vLLM's counters, held-out prompts are exact-length windows, the prompt source is its own settings group,
and the report pairs each speculation with the same engine without it."""
import json

import numpy as np
import pandas as pd
import pytest

from moeq import registry
from moeq.errors import UserError
from moeq.evaluate import perf, speculative
from moeq.evaluate.report import compare, verdicts

FIELDS = ["model", "method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"]
METHODS = ["ngram", "draft_model", "eagle"]
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}
DRAFT = {"model": "tiny-draft", "num_speculative_tokens": 3}


@pytest.mark.parametrize("config, message", [
    ("ngram", "expected a mapping"),
    ({**NGRAM, "lookahead": 2}, "unknown key 'lookahead'; valid: method, model"),
    ({"method": "ngrams", "num_speculative_tokens": 4}, "unknown method 'ngrams'; valid: ngram, draft_model"),
    ({"num_speculative_tokens": 4}, "needs a method or a draft model"),
    ({"method": "ngram"}, "num_speculative_tokens None"),
    ({"model": "tiny-drafts", "num_speculative_tokens": 3}, "unknown draft model 'tiny-drafts'; valid: tiny-draft"),
])
def test_bad_speculative_config_names_the_bad_value(config, message):
    with pytest.raises(UserError, match=message):
        speculative.check(config, shape_only=False, fields=FIELDS, methods=METHODS)


def test_good_configs_pass_and_dummy_weights_are_refused():
    for config in (None, NGRAM, DRAFT):
        speculative.check(config, shape_only=False, fields=FIELDS, methods=METHODS)
    with pytest.raises(UserError, match="needs real weights"):
        speculative.check(NGRAM, shape_only=True, fields=FIELDS, methods=METHODS)


def test_the_installed_vllm_knows_the_keys_and_methods_used():
    pytest.importorskip("vllm")
    fields, methods = speculative.vllm_choices()
    assert {"ngram", "draft_model"} <= set(methods) and set(FIELDS) <= set(fields)


def test_drafts_share_their_targets_vocabulary_and_tokenizer():
    from moeq.quantize import tiny
    drafts = speculative.drafts()
    assert drafts == {"tiny-draft": "tiny", "moe-500m-draft": "moe-500m"}
    reg = registry.registry()
    for draft, target in drafts.items():
        assert reg[draft]["train"]["tokenizer_from"] == target
        assert reg[draft]["config"]["vocab_size"] == reg[target]["config"]["vocab_size"]
        assert tiny.tokenizer_source(reg[draft]).name == target
    bad = {**reg["tiny-draft"], "train": {**reg["tiny-draft"]["train"], "tokenizer_from": "mixtral"}}
    with pytest.raises(UserError, match="tokenizer_from 'mixtral' is not a model moeq builds; valid: tiny"):
        tiny.tokenizer_source(bad)
    bad["train"]["tokenizer_from"] = "moe-500m"
    with pytest.raises(UserError, match="vocab_size 16384 differs from the draft's 2048"):
        tiny.tokenizer_source(bad)


def test_labels_name_the_speculation():
    assert speculative.label(None) == "none"
    assert speculative.label(NGRAM) == "ngram num_speculative_tokens=4 prompt_lookup_max=4"
    assert speculative.label(DRAFT) == "draft:tiny-draft num_speculative_tokens=3"


def test_acceptance_from_counter_differences():
    before = {"drafts": 10.0, "draft_tokens": 30.0, "accepted_tokens": 20.0}
    after = {"drafts": 20.0, "draft_tokens": 60.0, "accepted_tokens": 35.0}
    got = speculative.acceptance(before, after)
    assert got["acceptance_rate"] == pytest.approx(15 / 30) and got["acceptance_length"] == pytest.approx(2.5)
    with pytest.raises(RuntimeError, match="counted no speculative drafts"):
        speculative.acceptance(before, before)


def test_heldout_windows_are_exact_distinct_and_seeded():
    stream = list(range(1000))
    a = perf.text_windows(stream, 16, 100, "b16-i100-o8-0")
    assert [len(w) for w in a] == [100] * 16 and len({w[0] for w in a}) == 16
    assert all(w == list(range(w[0], w[0] + 100)) for w in a)  # contiguous text, never padded
    assert a == perf.text_windows(stream, 16, 100, "b16-i100-o8-0") != perf.text_windows(stream, 16, 100, "x")
    with pytest.raises(RuntimeError, match="too few"):
        perf.text_windows(stream[:110], 16, 100, "s")


def test_prompt_source_is_its_own_settings_group():
    pytest.importorskip("vllm")
    from moeq.evaluate import settings
    cells = [(1, 512, 128)]
    plain = settings.build(gpu=False, cells=cells, shape_only=False)
    held = settings.build(gpu=False, cells=cells, shape_only=False, prompts="heldout")
    assert "prompts" not in plain.record() and plain.profile == settings.build(
        gpu=False, cells=cells, shape_only=False, prompts="random").profile  # older rows keep their id
    assert held.profile != plain.profile and held.non_default()["prompts"] == "heldout"
    assert settings.from_record(held.record()).profile == held.profile
    with pytest.raises(UserError, match="unknown prompts 'text'; valid: random, heldout"):
        settings.build(gpu=False, cells=cells, shape_only=False, prompts="text")
    with pytest.raises(UserError, match="no tokenizer"):
        settings.build(gpu=False, cells=cells, shape_only=True, prompts="heldout")
    with pytest.raises(UserError, match="unknown draft model"):
        settings.build(gpu=False, cells=cells, shape_only=False,
                       user_args={"speculative_config": {"model": "nope", "num_speculative_tokens": 3}})


def _spec_frames(speeds: dict, acceptance: dict, device="NVIDIA H200", roofline="NVIDIA H200"):
    keys, perf_rows, settings = [], [], {}
    for sid, config in {"none": None, "ngram": NGRAM, "draft": DRAFT, "random": NGRAM}.items():
        g = {"model": "tiny", "provenance": "real", "backend": "vllm-cuda", "device": device, "settings": sid,
             "scheme": "bf16"}
        settings[sid] = {"llm": {"speculative_config": config} if config else {}, "routing": "model",
                         **({} if sid == "random" else {"prompts": "heldout"})}
        keys.append(g)
        for b in (1, 16):
            s = speeds[sid] * b
            perf_rows.append(g | {"cell": f"b{b}-i512-o128", "batch": b, "input_len": 512, "output_len": 128,
                                  "throughput": s, "repeats": json.dumps([s * 0.99, s, s * 1.01]), "flag": None,
                                  "roofline": roofline, "spec_acceptance_rate": acceptance.get(sid, np.nan),
                                  "spec_acceptance_length": 1 + 3 * acceptance.get(sid, np.nan),
                                  # a plain step 2 ms for one token; a speculative one 4 ms for two
                                  "itl_mean": 0.002 if sid == "none" else 0.004, "ttft": 0.01, "latency": 0.266})
    empty = pd.DataFrame()
    return pd.DataFrame(keys), pd.DataFrame(perf_rows), empty, empty, empty, settings


def test_speedup_pairs_each_speculation_with_the_same_prompts_without_it():
    frames = _spec_frames({"none": 100.0, "ngram": 180.0, "draft": 120.0, "random": 500.0},
                          {"ngram": 0.7, "draft": 0.4, "random": 0.0})
    claims = {"claims": [c for c in verdicts.load_claims()["claims"] if c["id"] == "spec-speedup"]}
    v = compare.comparison_table(claims, *frames, {})
    assert set(v.settings) == {"ngram", "draft"}  # random-prompt rows have no reference under the same prompts
    ngram, draft = v[v.settings == "ngram"], v[v.settings == "draft"]
    assert np.allclose(ngram.value, 1.8) and set(ngram.verdict) == {verdicts.HOLDS}
    assert np.allclose(draft.value, 1.2) and set(draft.verdict) == {verdicts.FAILS}
    assert (ngram.lo <= ngram.value).all() and (ngram.value <= ngram.hi).all()
    assert ngram.note.str.startswith("acceptance 0.700").all() and (ngram.reference.str.contains("speculation none")).all()
    # 64 steps of 4 ms against 128 of 2 ms: two tokens a step at twice the cost gain nothing
    assert ngram.note.str.contains("a decode step took 2.00x a plain one (mean ITL 4.00 vs 2.00 ms) and the batch's "
                                   "decode spanned 64 of them against 128", regex=False).all()
    assert ngram.note.str.contains("decode x1.00, the rest is prefill", regex=False).all()
    # one request at batch 1; at 16 the batch's latency is its slowest request's
    assert list(ngram.note.str.contains("(its slowest request sets it)", regex=False)) == [False, True]


def test_speedup_on_a_device_without_roofline_is_shown_without_verdict():
    frames = _spec_frames({"none": 100.0, "ngram": 180.0, "draft": 120.0, "random": 500.0}, {"ngram": 0.7},
                          device="cpu: AMD EPYC x2", roofline="no roofline: no peak rates for this device")
    claims = {"claims": [c for c in verdicts.load_claims()["claims"] if c["id"] == "spec-speedup"]}
    v = compare.comparison_table(claims, *frames, {})
    assert set(v.verdict) == {verdicts.FLAGGED} and np.allclose(v[v.settings == "ngram"].value, 1.8)


def _bench(device="NVIDIA H200", reduced=False, vllm_runs=(0.8, 0.82, 0.84), not_run=None):
    runs = {"eager": [1.0, 1.02, 1.04], "grouped_mm": [0.9, 0.91, 0.92]}
    if vllm_runs:
        runs["vllm_fused_moe"] = list(vllm_runs)
    results = [{"impl": i, "batch": b, "ms_median": float(np.median(r)), "ms_runs": r}
               for b in (1, 64) for i, r in runs.items()]
    return {"fused_moe.json": {"model": "mixtral", "reduced": reduced, "layers": 4, "device": device, "dtype": "bfloat16",
                               "shape": {"hidden_size": 4096, "intermediate_size": 14336},
                               "libraries": {"torch": "2.13", "vllm": "0.26.0"}, "results": results,
                               "not_run": not_run or {}}}


def test_fused_kernel_claim_reads_the_benchmark_json():
    claims = {"claims": [c for c in verdicts.load_claims()["claims"] if c["id"] == "fused-kernel-throughput"]}
    empty = [pd.DataFrame()] * 4  # perf, items, acc, mem
    v = compare.comparison_table(claims, pd.DataFrame(columns=verdicts.GROUP + ["scheme"]), *empty, {}, {}, {},
                                 _bench())
    assert list(v.cell) == ["b1", "b64"] and np.allclose(v.value, 1.02 / 0.82)  # eager / fused median time
    assert set(v.verdict) == {verdicts.HOLDS} and (v.lo <= v.value).all() and (v.value <= v.hi).all()
    cpu = compare.comparison_table(claims, pd.DataFrame(columns=verdicts.GROUP + ["scheme"]), *empty, {}, {}, {},
                                   _bench(device="cpu: x86_64", reduced=True, vllm_runs=None, not_run={
                                       "vllm_fused_moe": "vLLM's fused_experts is a Triton kernel for GPUs"}))
    assert list(cpu.verdict) == [verdicts.NOT_MEASURED] and "Triton kernel" in cpu.note.iloc[0]
    missing = compare.comparison_table(claims, pd.DataFrame(columns=verdicts.GROUP + ["scheme"]), *empty, {}, {}, {}, {})
    assert list(missing.verdict) == [verdicts.NOT_MEASURED] and "fused_moe.py" in missing.note.iloc[0]
    grouped = {"claims": [c for c in verdicts.load_claims()["claims"] if c["id"] == "fused-kernel-vs-grouped-gemm"]}
    bench = _bench()
    for r in bench["fused_moe.json"]["results"]:
        r |= {"max_rel_err_vs_eager": 0.02, "routing_agreement_vs_eager": 0.75} if r["impl"] == "vllm_fused_moe" else {}
    v = compare.comparison_table(grouped, pd.DataFrame(columns=verdicts.GROUP + ["scheme"]), *empty, {}, {}, {}, bench)
    assert np.allclose(v.value, 0.91 / 0.82) and set(v.reference) == {"grouped_mm"}
    assert v.note.str.contains("max error 2.0% of the largest output, routing 75.0% as eager's", regex=False).all()


def test_each_run_of_a_benchmark_is_a_group_of_its_own():
    """Sessions 14 and 15 ran benchmarks/fused_moe.py on two leases (fused_moe-s14.json, fused_moe-s15.json):
    both runs are shown, each with its own verdict and where it ran; another benchmark's file is not read."""
    claims = {"claims": [c for c in verdicts.load_claims()["claims"] if c["id"] == "fused-kernel-throughput"]}
    empty = [pd.DataFrame()] * 4
    s14, s15 = _bench()["fused_moe.json"], _bench(vllm_runs=(0.5, 0.51, 0.52))["fused_moe.json"]
    s15["host"] = {"name": "fc-v1", "sm_clock_mhz": 1980}
    runs = {"fused_moe-s14.json": s14, "fused_moe-s15.json": s15, "fused_moe_other.json": s15}
    v = compare.comparison_table(claims, pd.DataFrame(columns=verdicts.GROUP + ["scheme"]), *empty, {}, {}, {}, runs)
    assert sorted(set(v.settings)) == ["fused_moe-s14.json", "fused_moe-s15.json"] and len(v) == 4
    later = v[v.settings == "fused_moe-s15.json"]
    assert np.allclose(later.value, 1.02 / 0.51) and later.note.str.contains("ms on fc-v1 (SM clock 1980 MHz)", regex=False).all()


def test_a_benchmark_run_is_set_against_its_memory_floor_and_unsteady_runs_are_named():
    """Session 16: fused b64 ran at 73% of the H200's bandwidth in three runs and eager at b1 far from it
    (host-bound); a run whose times jump (13.5 -> 9.5 ms) is named, not hidden in its median."""
    claims = {"claims": [c for c in verdicts.load_claims()["claims"] if c["id"] == "fused-kernel-throughput"]}
    empty = [pd.DataFrame()] * 4
    run = _bench(vllm_runs=(1.0, 1.01, 1.02))["fused_moe.json"]
    run["shape"] |= {"num_local_experts": 8, "num_experts_per_tok": 2}
    for r in run["results"]:
        r["ms_runs"] = [13.5, 13.4, 9.5] if (r["impl"], r["batch"]) == ("eager", 64) else r["ms_runs"]
        r["ms_median"] = float(np.median(r["ms_runs"]))
        r |= {"experts_hit_per_layer": 2.0} if r["batch"] == 1 and r["impl"] == "vllm_fused_moe" else {}
    v = compare.comparison_table(claims, pd.DataFrame(columns=verdicts.GROUP + ["scheme"]), *empty, {}, {}, {},
                                 {"fused_moe.json": run}).set_index("cell")
    # 4 layers x 2 experts x 3 x 4096 x 14336 x 2 bytes = 2.82 GB at 4,800 GB/s: 0.587 ms, measured routing
    assert "memory floor 0.587 ms (2.00 experts per layer: 2.82 GB at 4,800 GB/s): vllm_fused_moe at 58%" in v.note["b1"]
    assert "(8.00 experts per layer, expected: 11.27 GB" in v.note["b64"]  # no routing recorded: balanced routing's
    assert "runs not steady: eager 9.50-13.50 ms" in v.note["b64"] and "not steady" not in v.note["b1"]
