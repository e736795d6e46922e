"""How far a quantized checkpoint's predictions moved from its BF16 base, on held-out text.

The checkpoint is decompressed by compressed-tensors into a BF16 copy and both run through
transformers: this measures weight error (activations stay BF16). A load is only trusted when these
numbers say so: transformers' own loader can leave MoE experts at random init with only a warning.
"""
import tempfile
from pathlib import Path

import torch

from moeq import corpus
from moeq.quantize.dequantize import dequantize


def heldout_windows(tokenizer, n: int, seq_len: int) -> torch.Tensor:
    ids = []
    for text in corpus.texts("heldout"):
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= n * seq_len:
            break
    return torch.tensor(ids[:n * seq_len]).view(n, seq_len)


@torch.no_grad()
def log_probs(path: Path, windows: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    return torch.cat([model(input_ids=w[None]).logits.float().log_softmax(-1) for w in windows])


def compare(base: Path, ckpt: Path, n: int = 8, seq_len: int = 256) -> dict:
    from transformers import AutoTokenizer
    windows = heldout_windows(AutoTokenizer.from_pretrained(base), n, seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        quant_lp = log_probs(dequantize(Path(ckpt), Path(tmp) / "bf16", log=lambda *_: None), windows)
    base_lp = log_probs(Path(base), windows)
    targets = windows[:, 1:].reshape(-1)
    pick = lambda lp: -lp[:, :-1].reshape(-1, lp.shape[-1]).gather(1, targets[:, None]).mean()
    kl = (base_lp.exp() * (base_lp - quant_lp)).sum(-1).mean()
    agree = (base_lp.argmax(-1) == quant_lp.argmax(-1)).float().mean()
    return {"tokens": int(targets.numel()), "nll_bf16": float(pick(base_lp)), "nll_quant": float(pick(quant_lp)),
            "delta_nll": float(pick(quant_lp) - pick(base_lp)), "kl": float(kl), "top1_agreement": float(agree)}
