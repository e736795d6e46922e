"""Routed expert load in the report (issue 9): `moeq routing` probes beside the ledger flag the rows measured
on a degenerate dummy router, and only those."""
import json

from moeq.evaluate import routing
from moeq.evaluate.ledger import Ledger
from moeq.evaluate.perf import summarize
from moeq.evaluate.report import headline, page, routing_load
from moeq.evaluate.report.build import memory_table, perf_table, read_ledger

GROUP = {"provenance": "shape-only", "backend": "vllm-cuda", "device": "NVIDIA H200"}
# as the H200 ledger records them: legacy rows ran on the dummy weights' own routers, the defaults on a simulation
LEGACY = {"llm": {"enable_prefix_caching": False}, "routing": "model", "warmup_tokens": 16,
          "non_default": {"routing": "dummy weights' own routers (shape-only rows; real weights: the model's)"}}
DEFAULTS = {"llm": {}, "routing": "uniform_random", "warmup_tokens": 16, "non_default": {"routing": "uniform_random"}}
DEGENERATE = {"max_over_mean": 10.67, "cv": 3.11, "entropy": 0.43, "min_over_mean": 0.0}  # 6 of 64 experts, always
BALANCED = {"max_over_mean": 1.08, "cv": 0.03, "entropy": 0.9999, "min_over_mean": 0.92}


def probe(model, routing_, median):
    return {"checkpoint": f"/tmp/h200/checkpoints/.shape-only/{model}/bf16", "weights": "dummy",
            "routing": routing_, "num_experts": 64, "tokens": 8192, "layers": 8, "median": median, "per_layer": [median]}


def ledger(tmp_path, probes=None):
    """deepseek and olmoe bf16/fp8 at legacy and default settings; probes written to routing/ when given."""
    led = Ledger(tmp_path / "ledger.sqlite")
    led.add_settings("legacy-v1", LEGACY)
    led.add_settings("defaults", DEFAULTS)
    for model in ("deepseek-v2-lite", "olmoe"):
        for settings in ("legacy-v1", "defaults"):
            for scheme, tput in (("bf16", 1000.0), ("fp8", 1200.0)):
                led.write(GROUP | {"model": model, "scheme": scheme, "settings": settings}, "perf", "b16-i512-o128",
                          [summarize("throughput", "tok/s", [tput, tput + 1, tput - 1])])
    led.close()
    if probes is not None:
        (tmp_path / "routing").mkdir()
        (tmp_path / "routing" / "gpu1.json").write_text(json.dumps(probes))
    results, _, _, settings = read_ledger(tmp_path / "ledger.sqlite")
    found = routing_load.read_probes(tmp_path / "routing")
    return perf_table(results, memory_table(results), settings, found), found, results, settings


def flagged(perf):
    hit = perf[perf.flag.fillna("").str.startswith(routing_load.FLAG_HEAD)]
    return set(zip(hit.model, hit.settings, hit.scheme))


def test_threshold_tells_a_collapsed_router_from_a_spread_one():
    assert routing.degenerate(DEGENERATE) and not routing.degenerate(BALANCED)
    assert routing.degenerate(BALANCED | {"min_over_mean": 0.0})  # an expert no token reaches
    assert routing.degenerate(BALANCED | {"entropy": routing.DEGENERATE_ENTROPY - 0.01})


def test_degenerate_dummy_router_flags_its_models_legacy_rows_only(tmp_path):
    perf, probes, results, settings = ledger(tmp_path, [
        probe("deepseek-v2-lite", routing.OWN_ROUTER, DEGENERATE), probe("deepseek-v2-lite", "uniform_random", BALANCED),
        probe("olmoe", routing.OWN_ROUTER, BALANCED)])
    assert list(probes.verdict) == ["degenerate", "balanced", "balanced"]
    assert list(probes.routing) == [routing_load.DUMMY_ROUTER, "uniform_random", routing_load.DUMMY_ROUTER]
    assert list(probes.model) == ["deepseek-v2-lite"] * 2 + ["olmoe"] and set(probes.scheme) == {"bf16"}
    # every scheme of deepseek's legacy rows (fp8 takes bf16's probe); not its uniform_random rows, not olmoe
    assert flagged(perf) == {("deepseek-v2-lite", "legacy-v1", "bf16"), ("deepseek-v2-lite", "legacy-v1", "fp8")}
    flag = perf[(perf.model == "deepseek-v2-lite") & (perf.settings == "legacy-v1")].flag.iloc[0]
    assert headline.short_flag(flag) == "dummy routers degenerate (busiest expert 10.7× mean; bf16 probe, gpu1.json)"
    keys = results[["model", "scheme", "provenance", "backend", "device", "settings"]].drop_duplicates()
    text = " ".join(b[1] for b in page.routing_section(probes, perf, keys, settings) if b[0] == "p")
    assert "deepseek-v2-lite at settings legacy-v1" in text and "olmoe at settings" not in text
    assert "legacy-v1: dummy weights' own routers" in text and "defaults: uniform_random" in text


def test_balanced_probes_or_simulated_routing_flag_nothing(tmp_path):
    perf, *_ = ledger(tmp_path, [probe("deepseek-v2-lite", routing.OWN_ROUTER, BALANCED),
                                 probe("olmoe", "uniform_random", DEGENERATE)])  # a simulation's probe: not its rows
    assert flagged(perf) == set()
    assert not routing_load.flag("deepseek-v2-lite", "bf16", "shape-only-zipf1.0", "model", routing_load.read_probes(
        tmp_path / "routing").assign(verdict="degenerate"))  # zipf rows (older provenance) ran on no dummy router


def test_no_routing_folder_says_routing_was_not_probed(tmp_path):
    perf, probes, results, settings = ledger(tmp_path)
    assert probes.empty and flagged(perf) == set()
    keys = results[["model", "scheme", "provenance", "backend", "device", "settings"]].drop_duplicates()
    blocks = page.routing_section(probes, perf, keys, settings)
    assert blocks[0] == ("h2", "Routed expert load") and len(blocks) == 2
    assert "Routing was not probed" in blocks[1][1]


def test_the_routing_paragraph_counts_groups_once_they_are_many():
    """The first screen's routing sentence lists a routing's settings ids while few, then counts them: each
    new settings group lengthened the H200 report's README by its id (32 ids by session 25)."""
    import pandas as pd
    ids = [f"s{i}" for i in range(6)]
    settings = {sid: DEFAULTS for sid in ids} | {"old": LEGACY}
    keys = pd.DataFrame({"settings": ids + ["old"]})
    empty = pd.DataFrame(columns=routing_load.COLUMNS)
    (_, (_, text)) = page.routing_section(empty, pd.DataFrame({"flag": []}), keys, settings)
    assert "6 settings groups: uniform_random (vLLM's simulation, balanced)" in text and "s0" not in text
    assert "old: dummy weights' own routers" in text
