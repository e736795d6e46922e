"""Issue 12's claims without a ledger: every claim of the guide has an entry; variants of one model are
paired only with the group that differs on the claim's axis; a batch sweep's recommended batch; the
pruning selection; the guide's use_v2_block_manager answer re-checked against the installed vLLM."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from moeq import pruned
from moeq.errors import UserError
from moeq.evaluate import kernels
from moeq.evaluate.report import compare, family, verdicts
from moeq.quantize import prune

GUIDE = {  # the issue's eight claims -> the entries that carry them
    "active experts": ["active-single-expert", "topk1-vs-top2", "topk3-throughput", "topk3-quality"],
    "expert count": [f"experts-{n}-{q}" for n in (16, 32, 64, 128) for q in ("throughput", "memory")]
    + ["experts-8-32-optimal"],
    "ffn width": ["ffn-4096-vs-2048", "ffn-8192-vs-4096"],
    "pruning": ["prune50-throughput", "prune50-accuracy", "prune75-throughput", "prune75-accuracy"],
    "batch size": ["batch-mixtral", "batch-mixtral-slo", "batch-small-moe", "batch-small-moe-slo",
                   "batch-large-moe", "batch-large-moe-slo"],
    "speculative decoding": ["spec-speedup", "spec-draft-size"],
    "fused kernels": ["fused-v2-block-manager", "fused-kernel-throughput", "fused-kernel-vs-grouped-gemm"],
    "single gpu": ["mixtral-fp16-48gb", "mixtral-int8-24gb", "mixtral-min-gpu-fp16", "mixtral-min-gpu-int8",
                   "mixtral-awq-fits", "mixtral-min-gpu-int4"],
}


def test_every_claim_of_the_guide_has_an_entry():
    claims = {c["id"]: c for c in verdicts.load_claims()["claims"]}
    for topic, ids in GUIDE.items():
        assert set(ids) <= set(claims), f"{topic}: missing {set(ids) - set(claims)}"
    for c in claims.values():
        if compare.kind(c) == "planned":  # nothing in a ledger measures it yet: it says what would
            assert c.get("plan") or c.get("not_testable"), c["id"]


def test_a_malformed_other_claim_is_refused(tmp_path):
    bad = tmp_path / "claims.yaml"
    bad.write_text("claims:\n  - {id: x, text: t, quantity: throughput, compare: {axis: colour, variant: 1, "
                   "reference: 2}, bound: {min: 1}}\n")
    with pytest.raises(UserError, match="axis"):
        verdicts.load_claims(bad)


def test_use_v2_block_manager_answer_is_what_vllm_says():
    """The claim records vLLM's answer; if a vLLM ever accepts the flag again, this fails and the claim
    must be measured instead of marked not testable."""
    pytest.importorskip("vllm")
    from moeq.evaluate import settings
    claim = next(c for c in verdicts.load_claims()["claims"] if c["id"] == "fused-v2-block-manager")
    with pytest.raises(UserError) as e:
        settings.check_engine_args({"use_v2_block_manager": True})
    assert str(e.value).split(";")[0] in claim["not_testable"]["measured"]
    from vllm.engine.arg_utils import EngineArgs
    with pytest.raises(TypeError) as e:
        EngineArgs(model="x", use_v2_block_manager=True)
    assert str(e.value) in claim["not_testable"]["measured"]


def test_quantization_awq_answer_is_what_vllm_says(tmp_path):
    """The guide's quantization="awq" on a compressed-tensors checkpoint (moeq's AWQ output): vLLM refuses it
    while validating the config, before any weight or device is touched, so the CPU build's answer is the
    GPU build's; if a vLLM ever accepts it, this fails and the claim must be measured instead."""
    pytest.importorskip("vllm")
    from moeq import registry
    from vllm.engine.arg_utils import EngineArgs
    claim = next(c for c in verdicts.load_claims()["claims"] if c["id"] == "mixtral-awq-fits")
    config = dict(registry.registry()["tiny"]["config"], architectures=["MixtralForCausalLM"],
                  quantization_config={"quant_method": "compressed-tensors"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception) as e:
        EngineArgs(model=str(tmp_path), quantization="awq", gpu_memory_utilization=0.95, max_num_seqs=32,
                   load_format="dummy", skip_tokenizer_init=True).create_engine_config()
    said = "Quantization method specified in the model config (compressed-tensors) does not match the quantization " \
           "method specified in the `quantization` argument (awq)."
    assert said in str(e.value) and said in claim["not_testable"]["measured"]


def test_pruned_names_round_trip():
    assert pruned.name("tiny", 0.5) == "tiny-keep50" and pruned.parse("tiny-keep50") == ("tiny", 0.5)
    assert pruned.parse("tiny") == ("tiny", 1.0) and pruned.parse("a-keep100") == ("a-keep100", 1.0)


def test_coordinates_of_variants():
    top1 = compare.coordinates("tiny", {"llm": {"hf_overrides": {"num_experts_per_tok": 1}}, "routing": "model"})
    plain = compare.coordinates("tiny", {"llm": {}, "routing": "model"})
    assert (top1["top_k"], top1["top_k_given"], plain["top_k"], plain["top_k_given"]) == (1, True, 2, False)
    assert top1["rest"] == plain["rest"]  # they differ only on the axis, so they pair
    half = compare.coordinates("tiny-keep50", {"llm": {}, "routing": "model"})
    assert (half["base"], half["num_experts"], half["keep"]) == ("tiny", 4, 0.5)
    shape = compare.coordinates("mixtral", {"llm": {"hf_overrides": {"num_local_experts": 4}}, "routing": "x"})
    assert (shape["num_experts"], shape["keep"], shape["ffn_width"]) == (4, 0.5, 14336)
    qwen = compare.coordinates("qwen3moe", {"llm": {}})
    assert (qwen["top_k"], qwen["num_experts"], qwen["ffn_width"]) == (8, 128, 768)


def _frames(variants):
    """keys/perf/items/acc/mem/settings for tiny with the given {settings id: hf_overrides}."""
    keys, perf, items, acc, mem, settings = [], [], [], [], [], {}
    for i, (sid, over) in enumerate(variants.items()):
        g = {"model": "tiny", "provenance": "real", "backend": "vllm-cuda", "device": "NVIDIA H200", "settings": sid,
             "scheme": "bf16"}
        settings[sid] = {"llm": {"hf_overrides": over} if over else {}, "routing": "model"}
        keys.append(g)
        for b, rate in ((1, 100.0), (16, 1000.0), (64, 2000.0)):
            speed = rate * (1 + 0.6 * (over.get("num_experts_per_tok") == 1))
            perf.append(g | {"cell": f"b{b}-i512-o128", "batch": b, "input_len": 512, "output_len": 128,
                             "throughput": speed, "repeats": json.dumps([speed * 0.99, speed, speed * 1.01]),
                             "flag": None, "roofline": "NVIDIA H200", "itl_p99": 0.01 * b})
        scores = np.r_[np.ones(80), np.zeros(20)] if not over else np.r_[np.ones(70), np.zeros(30)]
        items += [g | {"task": "moeq_mc4", "metric": "acc", "item": j, "value": v} for j, v in enumerate(scores)]
        acc.append(g | {"task": "moeq_mc4", "metric": "acc", "value": scores.mean(), "primary": True})
        mem.append(g | {"weights_bytes": 1e9})
    return (pd.DataFrame(keys), pd.DataFrame(perf), pd.DataFrame(items), pd.DataFrame(acc), pd.DataFrame(mem),
            settings)


def test_topk_variant_is_compared_with_its_native_group_only():
    keys, perf, items, acc, mem, settings = _frames({"base": {}, "k1": {"num_experts_per_tok": 1},
                                                     "other": {"num_experts_per_tok": 1, "rope_theta": 1.0}})
    claims = {"claims": [c for c in verdicts.load_claims()["claims"] if c["id"] in ("active-single-expert", "spec-speedup")]}
    v = compare.comparison_table(claims, keys, perf, items, acc, mem, settings, {})
    rows = v[v.claim == "active-single-expert"]
    assert set(rows.settings) == {"k1"}  # "other" differs beyond the axis: no reference to pair it with
    assert np.allclose(rows.value, 60.0) and set(rows.verdict) == {verdicts.HOLDS}
    assert (rows.reference.str.startswith("tiny · settings base")).all()
    spec = v[v.claim == "spec-speedup"]
    assert list(spec.verdict) == [verdicts.NOT_MEASURED] and "plan-spec.yaml" in spec.note.iloc[0]


def test_accuracy_of_a_variant_is_paired_by_item():
    keys, perf, items, acc, mem, settings = _frames({"base": {}, "k3": {"num_experts_per_tok": 3}})
    claims = {"claims": [c for c in verdicts.load_claims()["claims"] if c["id"] == "topk3-quality"]}
    v = compare.comparison_table(claims, keys, perf, items, acc, mem, settings, {})
    r = v.iloc[0]
    assert r.cell == "moeq_mc4" and r.value == pytest.approx(12.5)  # 1 - 0.70 / 0.80
    assert r.lo <= r.value <= r.hi and r.verdict == verdicts.FAILS  # higher quality claimed: loss <= 0


def test_speed_without_a_roofline_gets_no_verdict():
    keys, perf, items, acc, mem, settings = _frames({"base": {}, "k1": {"num_experts_per_tok": 1}})
    perf["roofline"] = "no roofline: no peak rates for this device in devices.yaml"
    claims = {"claims": [c for c in verdicts.load_claims()["claims"] if c["id"] == "topk1-vs-top2"]}
    v = compare.comparison_table(claims, keys, perf, items, acc, mem, settings, {})
    assert set(v.verdict) == {verdicts.FLAGGED} and np.allclose(v.value, 60.0)


def test_recommended_batch_and_its_open_end():
    sweep = pd.DataFrame({"batch": [1.0, 16, 64, 128], "throughput": [100.0, 1000, 1900, 2000],
                          "repeats": [json.dumps([x] * 3) for x in (100.0, 1000, 1900, 2000)],
                          "itl_p99": [0.01, 0.02, 0.04, 0.08]})
    point, lo, hi, _ = compare.recommended_batch(sweep, {"share": 0.9})
    assert (point, lo, hi) == (64, 64, 64)
    assert compare.within(point, lo, hi, {"within": [64, 128]}) == verdicts.HOLDS
    assert compare.within(point, lo, hi, {"within": [128, 256]}) == verdicts.FAILS
    point, lo, hi, note = compare.recommended_batch(sweep, {"itl_p99_ms": 50})
    assert (point, hi) == (64, 64)
    rising = sweep.assign(repeats=[json.dumps([x] * 3) for x in (100.0, 1000, 1500, 2000)])
    point, lo, hi, note = compare.recommended_batch(rising, {"share": 0.9})
    assert point == 128 and hi == np.inf and "it is the largest batch measured (128)" in note and "must go further" in note
    assert compare.within(point, lo, hi, {"within": [64, 128]}) == verdicts.INCONCLUSIVE
    # a sweep to 512 whose interval reaches its end: said of the interval, and no further sweep is asked for
    to512 = pd.DataFrame({"batch": [1.0, 64, 256, 512], "throughput": [100.0, 1000, 1900, 2000],
                          "repeats": [json.dumps(r) for r in ([100.0] * 3, [1000.0] * 3, [1800.0, 1900, 2000], [1900.0, 2000, 2300])]})
    point, lo, hi, note = compare.recommended_batch(to512, {"share": 0.9})
    assert (point, hi) == (256, np.inf) and "its interval reaches the largest batch measured (512)" in note
    assert "must go further" not in note


def test_prune_keeps_the_most_routed_experts_per_layer():
    routed = {"model.layers.0.mlp.gate": [5, 50, 7, 40], "model.layers.1.mlp.gate": [9, 9, 30, 1]}
    assert prune.select(routed, 2) == {"model.layers.0.mlp.gate": [1, 3], "model.layers.1.mlp.gate": [0, 2]}
    assert prune.kept_count(8, 0.5, 2) == 4 and prune.kept_count(128, 0.25, 8) == 32
    with pytest.raises(UserError, match="fewer than the 2"):
        prune.kept_count(8, 0.125, 2)
    with pytest.raises(UserError, match="between 0 and 1"):
        prune.kept_count(8, 1.0, 2)


def test_prune_slices_experts_and_router_rows():
    E, tensors = 4, {"model.layers.0.block_sparse_moe.gate.weight": torch.arange(4.0)[:, None].repeat(1, 3),
                     "model.layers.0.self_attn.q_proj.weight": torch.ones(3, 3),
                     "model.layers.0.mlp.experts.gate_up_proj": torch.arange(4.0)[:, None, None].repeat(1, 2, 3)}
    for e in range(E):
        tensors[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"] = torch.full((2, 3), float(e))
    out = prune.slice_tensors(tensors, prune.by_layer({"model.layers.0.mlp.gate": [1, 3]}), E)
    assert out["model.layers.0.block_sparse_moe.gate.weight"][:, 0].tolist() == [1.0, 3.0]
    assert out["model.layers.0.block_sparse_moe.experts.0.w1.weight"][0, 0] == 1.0
    assert out["model.layers.0.block_sparse_moe.experts.1.w1.weight"][0, 0] == 3.0
    assert "model.layers.0.block_sparse_moe.experts.2.w1.weight" not in out
    assert out["model.layers.0.mlp.experts.gate_up_proj"][:, 0, 0].tolist() == [1.0, 3.0]
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight"], torch.ones(3, 3))
    with pytest.raises(UserError, match="layer the routing was not counted"):
        prune.slice_tensors({"model.layers.5.mlp.experts.0.w1.weight": torch.ones(1)}, {0: [0]}, E)


def test_issue12_plans_are_runnable_data():
    """Every plan a claim names parses as a sweep plan; each variant is its own settings group, apart from
    the reference rows' (plan.yaml's settings, which plan-batch.yaml shares so cells measured are skipped)."""
    import re
    from pathlib import Path
    import yaml
    from moeq.evaluate import settings, sweep
    root = Path(__file__).resolve().parents[2]
    named = {m for c in verdicts.load_claims()["claims"] for m in re.findall(r"reports/h200/[\w.-]+", str(c.get("plan", "")))}
    assert named and all((root / n).is_file() for n in named), sorted(n for n in named if not (root / n).is_file())

    def profile(plan, extra):  # real-weight plans (speculative decoding) run with their own prompts
        return settings.build(gpu=True, cells=[tuple(c) for c in plan["cells"]],
                              shape_only=plan.get("weights", "dummy") == "dummy",
                              user_args={**(plan.get("engine_args") or {}), **extra}, routing=plan.get("routing"),
                              warmup_tokens=plan.get("warmup_tokens"), prompts=plan.get("prompts")).profile
    base = yaml.safe_load((root / "reports/h200/plan.yaml").read_text())
    reference = profile(base, {})
    seen = {(m, reference) for m in base["models"]}  # a settings id is per model: pairs are (model, settings)
    for name in sorted(n for n in named if n.endswith(".yaml")):
        plan = yaml.safe_load((root / name).read_text())
        assert set(plan) <= sweep.PLAN_KEYS, name
        if name.endswith("plan-batch.yaml"):
            assert profile(plan, {}) == reference
            continue
        for variant, extra in (plan.get("variants") or {"": {}}).items():
            p = profile(plan, extra)
            for m in plan["models"]:
                assert (m, p) not in seen, (name, variant, m)
                seen.add((m, p))


def test_two_settings_of_a_rebuilt_model_are_no_pair():
    keys, perf, items, acc, mem, settings = _frames({"base": {}, "k1": {"num_experts_per_tok": 1}})
    claims = {"claims": [c for c in verdicts.load_claims()["claims"] if c["id"] == "topk1-vs-top2"]}
    key = lambda sid: ("tiny", "bf16", "real", "vllm-cuda", "NVIDIA H200", sid)
    same = compare.comparison_table(claims, keys, perf, items, acc, mem, settings, {}, {key("base"): {"a"}, key("k1"): {"a"}})
    rebuilt = compare.comparison_table(claims, keys, perf, items, acc, mem, settings, {}, {key("base"): {"a"}, key("k1"): {"b"}})
    assert set(same.verdict) == {verdicts.HOLDS} and list(rebuilt.verdict) == [verdicts.NOT_MEASURED]


def test_fit_claim_reads_the_engine_memory_at_its_arguments_only():
    fit = {"kv_cache_memory_bytes": 268435456, "max_num_seqs": 1}
    keys, perf, items, acc, mem, settings = _frames({"defaults": {}, "fit": {}})
    settings["fit"]["llm"] |= fit
    keys = pd.concat([keys, keys.assign(scheme="w8a16")], ignore_index=True)
    mem = pd.concat([mem.assign(peak_memory_bytes=[140e9, 95.75e9], peak_memory_source="nvml"),
                     mem.assign(scheme="w8a16", peak_memory_bytes=[140e9, 50e9], peak_memory_source="nvml")])
    formats = {"bf16": {"weight_type": "float", "weight_bits": 16}, "w8a16": {"weight_type": "int", "weight_bits": 8}}
    claims = {"claims": [dict(c, models=["tiny"]) for c in verdicts.load_claims()["claims"]
                         if c["id"] in ("mixtral-min-gpu-fp16", "mixtral-min-gpu-int8")]}
    v = compare.comparison_table(claims, keys, perf, items, acc, mem, settings, {}, formats=formats).set_index("claim")
    fp16, int8 = v.loc["mixtral-min-gpu-fp16"], v.loc["mixtral-min-gpu-int8"]
    # the defaults' engine (KV filling the GPU) says nothing about the smallest GPU: only the fit settings count
    assert (fp16.settings, fp16.scheme, fp16.value, fp16.verdict) == ("fit", "bf16", 95.75, verdicts.FAILS)
    assert (int8.scheme, int8.value, int8.verdict) == ("w8a16", 50.0, verdicts.FAILS)
    assert "kv_cache_memory_bytes=268,435,456" in fp16.note and "weights 1.0 GB" in fp16.note
    bad = dict(claims["claims"][0], fit={})
    with pytest.raises(UserError, match="fit needs"):
        verdicts.check_other_claim(bad, "claims.yaml")


def test_a_variant_on_another_moe_config_says_so():
    keys, perf, items, acc, mem, settings = _frames({"base": {}, "k1": {"num_experts_per_tok": 1}})
    perf["moe_kernel"] = "TRITON, TritonExperts"
    perf["moe_config"] = np.where(perf.settings == "k1", "default (no tuned Triton config for this shape and device)",
                                  "tuned: E=8,N=14336,device_name=NVIDIA_H200.json")
    claims = {"claims": [c for c in verdicts.load_claims()["claims"] if c["id"] == "topk1-vs-top2"]}
    v = compare.comparison_table(claims, keys, perf, items, acc, mem, settings, {})
    assert set(v.verdict) == {verdicts.HOLDS}  # said beside the number, not a reason to withhold it
    assert v.note.str.contains("MoE Triton configs differ: default").all()
    # a config supplied through VLLM_TUNED_CONFIG_FOLDER (a tuned file lent to a pruned shape) is not vLLM's own
    perf["moe_config"] = np.where(perf.settings == "k1", f"{kernels.SUPPLIED}: E=4,N=14336,device_name=NVIDIA_H200.json",
                                  "tuned: E=8,N=14336,device_name=NVIDIA_H200.json")
    v = compare.comparison_table(claims, keys, perf, items, acc, mem, settings, {})
    assert v.note.str.contains("MoE Triton configs differ: supplied (VLLM_TUNED_CONFIG_FOLDER): E=4", regex=False).all()
    perf["moe_config"] = "not logged"  # nothing known on either side: nothing said
    assert compare.comparison_table(claims, keys, perf, items, acc, mem, settings, {}).note.isna().all()


def test_a_reference_timed_on_another_host_says_so():
    keys, perf, items, acc, mem, settings = _frames({"base": {}, "k1": {"num_experts_per_tok": 1}})
    perf["host"] = np.where(perf.settings == "k1", "Linux-6.18.44-fc-v973-gpu-x86_64", "Linux-6.18.44-fc-v657-gpu-x86_64")
    perf["host_cpu"] = np.where(perf.settings == "k1", "Intel(R) Xeon(R) Processor x16", "")  # not recorded then
    claims = {"claims": [c for c in verdicts.load_claims()["claims"] if c["id"] == "topk1-vs-top2"]}
    notes = compare.comparison_table(claims, keys, perf, items, acc, mem, settings, {}).note
    assert notes.eq("timed on different hosts: Linux-6.18.44-fc-v973-gpu-x86_64 vs Linux-6.18.44-fc-v657-gpu-x86_64").all()
    perf["host"] = "Linux-6.18.44-fc-v657-gpu-x86_64"  # one kernel build; a CPU on one side only is no difference
    assert compare.comparison_table(claims, keys, perf, items, acc, mem, settings, {}).note.isna().all()


def test_the_first_screen_leaves_variants_to_the_other_claims():
    from moeq.evaluate.report import headline
    g = lambda model, sid, scheme: {"model": model, "provenance": "shape-only", "backend": "vllm-cuda",
                                    "device": "NVIDIA H200", "settings": sid, "scheme": scheme}
    keys = pd.DataFrame([g("mixtral", "default", "bf16"), g("mixtral", "default", "fp8"), g("mixtral", "top1", "bf16"),
                         g("mixtral", "fit", "bf16"), g("mixtral", "fit", "fp8"), g("mixtral", "legacy-v1", "fp8")])
    settings = {"default": {"llm": {}}, "top1": {"llm": {"hf_overrides": {"num_experts_per_tok": 1}}},
                "fit": {"llm": {"kv_cache_memory_bytes": 268435456, "max_num_seqs": 1}}}
    fits = [c["fit"] for c in verdicts.load_claims()["claims"] if "fit" in c]
    assert [x[-1] for x in headline.headline_groups(keys, settings, fits)] == ["default"]
    assert [x[-1] for x in headline.headline_groups(keys, settings)] == ["default", "fit"]  # no fit claim: a group
    # a ledger of variants alone (the CPU's issue-12 rows, bf16 only) still has a first screen: its plain groups
    only_bf16 = keys[keys.scheme == "bf16"]
    assert [x[-1] for x in headline.headline_groups(only_bf16, settings, fits)] == ["default"]
    # engine experiments (another MoE kernel, its environment, a CUDA-graph size) are not the deployment the answer
    # speaks of: H200 sessions 23-24 put humming's kernel and graphs to 1,024 tokens beside vLLM's defaults
    experiments = {"humming": {"llm": {"moe_backend": "humming"}},
                   "graphs": {"llm": {"compilation_config": {"max_cudagraph_capture_size": 1024}}},
                   "int8-acts": {"llm": {"moe_backend": "humming"},
                                 "kernel_env": {"VLLM_HUMMING_INPUT_QUANT_CONFIG": '{"dtype": "int8"}'}},
                   "deep-gemm-off": {"llm": {}, "kernel_env": {"VLLM_USE_DEEP_GEMM": "0"}},
                   # session 27: bf16's tuned tiles lent to int8_w8a16 (borrow=), one scheme without its bf16
                   "lent-tiles": {"llm": {}, "moe_configs": {"E=8,N=14336,device_name=NVIDIA_H200,dtype=int8_w8a16.json": "082fe3b0c857"}}}
    more = pd.concat([keys, pd.DataFrame([g("mixtral", sid, s) for sid in experiments for s in ("bf16", "fp8")])])
    assert [x[-1] for x in headline.headline_groups(more, {**settings, **experiments}, fits)] == ["default"]


def test_a_variant_pair_says_what_the_roofline_allows():
    keys, perf, items, acc, mem, settings = _frames({"base": {}, "k1": {"num_experts_per_tok": 1}})
    perf["throughput_ceiling"] = np.where(perf.settings == "k1", 1750.0, 1000.0)  # Mixtral b1: top-1 reads ~57%
    claims = {"claims": [c for c in verdicts.load_claims()["claims"] if c["id"] == "topk1-vs-top2"]}
    v = compare.comparison_table(claims, keys, perf, items, acc, mem, settings, {})
    assert v.note.eq("the roofline allows +75%").all() and np.allclose(v.value, 60.0)


def test_batch_claims_speak_of_the_model_as_is_and_values_name_their_pair():
    from moeq.evaluate.report import tables
    keys, perf, items, acc, mem, settings = _frames({"base": {}, "k1": {"num_experts_per_tok": 1}, "fit": {}})
    perf = perf[(perf.settings != "fit") | (perf.batch == 1)]  # a fit engine times one cell: no batch sweep
    settings["fit"] = {"llm": {"max_num_seqs": 1}, "routing": "model"}
    claims = {"claims": [c for c in verdicts.load_claims()["claims"] if c["id"] in ("batch-small-moe", "active-single-expert")]}
    v = compare.comparison_table(claims, keys, perf, items, acc, mem, settings, {})
    assert list(v[v.claim == "batch-small-moe"].settings) == ["base"]  # not the top-1 variant, not the fit engine
    # a pruned checkpoint is a model of its own (4 experts: a smaller MoE), but not the model a claim names
    pruned = lambda df: pd.concat([df, df[df.settings == "base"].assign(model="tiny-keep50")], ignore_index=True)
    small = next(c for c in claims["claims"] if c["id"] == "batch-small-moe")
    for claim, models in ((small, ["tiny", "tiny-keep50"]), (dict(small, models=["tiny"]), ["tiny"])):
        got = compare.comparison_table({"claims": [claim]}, pruned(keys), pruned(perf), pruned(items), pruned(acc),
                                       pruned(mem), settings, {})
        assert sorted(got.model) == models
    shown = tables.other_claims_display(v, claims["claims"]).set_index("Claim").Values
    single = shown[next(c["text"] for c in claims["claims"] if c["id"] == "active-single-expert")]
    assert single.startswith("tiny top_k 1 vs top_k 2: b1 +60.0%") and "b64 +60.0%" in single
    assert shown.str.contains("tiny bf16: ").any()


def test_the_best_expert_count_of_a_family_is_the_most_throughput_per_gb():
    members = {f"e{n}": {"num_local_experts": n} for n in (4, 8, 16)}
    keys, perf, items, acc, mem, settings = _frames(members | {"k1": {"num_experts_per_tok": 1}})
    mem["weights_bytes"] = mem.settings.map({"e4": 1e9, "e8": 2e9, "e16": 4e9, "k1": 1e9})
    claim = next(c for c in verdicts.load_claims()["claims"] if c["id"] == "experts-8-32-optimal")
    v = compare.comparison_table({"claims": [claim]}, keys, perf, items, acc, mem, settings, {})
    assert len(v) == 3 and set(v.value) == {4.0} and set(v.verdict) == {verdicts.FAILS}  # 4 is below 8-32
    assert set(v.settings) == {"e4"} and v.note.str.contains("by num_experts: 4: 100; 8: 50; 16: 25", regex=False).any()
    # twice the throughput for twice the weights plus a little: 8 experts win, with no doubt left by the repeats
    perf.loc[perf.settings == "e8", "throughput"] *= 2.2
    perf.loc[perf.settings == "e8", "repeats"] = [json.dumps([x * 0.99, x, x * 1.01]) for x in perf[perf.settings == "e8"].throughput]
    v = compare.comparison_table({"claims": [claim]}, keys, perf, items, acc, mem, settings, {})
    assert set(v.value) == {8.0} and set(zip(v.lo, v.hi)) == {(8.0, 8.0)} and set(v.verdict) == {verdicts.HOLDS}
    assert family.families(compare._group_table(keys.iloc[:0], {}, {}, {}), claim) == []  # no groups, no family
    # two members are no family
    v = compare.comparison_table({"claims": [claim]}, keys[keys.settings != "e16"], perf, items, acc, mem, settings, {})
    assert list(v.verdict) == [verdicts.NOT_MEASURED]


def test_a_family_value_timed_on_two_triton_configs_makes_two_families():
    """device.sh borrow= runs pruned shapes again on the reference's tuned file: each value once per family."""
    members = {"e2": {"num_local_experts": 2}, "e2s": {"num_local_experts": 2}, "e4": {"num_local_experts": 4},
               "e4s": {"num_local_experts": 4}, "e8": {"num_local_experts": 8}}
    keys, perf, items, acc, mem, settings = _frames(members)
    perf["moe_config"] = perf.settings.map({"e2": "default (no tuned Triton config for this shape and device)",
                                            "e4": "default (no tuned Triton config for this shape and device)",
                                            "e2s": "supplied (VLLM_TUNED_CONFIG_FOLDER): E=2,N=64,device_name=X.json",
                                            "e4s": "supplied (VLLM_TUNED_CONFIG_FOLDER): E=4,N=64,device_name=X.json",
                                            "e8": "tuned: E=8,N=64,device_name=X.json"})
    mem["weights_bytes"] = mem.settings.map({"e2": 1e9, "e2s": 1e9, "e4": 2e9, "e4s": 2e9, "e8": 4e9})
    perf.loc[perf.settings == "e4s", "throughput"] *= 3  # the supplied config makes 4 experts the best
    perf.loc[perf.settings == "e4s", "repeats"] = [json.dumps([x * 0.99, x, x * 1.01]) for x in perf[perf.settings == "e4s"].throughput]
    claim = next(c for c in verdicts.load_claims()["claims"] if c["id"] == "experts-8-32-optimal")
    v = compare.comparison_table({"claims": [claim]}, keys, perf, items, acc, mem, settings, {})
    assert len(v) == 6 and set(v.variant) == {"num_experts family: 2, 4, 8 (default Triton configs)",
                                              "num_experts family: 2, 4, 8 (supplied Triton configs)"}
    best = v.groupby("variant").value.agg(set).to_dict()
    assert best == {"num_experts family: 2, 4, 8 (default Triton configs)": {2.0},
                    "num_experts family: 2, 4, 8 (supplied Triton configs)": {4.0}}
    assert v.note.str.contains("2 supplied, 4 supplied, 8 tuned", regex=False).any()


def test_a_batch_sweep_timed_on_two_hosts_says_which_batches_ran_where():
    one = pd.DataFrame({"batch": [1.0, 16, 64], "host": ["h1"] * 3})
    assert compare._hosts_of_sweep(one) == "" and compare._hosts_of_sweep(one.drop(columns="host")) == ""
    two = pd.DataFrame({"batch": [1.0, 16, 64, 256], "host": ["h1", "h1", "h2", "h2"]})
    assert compare._hosts_of_sweep(two) == ("; its batches were timed on 2 hosts (h1: b1, 16; h2: b64, 256): "
                                            "host-bound small batches may not compare across them")
