"""How hard a model is to quantize, measured: per layer, the largest activation magnitude over the median
magnitude of the inputs of its attention and expert projections on held-out text, and the kurtosis of
its weights (3 for a Gaussian; heavy tails above). Works on any Hugging Face MoE checkpoint whose experts
are transformers' fused 3D tensors (gate_up_proj / down_proj) or plain Linear modules.

Inputs measured per decoder layer: every Linear whose input is quantized by a W8A8 scheme (q/k/v share
one input, o_proj has its own; dense and shared-expert MLPs too), and for fused experts the experts'
input (gate/up) and the down projection's input, which exists only inside the experts' forward and is
recomputed for each routed token. The median comes from a fixed histogram of log2|x| (1/64 steps: within
1.1% of the exact median, and the same result for the same inputs whatever the batching); the maximum
is exact. Router gates and lm_head stay in full precision in every recipe and are left out.
"""
import math
import re

import torch

LOG2_LO, LOG2_HI, PER_OCTAVE = -40, 40, 64
BINS = (LOG2_HI - LOG2_LO) * PER_OCTAVE


def magnitude_ratio(x: torch.Tensor) -> float:
    """Exact max|x| / median|x| of one tensor (the quantity the histogram estimates)."""
    a = x.detach().float().abs().flatten()
    med = float(a.median())
    return float(a.max()) / med if med > 0 else math.inf


class MagnitudeStats:
    """Streaming max|x| and (histogram) median|x| over every element of every tensor given."""

    def __init__(self):
        self.hist = torch.zeros(BINS + 1, dtype=torch.float64)  # last bin: exact zeros
        self.max = 0.0
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        a = x.detach().float().abs().flatten()
        if a.numel() == 0:
            return
        self.max = max(self.max, float(a.max()))
        self.count += a.numel()
        zero = a == 0
        idx = ((torch.log2(a[~zero]) - LOG2_LO) * PER_OCTAVE).floor().clamp(0, BINS - 1).long()
        self.hist[:BINS] += torch.bincount(idx, minlength=BINS).double().cpu()
        self.hist[BINS] += float(zero.sum())

    def median(self) -> float:
        if self.count == 0:
            return float("nan")
        zeros = float(self.hist[BINS])
        half = self.count / 2
        if zeros >= half:
            return 0.0
        cum = torch.cumsum(self.hist[:BINS], 0)
        i = int(torch.searchsorted(cum, torch.tensor(half - zeros, dtype=torch.float64)))
        return 2 ** (LOG2_LO + (i + 0.5) / PER_OCTAVE)  # the bin's geometric middle

    def summary(self) -> dict:
        med = self.median()
        return {"max": self.max, "median": med, "ratio": self.max / med if med > 0 else math.inf,
                "elements": self.count}


def kurtosis(w: torch.Tensor) -> float:
    """Pearson kurtosis E[(w - mean)^4] / var^2 of all elements (3 for a Gaussian), in float64."""
    x = w.detach().double().flatten()
    d = x - x.mean()
    var = float((d * d).mean())
    return float((d ** 4).mean()) / (var * var) if var > 0 else math.nan


LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _layer_and_kind(name: str) -> tuple[int, str] | None:
    m = LAYER.search(name)
    if not m:
        return None
    rest = name[m.end():]
    return int(m.group(1)), rest


def _skipped(name: str, ignore: list[str]) -> bool:
    for p in ignore:
        if p.startswith("re:") and re.match(p[3:], name):
            return True
        if not p.startswith("re:") and (name == p or name.endswith("." + p)):
            return True
    return False


def fused_experts(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(getattr(m, "gate_up_proj", None), torch.nn.Parameter) and m.gate_up_proj.dim() == 3
            and isinstance(getattr(m, "down_proj", None), torch.nn.Parameter)}


def measured_modules(model, ignore: list[str]):
    """(name, module, layer, kind, is_fused) for every projection of a decoder layer that is not ignored:
    Linear layers, and fused expert modules (3D gate_up_proj / down_proj parameters)."""
    fused = fused_experts(model)
    for name, m in model.named_modules():
        lk = _layer_and_kind(name)
        if lk is None or _skipped(name, ignore):
            continue
        if isinstance(m, torch.nn.Linear) or name in fused:
            yield (name, m, *lk, name in fused)


def weight_stats(model, ignore: list[str]) -> dict[int, dict]:
    """Kurtosis per layer: each Linear's weight; fused experts' per expert (mean and max over experts)."""
    out: dict[int, dict] = {}
    for name, m, layer, kind, is_fused in measured_modules(model, ignore):
        if not is_fused:
            out.setdefault(layer, {})[kind] = {"kurtosis": round(kurtosis(m.weight), 3)}
        else:
            for pname in ("gate_up_proj", "down_proj"):
                p = getattr(m, pname)
                ks = [kurtosis(p[e]) for e in range(p.shape[0])]
                out.setdefault(layer, {})[f"{kind}.{pname}"] = {
                    "kurtosis_mean": round(sum(ks) / len(ks), 3), "kurtosis_max": round(max(ks), 3),
                    "worst_expert": max(range(len(ks)), key=ks.__getitem__)}
    return out


