"""`moeq quantize`: one model, one recipe, one compressed-tensors checkpoint (with manifest and coverage)."""
import json
import time
from importlib.metadata import version
from pathlib import Path

from moeq import corpus, identity, registry, schemes
from moeq.quantize import coverage, tiny
from moeq.atomic import clean_stale, folder_lock, is_complete, staged_dir
from moeq.identity import read_manifest
from moeq.errors import UserError

LIBRARIES = ("torch", "transformers", "llmcompressor", "compressed-tensors", "tokenizers")


def ragged_layers(model, recipe: schemes.Recipe) -> dict[str, int]:
    """Layers whose input is not a whole number of the recipe's quantization groups (DeepSeek-V2-Lite's
    dense MLP: 10,944 = 85.5 x 128). llm-compressor quantizes them, but vLLM refuses to load the checkpoint
    ("input_size_per_partition=10944 ... not divisible by group_size=128", measured on the H200), so they
    stay in full precision. An expert cannot: vLLM's fused MoE runs every expert in one format. `model` may
    be linearized (experts as Linear) or not (fused 3D expert tensors [E, out, in], e.g. on the meta device)."""
    import torch
    widths = {n: m.in_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    widths.update({n: p.shape[-1] for n, p in model.named_parameters() if p.dim() == 3})
    groups = recipe.group_sizes()
    kept = {name: n for name, n in widths.items() if any(n % g for g in groups)}
    if experts := [n for n in kept if ".experts." in n]:
        raise UserError(f"{experts[0]}: expert input width {kept[experts[0]]} is not a whole number of "
                        f"{sorted(groups)}-groups, and experts cannot stay in full precision one by one; "
                        "use a recipe with a group size that divides it")
    return kept


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def calibration_samples(tokenizer, n: int, seq_len: int) -> list[list[int]]:
    """`n` windows of `seq_len` tokens from the calibration split (files never used for training)."""
    ids = []
    for text in corpus.texts("calibration"):
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
        if len(ids) >= n * seq_len:
            break
    if len(ids) < n * seq_len:
        raise UserError(f"the calibration split has {len(ids):,} tokens; {n} samples of {seq_len} need "
                        f"{n * seq_len:,}: lower CALIB_SAMPLES or CALIB_LEN")
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(n)]


def checkpoint_dir(root: Path, model: str, scheme: str) -> Path:
    return Path(root) / model / scheme


