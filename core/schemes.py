"""Schemes are llm-compressor recipe files (recipes/, shipped as package data); this module finds, checks
and completes them.

A recipe carries one extra top-level block, `moeq:` (aliases, description), which llm-compressor
ignores: only keys ending in `_stage` are stages to it. What a scheme quantizes (weight and activation
bits and types, which the claims select by) is read from compressed-tensors' resolved scheme. A scheme
that vLLM applies at load time (`moeq: {vllm_quantization: fp8, format: ...}`, no stages) has no
checkpoint: it runs on the BF16 model with vLLM's `quantization=` argument.
"""
import copy
import hashlib
import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from moeq.errors import UserError

BASELINE = "bf16"
BF16_FORMAT = {"weight_type": "float", "weight_bits": 16, "activation_type": "float", "activation_bits": 16}


def recipes_dir() -> Path:
    """MOEQ_RECIPES, else the recipes shipped with moeq (package data `moeq.recipes`: recipes/ in the source tree)."""
    if folder := os.environ.get("MOEQ_RECIPES"):
        return Path(folder)
    return Path(str(importlib.resources.files("moeq.recipes")))


@dataclass
class Recipe:
    name: str
    path: Path
    doc: dict

    @property
    def meta(self) -> dict:
        return self.doc["moeq"]

    @property
    def online(self) -> str | None:
        """vLLM's `quantization=` method for a scheme applied at load time, else None."""
        return self.meta.get("vllm_quantization")

    @property
    def format(self) -> dict:
        """Weight and activation type and bits, from compressed-tensors' preset the recipe names (or,
        for a load-time scheme, the format its `moeq:` block states for vLLM's method)."""
        if self.online:
            return dict(self.meta["format"])
        from compressed_tensors.quantization import QuantizationScheme, preset_name_to_scheme
        for _, args in self.modifiers():
            if isinstance(args.get("scheme"), str):
                scheme = preset_name_to_scheme(args["scheme"], ["Linear"])
            elif args.get("config_groups"):
                scheme = QuantizationScheme.model_validate(next(iter(args["config_groups"].values())))
            else:
                continue
            w, a = scheme.weights, scheme.input_activations
            return {"weight_type": str(w.type), "weight_bits": w.num_bits,
                    "activation_type": str(a.type) if a else "float", "activation_bits": a.num_bits if a else 16}
        raise UserError(f"recipe {self.path}: no modifier names a quantization scheme")

    @property
    def claim(self) -> str:
        """A label such as W8A8-float or W4A16-int (the claims themselves select by format)."""
        f = self.format
        return f"W{f['weight_bits']}A{f['activation_bits']}-{f['weight_type']}"

    @property
    def file_hash(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]

    def modifiers(self):
        for key, stage in self.doc.items():
            if key.endswith("_stage"):
                for group, mods in stage.items():
                    if group.endswith("_modifiers"):
                        yield from mods.items()

    @property
    def needs_calibration(self) -> bool:
        """Static scales, GPTQ, AWQ and SmoothQuant all learn from data; FP8 dynamic/block do not."""
        return any(kind != "QuantizationModifier" or args.get("scheme") not in ("FP8_DYNAMIC", "FP8_BLOCK")
                   for kind, args in self.modifiers())

    def for_model(self, ignore: list[str], model_type: str | None = None) -> str:
        """The recipe text llm-compressor runs: the model's full-precision modules added to every ignore, and
        the modifier arguments the `moeq: by_model_type:` block sets for this architecture (null removes one:
        llm-compressor's own default then applies, e.g. its AWQ mappings for the architecture)."""
        doc = copy.deepcopy(self.doc)
        overrides = (doc.pop("moeq").get("by_model_type") or {}).get(model_type) or {}
        for key, stage in doc.items():
            if key.endswith("_stage"):
                for group, mods in stage.items():
                    for kind, args in mods.items():
                        for name, value in (overrides.get(kind) or {}).items():
                            if value is None:
                                args.pop(name, None)
                            else:
                                args[name] = value
                        if "ignore" in args or "targets" in args:
                            args["ignore"] = list(dict.fromkeys([*args.get("ignore", []), *ignore]))
        return yaml.safe_dump(doc, sort_keys=False)

    def group_sizes(self) -> set[int]:
        """The weight group sizes llm-compressor resolves this recipe's schemes to (W4A16: 128)."""
        return {g.weights.group_size for m in validate(self.for_model([]), str(self.path)).modifiers
                if hasattr(m, "resolve_quantization_config")
                for g in m.resolve_quantization_config().config_groups.values() if g.weights and g.weights.group_size}