@torch.no_grad()
def activation_stats(model, samples: list[list[int]], ignore: list[str], batch: int = 4) -> dict[int, dict]:
    """max|x| / median|x| per layer of each projection's input over the samples (lists of token ids)."""
    stats: dict[tuple[int, str], MagnitudeStats] = {}
    handles = []

    def record(layer, kind, x):
        stats.setdefault((layer, kind), MagnitudeStats()).add(x)

    def linear_hook(layer, kind):
        return lambda module, args: record(layer, kind, args[0])

    def experts_hook(layer, kind):
        def fn(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            hidden = hidden.reshape(-1, hidden.shape[-1])
            record(layer, f"{kind}.gate_up_proj", hidden)
            act = getattr(module, "act_fn", torch.nn.functional.silu)
            for e in torch.unique(top_k_index).tolist():
                if e < 0 or e >= module.gate_up_proj.shape[0]:
                    continue
                tokens = (top_k_index == e).any(-1).nonzero().flatten()
                gate, up = torch.nn.functional.linear(hidden[tokens], module.gate_up_proj[e]).chunk(2, dim=-1)
                record(layer, f"{kind}.down_proj", act(gate) * up)
        return fn

    seen_shared: dict[int, str] = {}
    for name, m, layer, kind, is_fused in measured_modules(model, ignore):
        if not is_fused:
            # q, k and v read one input: measure it once, as the attention input
            if re.search(r"(^|\.)(q|k|v)_proj$", kind):
                if seen_shared.get(layer) is not None:
                    continue
                seen_shared[layer] = kind
                kind = re.sub(r"(q|k|v)_proj$", "qkv_proj", kind)
            handles.append(m.register_forward_pre_hook(linear_hook(layer, kind)))
        else:
            handles.append(m.register_forward_pre_hook(experts_hook(layer, kind), with_kwargs=True))
    device = next(model.parameters()).device
    try:
        model.eval()
        for i in range(0, len(samples), batch):
            model(input_ids=torch.tensor(samples[i:i + batch], device=device))
    finally:
        for h in handles:
            h.remove()
    out: dict[int, dict] = {}
    for (layer, kind), s in sorted(stats.items()):
        summary = s.summary()
        out.setdefault(layer, {})[kind] = {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v)
                                           for k, v in summary.items()}
    return out


def measure(model, samples: list[list[int]], ignore: list[str]) -> dict:
    acts = activation_stats(model, samples, ignore)
    weights = weight_stats(model, ignore)
    layers = [{"layer": i, "activations": acts.get(i, {}), "weights": weights.get(i, {})}
              for i in sorted(set(acts) | set(weights))]
    worst = max(((v["ratio"], i, k) for i, a in acts.items() for k, v in a.items()), default=None)
    worst_k = max(((v.get("kurtosis", v.get("kurtosis_max")), i, k) for i, w in weights.items() for k, v in w.items()),
                  default=None)
    return {"tokens": sum(map(len, samples)), "layers": layers,
            "summary": {"max_activation_ratio": {"ratio": worst[0], "layer": worst[1], "input": worst[2]} if worst else None,
                        "max_weight_kurtosis": {"kurtosis": worst_k[0], "layer": worst_k[1], "weight": worst_k[2]}
                        if worst_k else None}}


def heldout_samples(model_path, tok, n_tokens: int, seq_len: int) -> tuple[list[list[int]], str]:
    """Windows of held-out text: the model's own held-out split when it was built from a manifest corpus,
    else the standard library's held-out split (never seen by tiny, nor used to calibrate)."""
    from pathlib import Path

    from moeq import corpus
    manifest_file = Path(model_path) / "corpus-manifest.tsv.gz"
    if manifest_file.is_file():
        manifest = corpus.read_manifest(manifest_file)
        texts, where = corpus.manifest_texts(manifest, "heldout", max_chars=8 * n_tokens), "its own held-out split"
    else:
        texts, where = corpus.texts("heldout", max_chars=8 * n_tokens), "the standard library's held-out split"
    ids = []
    for enc in tok(texts)["input_ids"]:
        ids.extend(enc)
        ids.append(tok.eos_token_id if tok.eos_token_id is not None else 0)
    n = min(len(ids), n_tokens) // seq_len
    if n == 0:
        raise ValueError(f"held-out text gave {len(ids)} tokens, fewer than one window of {seq_len}")
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(n)], where
