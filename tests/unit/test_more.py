"""Fast tier, continued: the edges of the pure functions test_core.py checks in the middle — each
case here is one that a plausible bug (an off-by-one comparison, a missing key check, pooling rows
of other settings) would get wrong."""
import numpy as np
import pytest

from moeq.errors import UserError
from moeq.evaluate import routing, settings, sweep as sweep_mod
from moeq.evaluate.ledger import Ledger
from moeq.evaluate.report import verdicts
from moeq.evaluate.run import misloads
from moeq.quantize import coverage

KEY = {"model": "m", "provenance": "real", "backend": "b", "device": "d", "settings": "s"}


def _ppl(led, scheme, bpb, **key):
    led.write({**KEY, **key, "scheme": scheme}, "accuracy", "moeq_ppl", [{"metric": "bits_per_byte", "value": bpb}])


# ---- misload guard: flags a quantized model far worse than BF16, and nothing else -----------------

def test_misload_guard_boundary(tmp_path):
    led = Ledger(tmp_path / "l.sqlite")
    _ppl(led, "bf16", 2.0)
    _ppl(led, "fp8", 3.0)  # exactly 1.5x: the guard is "more than", so this one passes
    _ppl(led, "w8a16", 3.0001)  # just beyond
    bad = misloads(led, ["m"], log=lambda *_: None)
    assert len(bad) == 1 and "w8a16" in bad[0] and "3.000 bits/byte vs 2.000" in bad[0]


def test_misload_guard_compares_only_within_one_settings_group(tmp_path):
    """A BF16 row of other engine settings (or another device) is no reference: nothing is flagged,
    even for a scheme three times worse, when no BF16 row shares its settings and device."""
    led = Ledger(tmp_path / "l.sqlite")
    _ppl(led, "bf16", 1.0, settings="other")
    _ppl(led, "bf16", 1.0, device="elsewhere")
    _ppl(led, "w4a16-gptq", 3.0)
    assert misloads(led, ["m"], log=lambda *_: None) == []
    _ppl(led, "bf16", 1.0)  # the positive control: the same rows plus a BF16 of the same group
    assert len(misloads(led, ["m"], log=lambda *_: None)) == 1


def test_misload_guard_reads_only_the_models_asked_for(tmp_path):
    led = Ledger(tmp_path / "l.sqlite")
    _ppl(led, "bf16", 1.0)
    _ppl(led, "fp8", 5.0)
    assert misloads(led, ["another"], log=lambda *_: None) == []
    assert len(misloads(led, ["m", "m"], log=lambda *_: None)) == 1  # one model named twice: one finding


# ---- routing statistics ---------------------------------------------------------------------------

def test_routing_stats_per_layer_and_median():
    tokens = 400
    routed = np.zeros((tokens, 3, 2), int)
    routed[:, :, 0] = np.arange(tokens)[:, None] % 4  # layers 0-2: experts 0-3 only, evenly ...
    routed[:, :, 1] = 4 + np.arange(tokens)[:, None] % 4  # ... and 4-7 evenly: all 8 even
    routed[:, 2, 1] = routed[:, 2, 0]  # layer 2 sends both picks to experts 0-3: 4-7 starve
    s = routing.load_stats(routed, 8)
    assert s["tokens"] == tokens and s["layers"] == 3 and len(s["per_layer"]) == 3
    even, half = s["per_layer"][0], s["per_layer"][2]
    assert even == {"max_over_mean": 1.0, "cv": 0.0, "entropy": pytest.approx(1.0), "min_over_mean": 1.0}
    assert half["max_over_mean"] == 2.0 and half["min_over_mean"] == 0.0
    assert half["entropy"] == pytest.approx(np.log(4) / np.log(8))  # 4 of 8 equally used
    assert s["median"]["max_over_mean"] == 1.0  # the median layer, not the mean of the layers


def test_routing_stats_count_experts_never_routed():
    """An expert no token reaches still counts in the mean (bincount's minlength)."""
    routed = np.zeros((10, 1, 1), int)
    s = routing.load_stats(routed, 4)["median"]
    assert s["max_over_mean"] == 4.0 and s["entropy"] == 0.0 and s["min_over_mean"] == 0.0


# ---- Zipf routing spec ----------------------------------------------------------------------------

@pytest.mark.parametrize("spec, s", [("zipf:1", 1.0), ("zipf:0.5", 0.5), ("zipf:1e-3", 1e-3), ("zipf:2.25", 2.25)])
def test_zipf_spec_parses(spec, s):
    assert settings.parse_zipf(spec) == s
    settings.check_routing(spec, strategies=[])  # never asks vLLM: zipf is moeq's own


@pytest.mark.parametrize("spec", ["zipf:0", "zipf:-1", "zipf:", "zipf", "zipf:x", "zipf:nan", "zipf:inf", "zipfs:1", "zip:1"])
def test_bad_zipf_spec_is_a_user_error(spec):
    with pytest.raises(UserError, match="zipf:S with S > 0"):
        settings.parse_zipf(spec)


def test_routing_names_are_checked_against_vllms_strategies():
    settings.check_routing("model", strategies=[])
    settings.check_routing("uniform_random", strategies=["uniform_random"])
    with pytest.raises(UserError, match="unknown routing 'uniform'; valid: model .* uniform_random"):
        settings.check_routing("uniform", strategies=["uniform_random"])
    with pytest.raises(UserError, match="zipf:S"):
        settings.check_routing("zipf:-2", strategies=[])


