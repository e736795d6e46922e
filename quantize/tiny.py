"""Build the embedded MoE models: a byte-level BPE tokenizer and a small MoE trained on the corpus.

Deterministic for a given thread count (fixed seeds, fixed step count), offline, and saved as an
ordinary Hugging Face checkpoint so that transformers, llm-compressor and vLLM load it unchanged. The
build must show the model learnt something: held-out cross-entropy is printed beside a unigram
baseline and the build fails if it does not reach `train.max_ce_ratio` of it. Each MoE layer gets a
load-balancing loss of its own, so that no layer starves an expert.
"""
import json
import math
import os
import time
from pathlib import Path

import torch

from moeq import corpus, identity, registry
from moeq.atomic import folder_lock, is_complete, staged_dir
from moeq.env import env_number
from moeq.errors import UserError
from moeq.quantize import coverage

SPECIAL = ["<s>", "</s>", "<pad>"]


def train_tokenizer(vocab_size: int, out: Path, texts: list[str] | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus.texts("train") if texts is None else texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=2048)
    fast.save_pretrained(out)
    return fast


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tokenizer_source(spec: dict) -> registry.Model | None:
    """The built model whose tokenizer a draft copies (`train.tokenizer_from`), checked against the draft."""
    name = spec["train"].get("tokenizer_from")
    if not name:
        return None
    source = registry.registry().get(name)
    if source is None or "train" not in source:
        built = [n for n, s in registry.registry().items() if "train" in s and n != name]
        raise UserError(f"tokenizer_from {name!r} is not a model moeq builds; valid: {', '.join(built)}")
    if source["config"]["vocab_size"] != spec["config"]["vocab_size"]:
        raise UserError(f"tokenizer_from {name!r}: its vocab_size {source['config']['vocab_size']} differs from "
                        f"the draft's {spec['config']['vocab_size']}; a draft must share its target's vocabulary")
    return registry.resolve(name)


def shared_tokenizer(spec: dict, out: Path, log=print):
    """A draft must tokenize exactly as its target does, so it copies the target's tokenizer (building the
    target first if needed) instead of training one; None for a model that trains its own."""
    source = tokenizer_source(spec)
    if source is None:
        return None
    import shutil
    from transformers import PreTrainedTokenizerFast
    ensure_built(source, log)
    for name in TOKENIZER_FILES:
        if (source.path / name).is_file():
            shutil.copy2(source.path / name, out / name)
    log(f"[build] tokenizer copied from {source.name} ({source.path})")
    return PreTrainedTokenizerFast.from_pretrained(out)


def tokenizer_sha256(spec: dict) -> str | None:
    """Hash of the shared tokenizer's file as its source holds it now (None: the model trains its own)."""
    source = tokenizer_source(spec)
    file = source.path / "tokenizer.json" if source else None
    return identity.text_sha256(file.read_text()) if file and file.is_file() else None


def token_stream(tok, split: str, max_chars: int | None = None) -> torch.Tensor:
    ids = []
    for enc in tok.backend_tokenizer.encode_batch(corpus.texts(split, max_chars)):
        ids.extend(enc.ids)
        ids.append(tok.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def unigram_ce(train_ids: torch.Tensor, heldout_ids: torch.Tensor, vocab: int) -> float:
    counts = torch.bincount(train_ids, minlength=vocab).double() + 1.0  # add-one: no zero probability
    logp = (counts / counts.sum()).log()
    return float(-logp[heldout_ids].mean())


@torch.no_grad()
def heldout_ce(model, ids: torch.Tensor, seq_len: int, max_tokens: int) -> float:
    model.eval()
    n = min(len(ids) - 1, max_tokens) // seq_len * seq_len
    x = ids[:n].view(-1, seq_len)
    y = ids[1:n + 1].view(-1, seq_len)
    total = 0.0
    for i in range(0, len(x), 8):
        logits = model(input_ids=x[i:i + 8]).logits.float()
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[i:i + 8].flatten(), reduction="sum"))
    return total / y.numel()


