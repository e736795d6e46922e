"""`moeq prune`: keep the most-used experts of every MoE layer, by measured routing on calibration data.

The routing is counted the way `moeq quantize` counts it for coverage.json (coverage.count_routing: the
router's top-k over the calibration split, a split the model never trained on). Every layer keeps the
same number of experts (vLLM's fused MoE needs one expert count per model): the `n` with the most
tokens, ties to the lower index. The checkpoint is written from the source's safetensors directly:
kept experts renumbered 0..n-1 in their old order, the router's rows (and any per-expert router bias)
sliced to match, the config's expert count set to n, everything else copied byte for byte. The router
is not retrained, so the kept experts' gate logits are the original ones: the top-k is taken over the
kept experts only. The folder is a model of its own (`<base>-keep<NN>`, moeq.pruned), loaded by vLLM
and lm-eval like any Hugging Face checkpoint and quantizable like any model folder.
"""
import json
import re
import shutil
import time
from pathlib import Path

from moeq import corpus, identity, pruned, registry
from moeq.atomic import folder_lock, is_complete, staged_dir
from moeq.errors import UserError

EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def kept_count(n_experts: int, keep: float, top_k: int) -> int:
    """Experts each layer keeps: round(keep x n), at least top_k (a token must still find k experts)."""
    if not 0 < keep < 1:
        raise UserError(f"--keep {keep}: the fraction of experts to keep, between 0 and 1 (exclusive)")
    n = round(keep * n_experts)
    if n < top_k:
        raise UserError(f"--keep {keep} keeps {n} of {n_experts} experts, fewer than the {top_k} each token is "
                        f"routed to; the smallest keep for this model is {top_k / n_experts:g}")
    return n


def select(routed: dict[str, list[int]], n: int) -> dict[str, list[int]]:
    """Per layer, the `n` experts the most tokens were routed to (ties: the lower index), in index order."""
    out = {}
    for layer, counts in routed.items():
        if n > len(counts):
            raise UserError(f"{layer}: cannot keep {n} of {len(counts)} experts")
        ranked = sorted(range(len(counts)), key=lambda e: (-counts[e], e))
        out[layer] = sorted(ranked[:n])
    return out


_INDEXED = re.compile(r"^(?P<prefix>.*\.experts\.)(?P<e>\d+)(?P<rest>\..*)$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_ROUTER = re.compile(r"\.(gate|router)\.(weight|bias|e_score_correction_bias)$")


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m[1]) if m else None


def by_layer(kept: dict[str, list[int]]) -> dict[int, list[int]]:
    """Kept experts keyed by layer index: transformers' module names (model.layers.0.mlp.gate) need not be
    the checkpoint's tensor names (model.layers.0.block_sparse_moe.gate.weight)."""
    out = {layer_of(name): ids for name, ids in kept.items()}
    if None in out or len(out) != len(kept):
        raise UserError(f"cannot tell the layer of every router: {sorted(kept)}")
    return out


def slice_tensors(tensors: dict, kept: dict[int, list[int]], n_experts: int) -> dict:
    """The state dict with only the kept experts (`kept`: layer index -> expert ids). Per-expert tensors
    (`...layers.N....experts.<e>.<...>`) are renumbered 0..n-1; fused expert tensors (`....experts.<name>`,
    experts on dim 0) and the router's per-expert tensors (gate weight rows, bias) are indexed on dim 0."""
    import torch
    out, unmatched = {}, []
    for name, t in tensors.items():
        layer = layer_of(name)
        ids = kept.get(layer)
        m = _INDEXED.match(name)
        if ids is not None and m:
            if int(m["e"]) in ids:
                out[f"{m['prefix']}{ids.index(int(m['e']))}{m['rest']}"] = t
        elif ids is not None and (".experts." in name or _ROUTER.search(name)) and t.dim() >= 1 \
                and t.shape[0] == n_experts:
            out[name] = t.index_select(0, torch.tensor(ids)).contiguous()
        else:
            if ".experts." in name or (_ROUTER.search(name) and t.dim() >= 1 and t.shape[0] == n_experts):
                unmatched.append(name)
            out[name] = t
    if unmatched:
        raise UserError(f"{unmatched[0]}: an expert or router tensor in a layer the routing was not counted "
                        "for; cannot prune it")
    return out


