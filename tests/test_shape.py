"""Shape-only checkpoints (`moeq shape`): the real config plus the quantization_config
llm-compressor writes for the recipe, the ignore list covering every layer's router and lm_head."""
import subprocess

import pytest

from conftest import QUANT_PYTHON, ROOT, read_json
from moeq import registry

# scheme: (format, weight bits, weight strategy, activations: None or (type, bits, strategy, dynamic))
EXPECTED = {
    "fp8": ("float-quantized", 8, "channel", ("float", 8, "token", True)),
    "fp8-static": ("float-quantized", 8, "tensor", ("float", 8, "tensor", False)),
    "fp8-block": ("float-quantized", 8, "block", ("float", 8, "group", True)),
    "w4a16-gptq": ("pack-quantized", 4, "group", None),
    "w4a16-awq": ("pack-quantized", 4, "group", None),
    "w8a8-int8": ("int-quantized", 8, "channel", ("int", 8, "token", True)),
}


def shape(model, scheme, tmp_path) -> dict:
    out = tmp_path / model / scheme
    proc = subprocess.run([QUANT_PYTHON, "-m", "moeq.cli", "shape", model, scheme, str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / ".moeq-complete").is_file() and not list(out.glob("*.safetensors"))
    config = read_json(out / "config.json")
    assert config["moeq_shape_only"] is True
    real = registry.registry()[model]["config"]
    assert {k: config[k] for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")} == \
           {k: real[k] for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")}
    return config


def test_bf16_has_no_quantization_config(tmp_path):
    assert "quantization_config" not in shape("olmoe", "bf16", tmp_path)


@pytest.mark.parametrize("scheme", sorted(EXPECTED))
def test_quantization_config_per_scheme(scheme, tmp_path):
    qc = shape("olmoe", scheme, tmp_path)["quantization_config"]
    fmt, wbits, wstrategy, act = EXPECTED[scheme]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == fmt
    (group,) = qc["config_groups"].values()
    assert group["format"] == fmt and group["targets"] == ["Linear"]
    assert (group["weights"]["num_bits"], group["weights"]["strategy"]) == (wbits, wstrategy)
    a = group["input_activations"]
    assert (a and (a["type"], a["num_bits"], a["strategy"], a["dynamic"])) == act
    # OLMoE: 16 layers, each with a router; nothing else stays in full precision
    assert qc["ignore"] == [f"model.layers.{i}.mlp.gate" for i in range(16)] + ["lm_head"]


def test_ignore_follows_layer_structure(tmp_path):
    """Mixtral's routers keep vLLM's names; DeepSeek-V2-Lite's first layer is dense (no router)."""
    mixtral = shape("mixtral", "fp8", tmp_path)["quantization_config"]
    assert mixtral["ignore"] == [f"model.layers.{i}.block_sparse_moe.gate" for i in range(32)] + ["lm_head"]
    deepseek = shape("deepseek-v2-lite", "fp8", tmp_path)["quantization_config"]
    assert deepseek["ignore"] == [f"model.layers.{i}.mlp.gate" for i in range(1, 27)] + ["lm_head"]
    # W4A16: the dense MLP's 10,944 inputs are not a whole number of 128-groups, which vLLM refuses to load
    deepseek = shape("deepseek-v2-lite", "w4a16-gptq", tmp_path)["quantization_config"]
    assert deepseek["ignore"] == [f"model.layers.{i}.mlp.gate" for i in range(1, 27)] + ["lm_head",
                                                                                       "model.layers.0.mlp.down_proj"]
    manifest = read_json(tmp_path / "deepseek-v2-lite" / "w4a16-gptq" / "manifest.json")
    assert manifest["full_precision_ragged_groups"] == {"model.layers.0.mlp.down_proj": 10944}
    # AWQ: the recipe's MoE mappings name k_proj / v_proj, which MLA lacks (it failed at once): for deepseek_v2
    # llm-compressor's own mappings apply, and the same modules stay in full precision
    assert shape("deepseek-v2-lite", "w4a16-awq", tmp_path)["quantization_config"]["ignore"] == deepseek["ignore"]


@pytest.mark.parametrize("scheme", ["bf16", "fp8", "fp8-block", "w4a16-gptq"])
def test_qwen3_235b_a22b(scheme, tmp_path):
    """The four-GPU model (issue 14): its real config (64 query / 4 KV heads, 128 experts of 1536, 94
    layers), every layer's router and lm_head in full precision; no group is ragged at 1536."""
    config = shape("qwen3-235b-a22b", scheme, tmp_path)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"],
            config["moe_intermediate_size"], config["num_experts_per_tok"]) == (64, 4, 128, 1536, 8)
    assert config.get("num_experts", config.get("num_local_experts")) == 128
    if scheme == "bf16":
        assert "quantization_config" not in config
        return
    qc = config["quantization_config"]
    (group,) = qc["config_groups"].values()
    fmt, wbits, wstrategy, _ = EXPECTED[scheme]
    assert (qc["format"], group["weights"]["num_bits"], group["weights"]["strategy"]) == (fmt, wbits, wstrategy)
    assert qc["ignore"] == [f"model.layers.{i}.mlp.gate" for i in range(94)] + ["lm_head"]
    manifest = read_json(tmp_path / "qwen3-235b-a22b" / scheme / "manifest.json")
    assert manifest["hub_id"] == "Qwen/Qwen3-235B-A22B" and manifest["full_precision_ragged_groups"] == {}


def test_glm_4_5_air_needs_two_gpus_in_bf16(tmp_path):
    """Issue 13's GPUs-needed model: its config (96 query / 8 KV heads, 128 experts of 1408 and a shared one, one
    dense layer first), every MoE layer's router and lm_head in full precision, and the dense layer's
    10944-wide down_proj too in w4a16-gptq (10944 is no multiple of 128), as DeepSeek-V2-Lite's."""
    config = shape("glm-4.5-air", "w4a16-gptq", tmp_path)
    assert (config["model_type"], config["num_attention_heads"], config["num_key_value_heads"],
            config["moe_intermediate_size"], config["n_routed_experts"], config["first_k_dense_replace"]) == (
        "glm4_moe", 96, 8, 1408, 128, 1)
    assert config["quantization_config"]["ignore"] == [f"model.layers.{i}.mlp.gate" for i in range(1, 46)] + [
        "lm_head", "model.layers.0.mlp.down_proj"]
    manifest = read_json(tmp_path / "glm-4.5-air" / "w4a16-gptq" / "manifest.json")
    assert manifest["hub_id"] == "zai-org/GLM-4.5-Air"


def test_routing_probe_names_an_unknown_routing_before_any_engine():
    from conftest import serve_moeq
    proc = serve_moeq("routing", "some/ckpt:dummy:uniform:l4", check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "unknown routing 'uniform'; valid: model" in proc.stderr and "uniform_random" in proc.stderr
