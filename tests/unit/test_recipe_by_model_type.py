"""A recipe's `moeq: by_model_type:` block: modifier arguments for one architecture (w4a16-awq's mappings match
nothing in DeepSeek-V2's MLA attention, so llm-compressor's own mappings for it apply), validated on load."""
import pytest
import yaml

from moeq import schemes
from moeq.errors import UserError


def test_awq_defers_to_llm_compressors_mappings_for_deepseek_only():
    awq = schemes.load("w4a16-awq")
    mixtral = yaml.safe_load(awq.for_model(["lm_head"], "mixtral"))
    deepseek = yaml.safe_load(awq.for_model(["lm_head"], "deepseek_v2"))
    assert mixtral["quant_stage"]["quant_modifiers"]["AWQModifier"]["mappings"]
    assert "mappings" not in deepseek["quant_stage"]["quant_modifiers"]["AWQModifier"]
    assert awq.for_model(["lm_head"], "mixtral") == awq.for_model(["lm_head"])  # other models: the recipe as written
    assert "moeq" not in deepseek


@pytest.mark.parametrize("block, message", [
    ({"deepseek_v2": {"SmoothQuantModifier": {"smoothing_strength": 0.5}}},
     "names SmoothQuantModifier, which the recipe does not run; its modifiers: QuantizationModifier"),
    ({"deepseek_v2": ["mappings"]}, "by_model_type.deepseek_v2 must map modifier names to arguments")])
def test_a_bad_block_is_refused_naming_it(tmp_path, block, message):
    recipe = {"moeq": {"description": "test", "by_model_type": block},
              "quant_stage": {"quant_modifiers": {"QuantizationModifier": {"targets": ["Linear"], "scheme": "W8A16"}}}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(UserError, match=message):
        schemes._load(tmp_path / "bad.yaml")