def balance_loss(router_logits, top_k: int) -> torch.Tensor:
    """The Switch/Mixtral load-balancing loss of each MoE layer, averaged over the layers (top_k when every
    expert gets its fair share). transformers' load_balancing_loss_func pools all layers' routing
    into one distribution, so an expert can starve in one layer while another layer's expert of the same
    index is busy; kept per layer, as Megatron-style MoE training keeps it, no layer can starve one."""
    total = 0.0
    for logits in router_logits:
        probs = logits.float().softmax(-1)
        n = probs.shape[-1]
        routed = torch.nn.functional.one_hot(probs.topk(top_k, dim=-1).indices, n).sum(-2).float().mean(0)
        total = total + n * (routed * probs.mean(0)).sum()
    return total / len(router_logits)


def idle_cores() -> int:
    """Cores that no other process is running on now, at least one. This model's tensors are small: on 2
    cores a second thread made a step 1.65x faster when the machine was quiet (0.37 vs 0.61 s) but slower
    when others ran work on it (1.05 s at best, often far worse), losing more to waiting for the busy core
    than it adds. Busy = the median count of runnable tasks (this one aside) in five looks at /proc/loadavg
    over half a second: a passing shell command does not count, a running job does, and a set-up that has
    just finished does not (the load average still would). The thread
    count changes float rounding and so, slightly, the model (held-out CE 60.4% of unigram on one thread,
    60.1% on two); moeq_build.json records it."""
    try:
        looks = []
        for _ in range(5):
            with open("/proc/loadavg") as f:
                looks.append(int(f.read().split()[3].split("/")[0]) - 1)
            time.sleep(0.1)
        busy = sorted(looks)[2]
    except (OSError, ValueError, IndexError):  # not Linux
        busy = round(os.getloadavg()[0])
    return max(1, (os.cpu_count() or 1) - busy)


