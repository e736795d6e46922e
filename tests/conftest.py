"""Shared fixtures. The suite runs in the serve environment (vLLM, lm-eval); quantization runs in the
quantize environment through the `moeq` command, exactly as `make quantize` runs it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
QUANT_PYTHON = os.environ.get("MOEQ_QUANT_PYTHON") or str(ROOT / ".venv" / "quant" / "bin" / "python")
# small calibration keeps every scheme (AWQ's grid search included) to seconds on two cores
CALIB = ["--samples", "16", "--seq-len", "128"]


def moeq(*args, python=QUANT_PYTHON, check=True, env=None, timeout=1800) -> subprocess.CompletedProcess:
    proc = subprocess.run([python, "-m", "moeq.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "MOEQ_QUANT_PYTHON": QUANT_PYTHON, **(env or {})},
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"moeq {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def serve_moeq(*args, **kw) -> subprocess.CompletedProcess:
    return moeq(*args, python=sys.executable, **kw)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The trained embedded model (built once per machine, cached outside the repo; minutes)."""
    return Path(moeq("build", "tiny", timeout=3600).stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def checkpoints(tiny_model, tmp_path_factory) -> Path:
    """Every recipe applied to the tiny model, in a fresh checkpoint root."""
    root = tmp_path_factory.mktemp("checkpoints")
    moeq("quantize", "--model", "tiny", "--scheme", "all", "--out", root, *CALIB)
    return root


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def small_spec(**train) -> dict:
    """A registry entry for a two-layer, four-expert MoE the builder trains in seconds (train overrides)."""
    return {"config": {"model_type": "mixtral", "vocab_size": 384, "hidden_size": 64, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
                       "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 512,
                       "router_aux_loss_coef": 0.02, "tie_word_embeddings": False},
            "ignore": ["lm_head", "re:.*block_sparse_moe[.]gate$", "re:.*mlp[.]gate$"],
            "train": {"device": "cpu", "dtype": "float32", "compile": False, "tokens": 8 * 4 * 64, "batch": 4,
                      "seq_len": 64, "lr": 3e-3, "seed": 0, "eval_tokens": 2048, "max_ce_ratio": 10.0,
                      "min_expert_share": 0.0, "tokenizer_chars": 200_000, **train}}
