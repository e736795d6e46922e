"""`moeq prune` end to end: the pruned tiny is a model of its own that vLLM loads and lm-eval scores, its
manifest says what was kept, and the report pairs it with its base (issue 12, claim 4)."""
import json
import sqlite3

import pytest
from safetensors import safe_open

from moeq import pruned
from tests.conftest import moeq, serve_moeq


@pytest.fixture(scope="module")
def pruned_tiny(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("pruned")
    moeq("prune", "--model", "tiny", "--keep", "0.5", "--out", root, "--samples", "8", "--seq-len", "128")
    return root / pruned.FOLDER / pruned.name("tiny", 0.5)


def test_pruned_checkpoint_keeps_the_most_routed_experts(pruned_tiny, tiny_model):
    config = json.loads((pruned_tiny / "config.json").read_text())
    manifest = json.loads((pruned_tiny / "manifest.json").read_text())
    cover = json.loads((pruned_tiny / "coverage.json").read_text())
    assert config["num_local_experts"] == 4 and config["moeq_pruned"]["from"] == "tiny"
    assert manifest["keep"] == 0.5 and manifest["experts"] == {"before": 8, "after": 4}
    for layer, kept in manifest["kept"].items():
        counts = cover["routed"][layer]
        assert min(counts[e] for e in kept) >= max(c for e, c in enumerate(counts) if e not in kept)
    with safe_open(pruned_tiny / "model.safetensors", "pt") as f, \
            safe_open(tiny_model / "model.safetensors", "pt") as base:
        names = set(f.keys())
        assert "model.layers.0.block_sparse_moe.experts.4.w1.weight" not in names
        kept0 = manifest["kept"]["model.layers.0.mlp.gate"]
        assert (f.get_tensor("model.layers.0.block_sparse_moe.gate.weight")
                == base.get_tensor("model.layers.0.block_sparse_moe.gate.weight")[kept0]).all()
        assert (f.get_tensor("model.layers.0.block_sparse_moe.experts.1.w2.weight")
                == base.get_tensor(f"model.layers.0.block_sparse_moe.experts.{kept0[1]}.w2.weight")).all()
    # a second run with the same source, keep and calibration reuses it
    assert "reusing" in moeq("prune", "--model", "tiny", "--keep", "0.5", "--out", pruned_tiny.parent.parent,
                             "--samples", "8", "--seq-len", "128").stdout


def test_pruned_model_loads_in_vllm_and_scores(pruned_tiny, tmp_path):
    ledger = tmp_path / "ledger.sqlite"
    serve_moeq("eval", "--model", pruned_tiny, "--scheme", "bf16", "--tasks", "moeq_mc4", "--limit", "16",
               "--batch", "1", "--input-len", "64", "--output-len", "16", "--repeats", "3", "--ledger", ledger)
    with sqlite3.connect(ledger) as db:
        rows = dict(db.execute("SELECT metric, value FROM results WHERE model = 'tiny-keep50' AND cell = 'moeq_mc4'"))
        facts = json.loads(db.execute("SELECT note FROM results WHERE model = 'tiny-keep50' AND kind = 'model'").fetchone()[0])
        ckpt, build = db.execute("SELECT DISTINCT checkpoint, build FROM results WHERE model = 'tiny-keep50'").fetchone()
    assert 0 < rows["acc"] <= 1 and facts["num_experts"] == 4
    # the rows name the build they were pruned from, so the report pairs them only with that build of tiny
    source = json.loads((pruned_tiny / "manifest.json").read_text())["source"]["digest"]
    assert ckpt.endswith(f"+from:{source}") and build == source