def _load(path: Path) -> Recipe:
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"recipe {path} is not valid YAML: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("moeq"), dict):
        raise UserError(f"recipe {path} needs a `moeq:` block with a `description`")
    meta = doc["moeq"]
    if meta.get("vllm_quantization"):
        fmt = meta.get("format")
        if not isinstance(fmt, dict) or set(fmt) != set(BF16_FORMAT):
            raise UserError(f"recipe {path}: a load-time scheme (vllm_quantization) needs `format:` with "
                            f"{', '.join(BF16_FORMAT)}")
    elif not any(k.endswith("_stage") and isinstance(v, dict) for k, v in doc.items()):
        raise UserError(f"recipe {path} has no `<name>_stage:` block of modifiers "
                        "(nor `vllm_quantization:` for a scheme vLLM applies at load time)")
    recipe = Recipe(path.stem, path, doc)
    kinds = {kind for kind, _ in recipe.modifiers()}
    for model_type, mods in (meta.get("by_model_type") or {}).items():
        if not isinstance(mods, dict) or not all(isinstance(a, dict) for a in mods.values()):
            raise UserError(f"recipe {path}: by_model_type.{model_type} must map modifier names to arguments")
        if unknown := set(mods) - kinds:
            raise UserError(f"recipe {path}: by_model_type.{model_type} names {', '.join(sorted(unknown))}, "
                            f"which the recipe does not run; its modifiers: {', '.join(sorted(kinds))}")
    return recipe


def all_recipes() -> dict[str, Recipe]:
    return {p.stem: _load(p) for p in sorted(recipes_dir().glob("*.yaml"))}


def checkpoint_recipes() -> dict[str, Recipe]:
    """The schemes `moeq quantize` writes a checkpoint for (SCHEME=all)."""
    return {n: r for n, r in all_recipes().items() if not r.online}


def checkpoint_recipe(scheme: str) -> Recipe:
    """A scheme `moeq quantize` can write: a load-time scheme has no checkpoint to make."""
    recipe = load(scheme)
    if recipe.online:
        raise UserError(f"{recipe.name} is applied by vLLM while it loads the BF16 model (quantization="
                        f"{recipe.online!r}): there is no checkpoint to write. Measure it with "
                        f"`make eval SCHEME={recipe.name}`; schemes with a checkpoint: {', '.join(checkpoint_recipes())}")
    return recipe


def scheme_format(scheme: str) -> dict:
    return dict(BF16_FORMAT) if scheme == BASELINE else load(scheme).format


def scheme_names() -> list[str]:
    return [BASELINE, *all_recipes()]


def load(scheme: str) -> Recipe:
    """A recipe by name, alias, or path to a YAML file; raises UserError listing the valid choices."""
    path = Path(scheme)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return _load(path)
    found = all_recipes()
    if scheme in found:
        return found[scheme]
    for recipe in found.values():
        if scheme in recipe.meta.get("aliases", []):
            return recipe
    aliases = [f"{a} (={r.name})" for r in found.values() for a in r.meta.get("aliases", [])]
    raise UserError(f"unknown SCHEME {scheme!r}; valid: {', '.join(found)}; aliases: {', '.join(aliases)}")


def validate(text: str, source: str):
    """Let llm-compressor itself parse the recipe, so a malformed one fails before any work is done."""
    from llmcompressor.recipe import Recipe as LCRecipe
    try:
        parsed = LCRecipe.create_instance(text)
    except Exception as e:
        raise UserError(f"recipe {source} is not a valid llm-compressor recipe: {e}") from e
    if not parsed.modifiers:
        raise UserError(f"recipe {source} defines no modifiers")
    return parsed
