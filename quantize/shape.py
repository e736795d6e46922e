"""Shape-only checkpoints: a registry model's real config plus the exact quantization_config its recipe
would write, with no weights (vLLM fills them with dummy values: load_format="dummy").

The quantization_config is not written by hand: llm-compressor quantizes a few-layer, narrow instance
of the same architecture (random weights, random calibration tokens) through the same load path as
`moeq quantize`, and compressed-tensors writes the config. Only the ignore list depends on depth; it
is expanded to every layer of the real model by matching each real layer to a small layer with the
same module structure (so DeepSeek's dense first layer gets no router entry).

    moeq shape MODEL SCHEME OUT      (quantize environment; no weights needed)
"""
import json
import re
import sys
import tempfile
from pathlib import Path

from moeq import registry, schemes
from moeq.atomic import staged_dir

LAYER = re.compile(r"^(.*\blayers\.)(\d+)(\..+)$")
# narrow sizes (and fewer experts) for the small instance: names and quantization_config do not depend on them
NARROW = {"hidden_size": 256, "intermediate_size": 256, "moe_intermediate_size": 256, "vocab_size": 512,
          "num_attention_heads": 2, "num_key_value_heads": 2, "kv_lora_rank": 128,
          "num_local_experts": 8, "num_experts": 8, "n_routed_experts": 8, "num_experts_per_tok": 2}


def hf_config(cfg: dict):
    import torch
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    config = AutoConfig.for_model(**cfg)
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[cfg["model_type"]]]
    config.dtype = torch.bfloat16
    return config


def meta_model(config):
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def layer_signatures(config) -> list[frozenset]:
    """Per decoder layer, its parameter names relative to the layer (meta device: no memory)."""
    model = meta_model(config)
    sigs: dict[int, set] = {}
    for name, _ in model.named_parameters():
        if m := LAYER.match(name):
            sigs.setdefault(int(m[2]), set()).add(m[3])
    return [frozenset(sigs[i]) for i in sorted(sigs)]


def _drop_unimportable_lazy_modules():
    """transformers' apply_patches (llm-compressor's MoE linearization of e.g. OLMoE) calls dir() on every
    loaded transformers module; the lazy image-processor stubs that importing llm-compressor leaves
    behind need torchvision, which CPU installs lack. Such stubs are dropped; nothing here uses them."""
    for name, mod in list(sys.modules.items()):
        if name.startswith("transformers.") and mod is not None:
            try:
                dir(mod)
            except ImportError:
                del sys.modules[name]


def word_tokenizer(vocab: int, out: Path):
    """A plain word-level tokenizer ("t0" ... "tN", whitespace-separated): oneshot wants a processor beside the data,
    even for token ids, and a shape-only server detokenizes with it. Each entry carries its separator ("\u2581t17",
    as SentencePiece's do), so no text of N tokens is longer than N x the longest entry: vLLM refuses, before it
    tokenizes, a prompt of more characters than the context allows tokens x that (session 17: the longest random
    prompts, "t12345 " at 7 characters a token against a longest entry of 6, came back 400 Bad Request)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    sep = "\u2581"
    tok = Tokenizer(models.WordLevel({f"{sep}t{i}": i for i in range(vocab)}, unk_token=f"{sep}t0"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(replacement=sep, prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(replacement=sep, prepend_scheme="always")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=f"{sep}t0", eos_token=f"{sep}t2",
                            pad_token=f"{sep}t1").save_pretrained(out)


def small_quantization_config(model, recipe, cfg: dict, layers: int, log=print) -> dict:
    """Quantize a narrow `layers`-deep instance with llm-compressor; return the config it writes."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM
    from moeq.quantize.run import _no_pinning_without_accelerator, load_linearized

    small = dict(cfg, num_hidden_layers=layers, **{k: min(v, cfg[k]) for k, v in NARROW.items() if k in cfg})
    if "head_dim" in cfg:
        small["head_dim"] = 128
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "src", Path(tmp) / "dst"
        AutoModelForCausalLM.from_config(hf_config(small)).to(torch.bfloat16).save_pretrained(src)
        word_tokenizer(small["vocab_size"], src)
        _drop_unimportable_lazy_modules()
        lm = load_linearized(src, model)
        _no_pinning_without_accelerator()
        kwargs = {}
        if recipe.needs_calibration:  # random tokens: the scales are thrown away, only the config is kept
            ids = torch.randint(3, small["vocab_size"], (4, 32)).tolist()
            kwargs = dict(dataset=Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 32] * 4}),
                          num_calibration_samples=4, max_seq_length=32)
        log(f"[shape] llm-compressor: {recipe.name} on a {layers}-layer narrow {cfg['model_type']}")
        oneshot(model=lm, recipe=recipe.for_model(model.ignore, cfg["model_type"]), moe_calibrate_all_experts=True,
                **kwargs)
        lm.save_pretrained(dst, save_compressed=True)
        return json.loads((dst / "config.json").read_text())["quantization_config"]


def expand_ignore(ignore: list[str], small_sigs: list[frozenset], full_sigs: list[frozenset]) -> list[str]:
    """Per-layer entries of the small model repeated for every real layer of the same structure."""
    per_layer: dict[int, list[tuple[str, str]]] = {}
    before, after = [], []
    for name in ignore:
        if m := LAYER.match(name):
            per_layer.setdefault(int(m[2]), []).append((m[1], m[3]))
        else:
            (after if per_layer else before).append(name)
    out = list(before)
    for j, sig in enumerate(full_sigs):
        k = small_sigs.index(sig)  # every structure of the real model occurs in the small one
        out += [f"{prefix}{j}{suffix}" for prefix, suffix in per_layer.get(k, [])]
    return out + after


def shape_checkpoint(model: str, scheme: str, out: Path, log=print) -> Path:
    spec = registry.resolve(model, need_weights=False)
    cfg = dict(spec.spec["config"])
    config = hf_config(cfg)
    recipe = None if scheme == schemes.BASELINE else schemes.load(scheme)
    qc, kept = None, {}
    if recipe is not None:
        schemes.validate(recipe.for_model(spec.ignore, cfg["model_type"]), str(recipe.path))
        from moeq.quantize.run import ragged_layers
        kept = ragged_layers(meta_model(config), recipe)  # real widths: the narrow instance has none
        full = layer_signatures(config)
        # the smallest depth that holds every kind of layer the real model has (at least two)
        depth = max(2, max(full.index(s) for s in set(full)) + 1)
        small = layer_signatures(hf_config(dict(cfg, num_hidden_layers=depth)))
        qc = small_quantization_config(spec, recipe, cfg, depth, log)
        expanded = expand_ignore(qc["ignore"], small, full)
        qc["ignore"] = expanded + [n for n in kept if n not in expanded]
    with staged_dir(out) as tmp:
        config.save_pretrained(tmp)
        data = json.loads((tmp / "config.json").read_text())
        if qc is not None:
            data["quantization_config"] = qc
        data["moeq_shape_only"] = True
        (tmp / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        if recipe is not None:
            (tmp / "moeq_recipe.yaml").write_text(recipe.for_model([*spec.ignore, *kept], cfg["model_type"]))
        (tmp / "manifest.json").write_text(json.dumps({
            "model": spec.name, "scheme": scheme, "shape_only": True, "hub_id": spec.spec.get("hub_id"),
            "recipe_sha256": recipe.file_hash if recipe else None, "full_precision_ragged_groups": kept}, indent=2))
    log(f"[shape] wrote {out} ({spec.name} x {scheme}, shape only)")
    return out