def count_routing(src: Path, model: registry.Model, samples: int, seq_len: int) -> dict:
    """coverage.json's counts for the source model on the calibration split."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from moeq.quantize import coverage
    from moeq.quantize.run import calibration_samples
    lm = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    data = calibration_samples(AutoTokenizer.from_pretrained(src), samples, seq_len)
    return coverage.count_routing(lm, data, model.ignore)


def prune(model_name: str, keep: float, out_root: Path, samples: int | None = None, seq_len: int | None = None,
          force: bool = False, log=print) -> Path:
    from safetensors.torch import load_file, save_file
    from moeq.quantize import tiny
    model = registry.resolve(model_name)
    src = tiny.ensure_built(model, log=log)
    config = json.loads((src / "config.json").read_text())
    if "quantization_config" in config:
        raise UserError(f"{src} is quantized; prune the BF16 model, then quantize the pruned one")
    key = next((k for k in EXPERT_KEYS if config.get(k)), None)
    if key is None:
        raise UserError(f"{src}: config.json names no expert count ({', '.join(EXPERT_KEYS)}): not an MoE model")
    n_experts, top_k = config[key], config["num_experts_per_tok"]
    n = kept_count(n_experts, keep, top_k)
    out = Path(out_root) / pruned.FOLDER / pruned.name(model.name, keep)
    calib = model.calibration
    samples, seq_len = samples or calib["samples"], seq_len or calib["seq_len"]
    manifest = {"model": pruned.name(model.name, keep), "pruned_from": model.name, "base": str(src),
                "source": identity.source_identity(src), "keep": keep, "experts": {"before": n_experts, "after": n},
                "top_k": top_k, "selection": "per layer, the experts the most calibration tokens are routed to "
                                             "(router top-k), ties to the lower index",
                "calibration": {"split": "calibration", "fingerprint": corpus.fingerprint("calibration"),
                                "samples": samples, "seq_len": seq_len}}
    with folder_lock(out):
        if is_complete(out) and not force:
            old = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else {}
            same = all(old.get(k) == manifest[k] for k in ("source", "keep", "calibration"))
            if same:
                log(f"[prune] {out} exists, from the same source, keep and calibration; reusing it")
                return out
            raise UserError(f"{out} was pruned from another source, keep or calibration; rerun with --force")
        t0 = time.time()
        log(f"[prune] {model.name}: routing {samples} calibration samples x {seq_len} tokens")
        cover = count_routing(src, model, samples, seq_len)
        kept = select(cover["routed"], n)
        files = sorted(src.glob("*.safetensors"))
        if len(files) != 1:
            raise UserError(f"{src}: {len(files)} safetensors files; prune handles single-file models "
                            "(the embedded ones); sharded hub models are pruned on the GPU plan's machine")
        tensors = slice_tensors(load_file(files[0]), by_layer(kept), n_experts)
        with staged_dir(out) as tmp:
            save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
            config[key] = n
            config["moeq_pruned"] = {"from": model.name, "keep": keep, "experts_before": n_experts}
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            for f in src.iterdir():
                if f.is_file() and f.name not in ("config.json", "model.safetensors", "moeq_build.json") \
                        and not f.name.startswith("."):
                    shutil.copy2(f, tmp / f.name)
            kept_share = {layer: sum(cover["routed"][layer][e] for e in ids) / sum(cover["routed"][layer])
                          for layer, ids in kept.items()}
            manifest |= {"kept": kept, "kept_routing_share": {k: round(v, 4) for k, v in kept_share.items()},
                         "wall_seconds": round(time.time() - t0, 1)}
            (tmp / "coverage.json").write_text(json.dumps(cover, indent=1))
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    log(f"[prune] wrote {out}: {n} of {n_experts} experts per layer; the kept experts had "
        f"{min(kept_share.values()):.0%}-{max(kept_share.values()):.0%} of each layer's routed tokens")
    return out