def build_config(spec: dict):
    from transformers import AutoConfig
    cfg = dict(spec["config"])
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def build(name: str, spec: dict, out: Path, steps: int | None = None, log=print) -> dict:
    """Train `spec` (a registry entry) and write the checkpoint to `out` atomically."""
    if spec["train"].get("device", "cpu") != "cpu":  # trained on a GPU: quantize/gpubuild.py
        from moeq.quantize import gpubuild
        return gpubuild.build(name, spec, out, log=log)
    from transformers import AutoModelForCausalLM

    train = dict(spec["train"])
    steps = train["steps"] if steps is None else steps
    torch.manual_seed(train["seed"])
    threads = env_number("THREADS", 0, kind=int) or idle_cores()
    torch.set_num_threads(threads)
    t0 = time.time()
    with staged_dir(out) as tmp:
        tok = shared_tokenizer(spec, tmp, log) or train_tokenizer(spec["config"]["vocab_size"], tmp)
        train_ids = token_stream(tok, "train")
        held_ids = token_stream(tok, "heldout")
        log(f"[build {name}] tokenizer: vocab {len(tok)}, {len(train_ids):,} train / {len(held_ids):,} held-out tokens "
            f"({time.time() - t0:.0f}s)")

        config = build_config(spec)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"[build {name}] {config.model_type}: {n_params / 1e6:.2f}M parameters, {steps} steps "
            f"of {train['batch']}x{train['seq_len']} tokens on {threads} thread{'s' * (threads > 1)}")

        opt = torch.optim.AdamW(model.parameters(), lr=train["lr"], betas=(0.9, 0.95), weight_decay=0.1)
        warmup = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        gen = torch.Generator().manual_seed(train["seed"])
        seq, bsz = train["seq_len"], train["batch"]
        model.train()
        t_train = time.time()
        for step in range(steps):
            starts = torch.randint(0, len(train_ids) - seq - 1, (bsz,), generator=gen)
            batch = torch.stack([train_ids[s:s + seq] for s in starts.tolist()])
            out_ = model(input_ids=batch, output_router_logits=True)
            token_ce = torch.nn.functional.cross_entropy(out_.logits[:, :-1].flatten(0, 1).float(),
                                                         batch[:, 1:].flatten())
            balance = balance_loss(out_.router_logits, config.num_experts_per_tok)
            (token_ce + config.router_aux_loss_coef * balance).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
            if step % max(1, steps // 20) == 0 or step == steps - 1:
                rate = (step + 1) * bsz * seq / (time.time() - t_train)
                log(f"[build {name}] step {step + 1}/{steps} loss {token_ce.item():.3f} balance {balance.item():.2f} "
                    f"({rate:,.0f} tok/s)")

        model = model.to(torch.bfloat16)
        model.config.dtype = "bfloat16"
        ce = heldout_ce(model, held_ids, seq, train["eval_tokens"])
        base = unigram_ce(train_ids, held_ids, len(tok))
        ratio = ce / base
        windows = held_ids[:32 * seq].view(-1, seq).tolist()
        share = coverage.count_routing(model, windows, spec.get("ignore", []))["min_share_of_fair"]
        stats = {"model": name, "params": n_params, "steps": steps, "heldout_ce": round(ce, 4),
                 "unigram_ce": round(base, 4), "ce_ratio": round(ratio, 4),
                 "min_expert_share_of_fair": round(share, 3), "train_tokens_seen": steps * bsz * seq,
                 "threads": threads, "build_seconds": round(time.time() - t0, 1),
                 "corpus": {s: corpus.fingerprint(s) for s in corpus.SPLITS}, "spec_sha256": spec_sha256(spec),
                 "tokenizer_sha256": tokenizer_sha256(spec)}
        log(f"[build {name}] held-out cross-entropy {ce:.3f} nats/token vs unigram {base:.3f} "
            f"-> {100 * ratio:.1f}% (must be <= {100 * train['max_ce_ratio']:.0f}%); the least-used expert "
            f"gets {100 * share:.0f}% of a fair share of held-out tokens")
        if steps == train["steps"] and ratio > train["max_ce_ratio"]:
            raise RuntimeError(f"{name} did not learn enough: held-out CE is {100 * ratio:.1f}% of unigram")
        model.save_pretrained(tmp)
        (tmp / "moeq_build.json").write_text(json.dumps(stats, indent=2))
    return stats


def spec_sha256(spec: dict) -> str:
    """What a build depends on in its registry entry: the architecture and the training recipe."""
    return identity.text_sha256(json.dumps({k: spec.get(k) for k in ("config", "train")}, sort_keys=True))


def stale_reason(model: registry.Model) -> str | None:
    """Why a complete cached build no longer matches its registry entry, if it does not."""
    record = model.path / "moeq_build.json"
    stats = json.loads(record.read_text()) if record.is_file() else {}
    built = stats.get("spec_sha256")
    if built != spec_sha256(model.spec):
        return "its registry entry (config or train) changed since it was built" if built else \
            "it was built by a moeq that did not record its registry entry"
    if model.spec["train"].get("tokenizer_from") and stats.get("tokenizer_sha256") != tokenizer_sha256(model.spec):
        return f"the tokenizer of {model.spec['train']['tokenizer_from']} changed since it was built (a draft must share it)"
    return None


def ensure_built(model: registry.Model, log=print) -> Path:
    """The checkpoint folder of `model`, building the embedded models on first use and again whenever the
    cached build was made from another registry entry (checkpoints made from it then no longer match it)."""
    if model.source != "built" or (is_complete(model.path) and not stale_reason(model)):
        return model.path
    if model.spec["train"].get("device", "cpu") != "cpu":
        from moeq.quantize import gpubuild
        gpubuild.require_gpu(model.name, model.spec)  # before any folder or lock: no GPU, a clear error at once
    with folder_lock(model.path, wait=True):  # a second process waits for the first build instead of repeating it
        if not is_complete(model.path) or (reason := stale_reason(model)):
            log(f"[moeq] building {model.name} into {model.path} (once; cached)" if not is_complete(model.path)
                else f"[moeq] rebuilding {model.name}: {reason}")
            build(model.name, model.spec, model.path, log=log)
    return model.path