def test_routing_probe_specs_name_the_routing_behind_a_row():
    from moeq.evaluate.verbs.routing import parse_probe
    sims = ["uniform_random", "normal_routing"]
    assert parse_probe("ck/bf16", sims) == ("ck/bf16", False, "model", None)
    assert parse_probe("ck/bf16:dummy:uniform_random:l4", sims) == ("ck/bf16", True, "uniform_random", 4)
    assert parse_probe("ck:dummy:zipf1.5:l8", sims) == ("ck", True, "zipf:1.5", 8)
    with pytest.raises(UserError, match="unknown routing 'uniform'; valid: model .* uniform_random, normal_routing"):
        parse_probe("ck:dummy:uniform", sims)
    with pytest.raises(UserError, match="one routing per probe, got zipf1, uniform_random"):
        parse_probe("ck:zipf1:uniform_random", sims)


# ---- sweep plan keys ------------------------------------------------------------------------------

PLAN = {"weights": "dummy", "models": ["mixtral"], "schemes": ["bf16", "fp8"], "cells": [[1, 512, 128]],
        "repeats": 5}


@pytest.fixture
def driver(monkeypatch):
    """sweep() with the driver replaced by a recorder: what the plan would have run."""
    calls = []
    monkeypatch.setattr(sweep_mod, "evaluate", lambda **kw: calls.append(kw) or 0)
    return calls


@pytest.mark.parametrize("typo", ["cell", "model", "engine_arg", "warmup", "Repeats"])
def test_a_misspelt_plan_key_is_refused_before_anything_runs(driver, tmp_path, typo):
    plan = {**PLAN, typo: 1}
    with pytest.raises(UserError, match=f"plan key '{typo}' is not one of .*cells"):
        sweep_mod.sweep(plan, tmp_path / "l.sqlite", tmp_path)
    assert driver == [] and not list(tmp_path.iterdir())


def test_every_documented_plan_key_is_accepted_and_reaches_the_driver(driver, tmp_path):
    assert sweep_mod.sweep(PLAN, tmp_path / "l.sqlite", tmp_path) == 0
    (kw,) = driver
    assert kw["models"] == ["mixtral"] and kw["schemes"] == ["bf16", "fp8"] and kw["cells"] == [[1, 512, 128]]
    assert kw["repeats"] == 5 and kw["weights"] == "dummy" and kw["tasks"] == [] and kw["restarts"] == 1
    assert not kw["engine_args"] and kw["routing"] is None and kw["warmup_tokens"] is None
    driver.clear()
    # the command line's models/schemes replace the plan's
    sweep_mod.sweep({**PLAN, "weights": "real"}, tmp_path / "l.sqlite", tmp_path, models=["tiny"], schemes=["bf16"])
    assert driver[0]["models"] == ["tiny"] and driver[0]["schemes"] == ["bf16"] and driver[0]["weights"] == "real"


# ---- coverage: which experts count as starved -----------------------------------------------------

def test_starved_threshold_is_strictly_below_five_percent_of_fair():
    # 100 tokens x top-2 over 4 experts: a fair share is 50, 5% of it 2.5
    out = coverage.summarize({"a": [2, 3, 95, 100], "b": [50, 50, 50, 50]}, n_tokens=100, top_k=2)
    assert out["fair_share"] == 50 and out["starved"] == {"a": [0]}  # 3 >= 2.5 is not starved
    assert out["min_share_of_fair"] == pytest.approx(2 / 50)
    assert "b" not in out["starved"]  # a layer with no starved expert is not listed at all
    out = coverage.summarize({"a": [2, 3, 95, 100]}, n_tokens=100, top_k=2, starved_below=0.1)
    assert out["starved"] == {"a": [0, 1]}  # 5% is a parameter: 3 < 5


def test_an_expert_no_token_reaches_is_starved():
    out = coverage.summarize({"l": [0, 200, 200, 0]}, n_tokens=200, top_k=2)
    assert out["starved"] == {"l": [0, 3]} and out["min_share_of_fair"] == 0


# ---- verdict boundaries: exactly on the bound -----------------------------------------------------

@pytest.mark.parametrize("lo, hi, bound, expected", [
    (20, 25, {"min": 20}, verdicts.HOLDS),  # lo == b holds a minimum
    (19.999, 25, {"min": 20}, verdicts.INCONCLUSIVE),
    (15, 20, {"min": 20}, verdicts.INCONCLUSIVE),  # hi == b: lo < b <= hi straddles
    (15, 19.999, {"min": 20}, verdicts.FAILS),
    (-5, 1, {"max": 1}, verdicts.HOLDS),  # hi == b holds a maximum
    (-5, 1.001, {"max": 1}, verdicts.INCONCLUSIVE),
    (1, 3, {"max": 1}, verdicts.INCONCLUSIVE),  # lo == b: lo <= b < hi straddles
    (1.001, 3, {"max": 1}, verdicts.FAILS),
    (-3, -1, {"min": -2}, verdicts.INCONCLUSIVE),  # negative bounds (an accuracy loss of at most 2%)
    (-1.5, -1, {"min": -2}, verdicts.HOLDS),
])
def test_verdict_on_and_beside_the_bound(lo, hi, bound, expected):
    point = (lo + hi) / 2
    assert verdicts.judge(point, lo, hi, bound) == expected


def test_verdict_without_an_interval():
    assert verdicts.judge(30, np.nan, np.nan, {"min": 20}) == verdicts.INCONCLUSIVE  # one repeat: no interval
    assert verdicts.judge(np.nan, 20, 30, {"min": 20}) == verdicts.NOT_MEASURED