def _no_pinning_without_accelerator():
    """AWQ pins its cached activations for faster host-to-device copies; without an accelerator
    there is no such copy and pin_memory() fails, so pinning is skipped on CPU-only machines."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache
    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, *a, **k: None


def load_linearized(src: Path, model):
    """Load with every expert as its own Linear modules, which llm-compressor quantizes one by one.

    Experts are linearized after a plain load (llmcompressor's linearize_moe): its direct 2D load path
    (load_context) registers class patches that make transformers import every model module, which
    fails without torchvision. Where the checkpoint names expert projections differently (Mixtral:
    w1/w3/w2), those names become the save mapping, so the quantized experts are written under the
    names vLLM's weight loader expects.
    """
    import torch
    from compressed_tensors.offload import remove_dispatch
    from llmcompressor.modeling.moe.conversion_mappings import set_save_conversion_mapping
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from transformers import AutoModelForCausalLM
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    lm = linearize_moe(AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16))
    # linearize_moe leaves each new expert offloaded (compressed-tensors' OffloadCache, onload and offload on the
    # CPU): lm.to("cuda") then copies the weights back into that CPU cache and the experts still run on the CPU
    # (session 8's coverage count on the H200: "cuda:0 and cpu" in one add). A plain model moves whole;
    # llm-compressor's pipelines set their own offloading at oneshot (set_onload_device).
    remove_dispatch(lm)
    names = model.spec.get("expert_names") or {}
    if names:
        keep = [c for c in get_checkpoint_conversion_mapping(lm.config.model_type) or [] if isinstance(c, WeightRenaming)]
        renames = [WeightRenaming(source_patterns=rf"\.experts\.(\d+)\.{ckpt}\.", target_patterns=rf".experts.\1.{ours}.")
                   for ckpt, ours in names.items()]
        set_save_conversion_mapping(lm, keep + renames)
    return lm


def planned_recipe(model, recipe, src: Path) -> tuple[str, dict]:
    """The recipe text that will run, and the layers it keeps in BF16 (inputs not a whole number of
    quantization groups). Widths come from the config on the meta device, so a reuse check loads no weights."""
    from transformers import AutoConfig
    from moeq.quantize.shape import meta_model
    config = AutoConfig.from_pretrained(src)
    kept = ragged_layers(meta_model(config), recipe) if recipe.group_sizes() else {}
    return recipe.for_model([*model.ignore, *kept], config.model_type), kept


def reuse_or_redo(out: Path, manifest: dict, force: bool, log) -> bool:
    """True to reuse the complete checkpoint at `out`; refuses (UserError) to replace a different one unless forced."""
    try:
        old = read_manifest(out)
    except UserError:
        old = {}
    differs = identity.differences(old, manifest["source"], manifest["resolved_recipe_sha256"], manifest["calibration"])
    if differs and not force:
        raise UserError(f"{out} was made from {' and '.join(differs)}; rerun with FORCE=1 / --force to redo it")
    if differs:
        log(f"[quantize] redoing {out}: it was made from {' and '.join(differs)}")
    elif force:
        log(f"[quantize] redoing {out} as asked (--force), although source, recipe and calibration match")
    else:
        log(f"[quantize] {out} exists and is complete, with the same source, recipe and calibration; reusing it")
    return not (differs or force)


def quantize(model_name: str, scheme: str, out_root: Path, samples: int | None = None,
             seq_len: int | None = None, force: bool = False, log=print) -> Path:
    model = registry.resolve(model_name)
    recipe = schemes.checkpoint_recipe(scheme)
    schemes.validate(recipe.for_model(model.ignore, model.spec.get("config", {}).get("model_type")), str(recipe.path))
    out = checkpoint_dir(out_root, model.name, recipe.name)
    calib = model.calibration
    samples, seq_len = samples or calib["samples"], seq_len or calib["seq_len"]
    src = tiny.ensure_built(model, log=log)
    recipe_text, kept = planned_recipe(model, recipe, src)
    calibrated = recipe.needs_calibration
    manifest = {
        "model": model.name, "base": str(src), "source": identity.source_identity(src),
        "scheme": recipe.name, "claim": recipe.claim, "recipe": str(recipe.path), "recipe_sha256": recipe.file_hash,
        "resolved_recipe_sha256": identity.text_sha256(recipe_text),
        "calibration": {"split": "calibration", "fingerprint": corpus.fingerprint("calibration"),
                        "samples": samples if calibrated else 0, "seq_len": seq_len if calibrated else 0,
                        "all_experts": True},
        "full_precision_ragged_groups": kept,
    }
    with folder_lock(out):
        clean_stale(out, log)
        if is_complete(out) and reuse_or_redo(out, manifest, force, log):
            return out
        return _write(model, recipe, src, out, recipe_text, manifest, samples, seq_len, log)


def _write(model, recipe, src, out, recipe_text, manifest, samples, seq_len, log) -> Path:
    from llmcompressor import oneshot
    from transformers import AutoTokenizer
    _no_pinning_without_accelerator()

    t0 = time.time()
    with staged_dir(out) as tmp:
        log(f"[quantize] {model.name} x {recipe.name}: loading {src}")
        lm = load_linearized(src, model)
        if kept := manifest["full_precision_ragged_groups"]:
            log(f"[quantize] keeping {len(kept)} layers in BF16: inputs not a whole number of quantization groups "
                f"({', '.join(f'{n} {w}' for n, w in kept.items())})")
        tok = AutoTokenizer.from_pretrained(src)
        data = calibration_samples(tok, samples, seq_len)
        log(f"[quantize] routing {samples} calibration samples x {seq_len} tokens to count expert coverage")
        cover = coverage.count_routing(lm, data, model.ignore)
        for name, experts in cover["starved"].items():
            log(f"[quantize] WARNING: {name} routes under 5% of a fair share to experts {experts}")
        kwargs = {}
        if recipe.needs_calibration:
            from datasets import Dataset
            kwargs = dict(dataset=Dataset.from_dict({"input_ids": data, "attention_mask": [[1] * seq_len] * samples}),
                          num_calibration_samples=samples, max_seq_length=seq_len)
        log(f"[quantize] running llm-compressor oneshot ({'calibrated' if kwargs else 'no calibration data needed'})")
        oneshot(model=lm, recipe=recipe_text, moe_calibrate_all_experts=True, **kwargs)
        lm.save_pretrained(tmp, save_compressed=True)
        tok.save_pretrained(tmp)
        (tmp / "moeq_recipe.yaml").write_text(recipe_text)
        (tmp / "coverage.json").write_text(json.dumps(cover, indent=1))
        manifest = {
            **manifest,
            "coverage": {"tokens": cover["tokens"], "min_share_of_fair": round(cover["min_share_of_fair"], 3),
                         "starved_layers": len(cover["starved"])},
            "libraries": {lib: version(lib) for lib in LIBRARIES},
            "wall_seconds": round(time.time() - t0, 1),
        }
        manifest["size_bytes"] = dir_size(tmp)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    log(f"[quantize] wrote {out} ({manifest['size_bytes'] / 2**20:.1f} MiB, {manifest['wall_seconds']:.0f}s)")
    return out
