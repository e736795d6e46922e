"""The GPU build's code path run end to end on the CPU with a small config (tens of seconds each: the
integration tier; the pure parts are in tests/unit/test_builder.py)."""
import json
import math
import sys
from pathlib import Path

import pytest

from conftest import small_spec
from moeq import corpus
from moeq.atomic import is_complete
from moeq.quantize import gpubuild


@pytest.fixture(scope="module")
def small_manifest():
    """About 1 MB of the standard library, all three splits."""
    m = corpus.collect([], stdlib=True, log=lambda s: None)
    keep, budget = [], {"train": 900_000, "calibration": 50_000, "heldout": 120_000}
    for e in m["files"]:
        if e["path"].endswith(".py") and e["bytes"] < 30_000 and budget[e["split"]] > 0:
            keep.append(e)
            budget[e["split"]] -= e["bytes"]
    return dict(m, files=keep)


def test_gpu_path_smoke_on_cpu(tmp_path, monkeypatch, small_manifest):
    """The GPU build's code path end to end on the CPU: a small override config, a few steps."""
    monkeypatch.setenv("MOEQ_CACHE", str(tmp_path / "cache"))  # no tiny to compare with: skipped, said so
    lines = []
    out = tmp_path / "models" / "small"
    stats = gpubuild.build("small", small_spec(), out, log=lines.append, manifest=small_manifest)
    assert is_complete(out) and (out / "model.safetensors").is_file() and (out / "corpus-manifest.tsv.gz").is_file()
    assert corpus.read_manifest(out / "corpus-manifest.tsv.gz") == small_manifest
    assert stats["steps"] == 8 and stats["train_tokens_seen"] == 8 * 4 * 64 and stats["mfu"] is None
    assert set(stats["bits_per_byte"]["model"]) == {"stdlib"} and "tiny" not in stats["bits_per_byte"]
    row = stats["bits_per_byte"]["model"]["stdlib"]
    assert 0 < row["bpb"] and 0 < row["unigram_bpb"] and row["bytes"] > 0
    assert len(stats["expert_share_per_layer"]) == 2
    assert json.loads((out / "moeq_build.json").read_text())["steps"] == 8
    assert any("tok/s" in line for line in lines) and any("bits/byte" in line for line in lines)
    # a build that fails its checks leaves no folder under the final name, only its numbers beside it
    bad = tmp_path / "models" / "bad"
    with pytest.raises(RuntimeError, match="did not learn enough"):
        gpubuild.build("bad", small_spec(max_ce_ratio=0.0), bad, log=lines.append, manifest=small_manifest)
    assert not bad.exists() and (tmp_path / "models" / "bad.build.json").is_file()
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".tmp-")]


def test_bf16_master_weights_path_on_cpu(tmp_path, monkeypatch, small_manifest):
    """bf16 weights, fp32 master weights in AdamW, bf16 autocast: the GPU's precision path, on the CPU."""
    monkeypatch.setenv("MOEQ_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "models" / "b"
    stats = gpubuild.build("b", small_spec(dtype="bfloat16", tokens=4 * 4 * 64), out, log=lambda s: None,
                           manifest=small_manifest)
    assert stats["dtype"] == "bfloat16" and stats["steps"] == 4 and is_complete(out)
    assert math.isfinite(stats["heldout_ce"])


def test_a_killed_build_leaves_nothing_taken_as_complete(tmp_path, small_manifest):
    """SIGKILL part-way (after the tokenizer, inside the staged folder): no folder under the final name, and
    the leftover is the dead writer's, which the next write removes."""
    import signal
    import subprocess

    from moeq import atomic
    corpus.write_manifest(small_manifest, tmp_path / "m.tsv.gz")
    out = tmp_path / "models" / "k"
    script = (f"import sys, time; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
              "from pathlib import Path\nfrom conftest import small_spec\nfrom moeq import corpus\n"
              "from moeq.quantize import gpubuild\n"
              "def log(line):\n    print(line, flush=True)\n    if 'tokenizer:' in line: time.sleep(120)\n"
              f"gpubuild.build('k', small_spec(), Path({str(out)!r}), log=log, "
              f"manifest=corpus.read_manifest({str(tmp_path / 'm.tsv.gz')!r}))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "MOEQ_CACHE": str(tmp_path / "cache")})
    try:
        for line in proc.stdout:
            if "tokenizer:" in line:
                break
        leftovers = [p for p in out.parent.iterdir() if p.name.startswith(f".tmp-k-{proc.pid}-")]
        assert leftovers and (leftovers[0] / "tokenizer.json").is_file()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists() and not is_complete(out)
    atomic.clean_stale(out, log=lambda s: None)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-k-")]


def test_outliers_of_the_embedded_model_from_the_serve_environment(tiny_model, tmp_path):
    """The command the report's outlier table is made with, in the environment `make report` runs (no accelerate)."""
    from conftest import serve_moeq
    out = tmp_path / "outliers-tiny.json"
    serve_moeq("outliers", "tiny", "--tokens", "1024", "--seq-len", "512", "--out", out, timeout=600)
    result = json.loads(out.read_text())
    assert result["tokens"] == 1024 and len(result["layers"]) == 4
    worst = result["summary"]["max_activation_ratio"]
    assert worst["ratio"] > 1 and worst["input"] in result["layers"][worst["layer"]]["activations"]
