"""benchmarks/fused_moe.py at a reduced shape on the CPU: every transformers experts implementation runs
the same routing and agrees with the eager loop, speedups are against eager, and vLLM's GPU kernel is
reported as not run, with the reason, never as a number."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
pytest.importorskip("transformers")
import fused_moe  # noqa: E402


def test_reduced_run_writes_comparable_numbers(tmp_path):
    out = tmp_path / "fused_moe.json"
    fused_moe.main(["--reduced", "--layers", "1", "--batch", "1,8", "--repeats", "3", "--warmup", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["reduced"] and data["shape"] == {"hidden_size": 256, "intermediate_size": 896, "num_local_experts": 8,
                                                 "num_experts_per_tok": 2}  # Mixtral-8x7B's / 16
    assert data["host"]["name"] and data["host"]["cpu"]  # where it ran: two leases of one GPU model need not agree
    assert data["host"]["load_avg_1min"] >= 0
    rows = {(r["impl"], r["batch"]): r for r in data["results"]}
    assert {i for i, _ in rows} >= {"eager", "grouped_mm"} and {b for _, b in rows} == {1, 8}
    for (impl, batch), r in rows.items():
        assert len(r["ms_runs"]) == 3 and r["tokens_per_s"] == pytest.approx(batch / (r["ms_median"] / 1e3))
        assert r["speedup_vs_eager"] == pytest.approx(rows[("eager", batch)]["ms_median"] / r["ms_median"])
        assert r["max_rel_err_vs_eager"] < 2e-2, impl  # BF16 rounding only: the same experts were computed
        assert r["routing_agreement_vs_eager"] == 1.0, impl  # one layer: every router saw the same input
        # distinct experts the batch's routing reached: the top 2 at batch 1, at most all 8 at batch 8
        assert r["experts_hit_per_layer"] == 2 if batch == 1 else 2 <= r["experts_hit_per_layer"] <= 8
    if "vllm_fused_moe" not in {i for i, _ in rows}:
        assert "CPU" in data["not_run"]["vllm_fused_moe"]


def test_bad_batch_is_refused():
    with pytest.raises(SystemExit):
        fused_moe.main(["--reduced", "--batch", "1,x"])
