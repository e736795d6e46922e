"""Decompress a compressed-tensors checkpoint into a plain BF16 one, with compressed-tensors itself.

The result carries exactly the quantized weights' values (rounding error included) in BF16, so any
backend can run it. Activation quantization is not simulated: this measures weight error only. It is
how moeq scores a scheme that a backend cannot run natively (FP8 or INT8 MoE on vLLM's CPU backend).
"""
import json
import shutil
from collections import defaultdict
from pathlib import Path

from moeq.atomic import staged_dir
from moeq.errors import UserError


def dequantize(ckpt: Path, out: Path, log=print) -> Path:
    if not (ckpt / "config.json").is_file():
        raise UserError(f"{ckpt} is not a checkpoint folder ({'no config.json' if ckpt.is_dir() else 'no such folder'})")
    import torch
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((ckpt / "config.json").read_text())
    if "quantization_config" not in config:
        raise UserError(f"{ckpt} has no quantization_config: not a compressed-tensors checkpoint")
    qcfg = QuantizationConfig.model_validate(config.pop("quantization_config"))
    if len(qcfg.config_groups) != 1:
        raise UserError(f"{ckpt}: {len(qcfg.config_groups)} quantization groups; moeq's recipes write one")
    scheme = next(iter(qcfg.config_groups.values()))
    compressor = BaseCompressor.get_value_from_registry(scheme.format or qcfg.format)

    tensors = {}
    for file in sorted(ckpt.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    quantized = {name.rpartition(".")[0] for name in tensors if name.endswith(".weight_scale")}
    modules = defaultdict(dict)
    for name in list(tensors):
        module, _, local = name.rpartition(".")
        if module in quantized and local.startswith("weight"):
            modules[module][local] = tensors.pop(name)
        elif module in quantized and local.startswith(("input_", "output_")):
            del tensors[name]  # activation scales: nothing to run them in a BF16 checkpoint
    for module, state in modules.items():
        tensors[module + ".weight"] = compressor.decompress(state, scheme)["weight"].to(torch.bfloat16)
    with staged_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "model.safetensors", metadata={"format": "pt"})
        config["dtype"] = "bfloat16"
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "manifest.json"):
            if (ckpt / extra).exists():
                shutil.copy(ckpt / extra, tmp / extra)
    log(f"[dequantize] {len(modules)} quantized modules of {ckpt} -> {out}")
    return out
