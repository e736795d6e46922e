"""The GPU path of the builder, for a registry entry whose `train` block says `device: cuda` (moe-500m).

The same builder as `tiny` (quantize/tiny.py): its byte-level BPE tokenizer, its per-layer
load-balancing loss, its held-out cross-entropy gate against a unigram baseline, its routing count and
its atomic write; what a model of hundreds of millions of parameters trained on hundreds of millions of
tokens needs on top:

- a corpus pinned by a manifest (moeq.corpus.collect / verify): the standard library and the Python
  sources and text documents of the packages the entry names, checked file by file before training;
- bf16 weights with fp32 master weights in a fused AdamW, bf16 autocast, torch.compile of each layer's
  attention and experts (eager if compiling fails), transformers' grouped_mm experts;
- a token budget and a time budget: the plan (steps of batch x seq_len tokens) shrinks to what fits in
  `max_train_seconds` once the steady rate is known, and the build records the tokens it saw;
- tokens/s and MFU (6 x active parameters x tokens/s over the device's bf16 peak, core/devices.yaml);
- held-out bits per byte against a unigram model and against `tiny` when tiny is built, on the
  held-out standard-library files (tiny's own domain) and the held-out package files apart;
- expert load per layer on held-out text; the build fails if any expert gets under
  `min_expert_share` of its fair share.

Without a CUDA device the build stops at once with a UserError naming the GPU time it needs.
"""
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from moeq import corpus, registry, roofline
from moeq.atomic import is_complete, staged_dir
from moeq.env import cache_root
from moeq.errors import UserError
from moeq.quantize import coverage, tiny

CPU_FLOPS = 1e12  # a generous CPU training rate (FLOP/s), only for the message that says not to


def train_flops(active_params: float, tokens: float) -> float:
    """Training FLOPs by the usual 6 x parameters x tokens (forward 2, backward 4; attention left out)."""
    return 6.0 * active_params * tokens


def mfu(active_params: float, tokens_per_s: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: the FLOP/s the 6ND count implies over the device's dense bf16 peak."""
    if not peak_tflops:
        return None
    return train_flops(active_params, tokens_per_s) / (peak_tflops * 1e12)


def active_params(config) -> tuple[int, int]:
    """(total, active per token) parameters of a MoE config, counted from a meta-device model: active =
    everything but the experts and the input embedding (a row lookup, no FLOPs), plus top_k experts."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return count_active(model, config)


def count_active(model, config) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    embed = model.get_input_embeddings().weight.numel()
    n_exp = registry.experts_per_layer(config)
    return total, int(total - experts - embed + experts * config.num_experts_per_tok / n_exp)


def peak_bf16_tflops(device_name: str) -> float | None:
    entry = roofline.match_device(device_name)
    return entry["tflops"]["bf16"] if entry else None


def require_gpu(name: str, spec: dict) -> None:
    """A model trained on a GPU is refused at once where there is none: never a days-long CPU run."""
    if torch.cuda.is_available():
        return
    train = spec["train"]
    from moeq.quantize.tiny import build_config
    _, active = active_params(build_config(spec))
    hours = train_flops(active, train["tokens"]) / CPU_FLOPS / 3600
    raise UserError(
        f"{name} is built on a CUDA GPU, and this machine has none (torch {torch.__version__}: no CUDA device). "
        f"On one H200 the build takes about {train.get('expected_gpu_minutes', '?')} minutes "
        f"({train['tokens'] / 1e6:.0f}M tokens in at most {train['max_train_seconds'] / 60:.0f} minutes of training, "
        f"plus corpus, tokenizer and evaluation); on this CPU it would take over {hours:.0f} hours. Build it on a GPU "
        f"machine (`moeq build {name}` there, or `bash reports/h200/device.sh install build={name}`) and use the "
        f"folder it writes, or use MODEL=tiny here.")


def pinned_manifest_path(train: dict) -> Path | None:
    rel = train.get("corpus", {}).get("manifest")
    return Path(corpus.__file__).parent / rel if rel else None


def load_corpus(train: dict, log=print) -> dict:
    """The pinned manifest, checked against this machine's files; or, when none is pinned yet, a new one
    made from the packages here (written to the pinned path so that later builds check against it)."""
    spec = train["corpus"]
    pinned = pinned_manifest_path(train)
    if pinned is not None and pinned.is_file():
        manifest = corpus.read_manifest(pinned)
        corpus.verify(manifest)  # UserError naming what differs
        log(f"[build] corpus: {len(manifest['files']):,} files as pinned by {pinned.name}, all unchanged")
        return manifest
    manifest = corpus.collect(list(dict.fromkeys(spec.get("packages", []))), stdlib=spec.get("stdlib", True), log=log)
    if pinned is not None:
        try:
            corpus.write_manifest(manifest, pinned)
            log(f"[build] corpus: no manifest was pinned; made {pinned} from this machine's packages "
                f"(commit it to pin the split)")
        except OSError as e:
            log(f"[build] corpus: could not write {pinned} ({e}); the manifest is saved with the model")
    return manifest


def tokenizer_sample(texts: list[str], max_chars: int) -> list[str]:
    """Every k-th text, k chosen so the sample is about max_chars: spread over the whole split, deterministic."""
    total = sum(map(len, texts))
    k = max(1, math.ceil(total / max_chars))
    return texts[::k]


def encode(tok, texts: list[str], chunk: int = 256) -> torch.Tensor:
    """Token ids of the texts, an end-of-text id after each, as one int64 tensor (built in numpy pieces)."""
    eos = np.array([tok.eos_token_id], dtype=np.int32)
    parts = []
    for i in range(0, len(texts), chunk):
        for enc in tok.backend_tokenizer.encode_batch(texts[i:i + chunk]):
            parts.append(np.asarray(enc.ids, dtype=np.int32))
            parts.append(eos)
    return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, np.int32)).long()


def token_bytes(tok) -> torch.Tensor:
    """Bytes each token id stands for: a byte-level BPE token's characters map one to one onto bytes;
    special tokens stand for none."""
    table = torch.zeros(len(tok), dtype=torch.long)
    for token, i in tok.get_vocab().items():
        table[i] = len(token)
    table[tok.all_special_ids] = 0
    return table


@torch.no_grad()
def score(model, ids: torch.Tensor, seq_len: int, max_tokens: int, batch: int = 16) -> tuple[float, torch.Tensor]:
    """Summed next-token NLL (nats) over whole windows of `ids` (at most max_tokens targets), and the targets."""
    model.eval()
    n = min(len(ids) - 1, max_tokens) // seq_len * seq_len
    x = ids[:n].view(-1, seq_len)
    y = ids[1:n + 1].view(-1, seq_len)
    device = next(model.parameters()).device
    total = 0.0
    for i in range(0, len(x), batch):
        logits = model(input_ids=x[i:i + batch].to(device)).logits.float()
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[i:i + batch].to(device).flatten(),
                                                         reduction="sum"))
    return total, y.flatten()


def bits_per_byte(nats: float, n_bytes: int) -> float:
    return nats / math.log(2) / n_bytes


def heldout_groups(manifest: dict, max_chars: int) -> dict[str, list[str]]:
    """Held-out texts by where they came from: the standard library (tiny's domain) and the packages."""
    groups = {"stdlib": [], "packages": []}
    sizes = {"stdlib": 0, "packages": 0}
    for e in manifest["files"]:
        if e["split"] != "heldout":
            continue
        g = "stdlib" if e["root"] == "stdlib" else "packages"
        if sizes[g] >= max_chars:
            continue
        text = corpus.locate(e).read_text(encoding="utf-8", errors="replace")
        groups[g].append(text)
        sizes[g] += len(text)
    return {g: t for g, t in groups.items() if t}


def bpb_table(model, tok, groups: dict[str, list[str]], seq_len: int, unigram_logp: torch.Tensor | None = None) -> dict:
    """Bits per byte of `model` (and of a unigram model, when given its log-probabilities) per text group."""
    table = token_bytes(tok)
    out = {}
    for g, texts in groups.items():
        ids = encode(tok, texts)
        nats, targets = score(model, ids, seq_len, max_tokens=len(ids))
        n_bytes = int(table[targets].sum())
        row = {"tokens": len(targets), "bytes": n_bytes, "bpb": round(bits_per_byte(nats, n_bytes), 4)}
        if unigram_logp is not None:
            row["unigram_bpb"] = round(bits_per_byte(float(-unigram_logp[targets].sum()), n_bytes), 4)
        out[g] = row
    return out


def tiny_bpb(groups: dict[str, list[str]], device, log=print) -> dict | None:
    """tiny's bits per byte on the same held-out texts, when tiny is built (never builds it)."""
    path = cache_root() / "models" / "tiny"
    if not is_complete(path):
        log(f"[build] tiny is not built ({path}): no comparison with it")
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    tok = AutoTokenizer.from_pretrained(path)
    seq = registry.registry()["tiny"]["train"]["seq_len"]
    return bpb_table(model, tok, groups, seq)


def layer_shares(summary: dict) -> dict[str, float]:
    """Per MoE layer: the least-used expert's tokens as a share of a fair share."""
    fair = summary["fair_share"]
    return {name: min(c) / fair for name, c in summary["routed"].items()}


def check_expert_shares(shares: dict[str, float], floor: float) -> None:
    low = {n: s for n, s in shares.items() if s < floor}
    if low:
        worst = ", ".join(f"{n} {100 * s:.1f}%" for n, s in sorted(low.items(), key=lambda kv: kv[1])[:4])
        raise RuntimeError(f"routing is not balanced: in {len(low)} MoE layer(s) an expert gets under "
                           f"{100 * floor:.0f}% of its fair share of held-out tokens ({worst})")


def compile_targets(model) -> list[torch.nn.Module]:
    """What torch.compile compiles: each layer's attention and its fused experts, where the FLOPs are. The
    router stays eager: transformers records its logits (output_router_logits) through a hook that reads a
    ContextVar, which dynamo cannot trace, and it is one small matmul."""
    return [m for n, m in model.named_modules()
            if n.endswith("self_attn") or isinstance(getattr(m, "gate_up_proj", None), torch.nn.Parameter)]


def uncompile(modules) -> None:
    for m in modules:
        m._compiled_call_impl = None


class Plan:
    """Steps of the run and the learning rate at each: 5% warm-up then cosine, as tiny; the step count can
    shrink once (to what fits the time budget) while warm-up holds."""

    def __init__(self, steps: int):
        self.steps = steps
        self.warmup = max(1, steps // 20)

    def lr_factor(self, s: int) -> float:
        return min(1.0, (s + 1) / self.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, self.steps) / self.steps))

    def fit(self, step: int, elapsed: float, steady_rate: float, budget: float) -> int | None:
        """Shrink to the steps that end by `budget` seconds at `steady_rate` steps/s; the new count, or None."""
        fits = step + int(max(0.0, budget - elapsed) * steady_rate)
        if fits >= self.steps:
            return None
        self.steps = max(step + 1, fits)
        return self.steps


def build(name: str, spec: dict, out: Path, log=print, device: str | None = None, manifest: dict | None = None) -> dict:
    """Train `spec` on `device` (default: its train block's) and write the checkpoint to `out` atomically.

    `manifest` (tests) replaces the registry's corpus; a CPU device is for smoke tests of this path."""
    from transformers import AutoModelForCausalLM

    train = dict(spec["train"])
    device = device or train.get("device", "cuda")
    if device == "cuda":
        require_gpu(name, spec)
    t0 = time.time()
    timings = {}
    torch.manual_seed(train["seed"])
    source = tiny.tokenizer_source(spec)
    if manifest is None and source is not None:  # a draft trains on exactly its target's corpus
        tiny.ensure_built(source, log)
        manifest = corpus.read_manifest(source.path / "corpus-manifest.tsv.gz")
        corpus.verify(manifest)
    elif manifest is None:
        manifest = load_corpus(train, log)
    else:
        corpus.verify(manifest)
    summary = corpus.manifest_summary(manifest)
    log(f"[build {name}] corpus: {len(manifest['files']):,} files, {summary['bytes'] / 1e6:,.1f} MB "
        f"(train {summary['splits']['train']['bytes'] / 1e6:,.1f} MB; fingerprint {summary['fingerprint']})")
    timings["corpus_s"] = round(time.time() - t0, 1)
    use_cuda = device.startswith("cuda")
    bf16 = train.get("dtype", "float32") in ("bfloat16", "bf16")
    with staged_dir(out) as tmp:
        corpus.write_manifest(manifest, tmp / "corpus-manifest.tsv.gz")
        t = time.time()
        train_texts = corpus.manifest_texts(manifest, "train")
        tok = tiny.shared_tokenizer(spec, tmp, log) or tiny.train_tokenizer(
            spec["config"]["vocab_size"], tmp, texts=tokenizer_sample(train_texts, train.get("tokenizer_chars", 50_000_000)))
        timings["tokenizer_s"] = round(time.time() - t, 1)
        t = time.time()
        train_ids = encode(tok, train_texts)
        del train_texts
        held_ids = encode(tok, corpus.manifest_texts(manifest, "heldout"))
        timings["encode_s"] = round(time.time() - t, 1)
        n_bytes = summary["splits"]["train"]["bytes"]
        log(f"[build {name}] tokenizer: vocab {len(tok)}, {len(train_ids):,} train / {len(held_ids):,} held-out "
            f"tokens ({n_bytes / max(1, len(train_ids)):.2f} bytes/token; {timings['tokenizer_s']:.0f}s + "
            f"{timings['encode_s']:.0f}s)")

        config = tiny.build_config(spec)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                 **({"experts_implementation": train["experts_implementation"]}
                                                    if "experts_implementation" in train else
                                                    {"experts_implementation": "grouped_mm"} if use_cuda and bf16 else {}))
        n_params, n_active = count_active(model, config)
        seq, bsz = train["seq_len"], train["batch"]
        step_tokens = seq * bsz
        plan = Plan(train.get("steps") or max(1, train["tokens"] // step_tokens))
        dev_name = torch.cuda.get_device_name() if use_cuda else "cpu"
        peak = peak_bf16_tflops(dev_name) if use_cuda else None
        log(f"[build {name}] {config.model_type}: {n_params / 1e6:.1f}M parameters, {n_active / 1e6:.1f}M active; "
            f"{plan.steps} steps of {bsz}x{seq} tokens ({plan.steps * step_tokens / 1e6:.0f}M tokens, "
            f"{plan.steps * step_tokens / max(1, len(train_ids)):.2f} epochs) on {dev_name}"
            + (f" (bf16 peak {peak:.0f} TFLOP/s)" if peak else ""))

        model.to(device)
        params = list(model.parameters())
        master = [p.detach().clone().requires_grad_(True) for p in params] if bf16 else params
        if bf16:
            model.to(torch.bfloat16)
            params = list(model.parameters())
        opt = torch.optim.AdamW(master, lr=train["lr"], betas=(0.9, 0.95), weight_decay=0.1,
                                **({"fused": True} if use_cuda else {}))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, plan.lr_factor)
        compiled = bool(train.get("compile")) and use_cuda
        to_compile = compile_targets(model)
        if compiled:
            for m in to_compile:
                m.compile(dynamic=False)
        gen = torch.Generator().manual_seed(train["seed"])
        ids_dev = train_ids.to(device)
        offsets = torch.arange(seq + 1, device=device)
        autocast = torch.autocast("cuda" if use_cuda else "cpu", dtype=torch.bfloat16, enabled=bf16)
        k = config.num_experts_per_tok

        def step_once(batch):
            with autocast:
                out_ = model(input_ids=batch[:, :-1], output_router_logits=True)
                token_ce = torch.nn.functional.cross_entropy(out_.logits.flatten(0, 1).float(), batch[:, 1:].flatten())
                balance = tiny.balance_loss(out_.router_logits, k)
            (token_ce + config.router_aux_loss_coef * balance).backward()
            return token_ce, balance

        def sync():
            if use_cuda:
                torch.cuda.synchronize()

        model.train()
        t_train = time.time()
        t_mark, step_mark, first_step_s, steady = t_train, 0, None, None
        log_every = max(1, plan.steps // 25)
        step, cut = 0, False
        hard_stop = 1.1 * train["max_train_seconds"] if train.get("max_train_seconds") else math.inf
        while step < plan.steps:
            if step and step % 10 == 0 and time.time() - t_train > hard_stop:  # slowed after the plan was fitted
                cut = True
                log(f"[build {name}] stopped at step {step}/{plan.steps}: past 110% of the time budget")
                break
            starts = torch.randint(0, len(train_ids) - seq - 2, (bsz,), generator=gen).to(device)
            batch = ids_dev[starts[:, None] + offsets]
            try:
                token_ce, balance = step_once(batch)
            except Exception as e:  # torch.compile failing on this stack: train eagerly rather than not at all
                if not compiled or step > 0:
                    raise
                log(f"[build {name}] torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                    f"training eagerly")
                uncompile(to_compile)
                compiled = False
                model.zero_grad(set_to_none=True)
                token_ce, balance = step_once(batch)
            if bf16:
                for m, p in zip(master, params):
                    m.grad = None if p.grad is None else p.grad.float()
                    p.grad = None
            torch.nn.utils.clip_grad_norm_(master, 1.0)
            opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
            if bf16:
                with torch.no_grad():
                    torch._foreach_copy_(params, master)
            step += 1
            if step == 1:
                sync()
                first_step_s = time.time() - t_train  # compile included
                t_mark, step_mark = time.time(), 1
            if step == min(31, plan.steps) and steady is None and step > 1:
                sync()
                steady = (step - step_mark) / (time.time() - t_mark)  # steps/s after the first step
                budget = train.get("max_train_seconds")
                if budget:
                    shrunk = plan.fit(step, time.time() - t_train, steady, budget)
                    if shrunk:
                        log(f"[build {name}] at {steady * step_tokens:,.0f} tok/s the {train['tokens'] / 1e6:.0f}M-token "
                            f"plan does not fit {budget}s: training {shrunk} steps "
                            f"({shrunk * step_tokens / 1e6:.0f}M tokens) instead")
            if step % log_every == 0 or step == plan.steps:
                sync()
                now = time.time()
                rate = (step - step_mark) * step_tokens / max(1e-9, now - t_mark) if step > 1 else step_tokens / first_step_s
                u = mfu(n_active, rate, peak)
                log(f"[build {name}] step {step}/{plan.steps} loss {token_ce.item():.3f} balance {balance.item():.2f} "
                    f"lr {sched.get_last_lr()[0]:.2e} ({rate:,.0f} tok/s" + (f", MFU {100 * u:.1f}%" if u else "")
                    + f", {now - t_train:.0f}s)")
        sync()
        train_s = time.time() - t_train
        seen = step * step_tokens
        steady_rate = (step - step_mark) * step_tokens / max(1e-9, time.time() - t_mark) if step > 1 else seen / train_s
        timings.update(train_s=round(train_s, 1), first_step_s=round(first_step_s or 0.0, 1))
        u = mfu(n_active, steady_rate, peak)
        log(f"[build {name}] trained on {seen / 1e6:.1f}M tokens in {train_s:.0f}s: {steady_rate:,.0f} tok/s after the "
            f"first step ({first_step_s:.0f}s with compiling)" + (f", MFU {100 * u:.1f}%" if u else "")
            + f"; {seen / max(1, len(train_ids)):.2f} epochs of the train split")

        uncompile(to_compile)  # evaluation runs other shapes: eager rather than compiling again
        model = model.to(torch.bfloat16)
        model.config.dtype = "bfloat16"
        t = time.time()
        nats, targets = score(model, held_ids, seq, train["eval_tokens"])
        ce = nats / len(targets)
        counts = torch.bincount(train_ids, minlength=len(tok)).double() + 1.0
        uni_logp = (counts / counts.sum()).log()
        base = float(-uni_logp[targets].mean())
        ratio = ce / base
        groups = heldout_groups(manifest, max_chars=4 * train["eval_tokens"])
        bpb = {"model": bpb_table(model, tok, groups, seq, uni_logp.to(torch.float64))}
        tiny_table = tiny_bpb(groups, device, log) if name != "tiny" else None
        if tiny_table:
            bpb["tiny"] = tiny_table
        windows = held_ids[:64 * seq].view(-1, seq).tolist()
        routing = coverage.count_routing(model, windows, spec.get("ignore", []))
        shares = layer_shares(routing)
        timings["eval_s"] = round(time.time() - t, 1)
        stats = {"model": name, "spec_sha256": tiny.spec_sha256(spec), "tokenizer_sha256": tiny.tokenizer_sha256(spec),
                 "params": n_params, "active_params": n_active,
                 "steps": step, "cut_short": cut,
                 "planned_tokens": train.get("tokens"), "train_tokens_seen": seen,
                 "train_tokens_unique": len(train_ids), "epochs": round(seen / max(1, len(train_ids)), 3),
                 "tokens_per_s": round(steady_rate), "mfu": round(u, 4) if u else None,
                 "device": dev_name, "peak_bf16_tflops": peak, "compiled": compiled, "dtype": "bfloat16" if bf16 else "float32",
                 "heldout_ce": round(ce, 4), "unigram_ce": round(base, 4), "ce_ratio": round(ratio, 4),
                 "bits_per_byte": bpb, "min_expert_share_of_fair": round(min(shares.values()), 3),
                 "expert_share_per_layer": {n: round(s, 3) for n, s in shares.items()},
                 "timings": timings, "build_seconds": round(time.time() - t0, 1),
                 "corpus": {"fingerprint": summary["fingerprint"], "python": summary["python"],
                            "packages": manifest["packages"], "missing": manifest["missing"],
                            "splits": summary["splits"]}}
        log(f"[build {name}] held-out cross-entropy {ce:.3f} nats/token vs unigram {base:.3f} -> {100 * ratio:.1f}% "
            f"(must be <= {100 * train['max_ce_ratio']:.0f}%)")
        for g, row in bpb["model"].items():
            vs_tiny = f", tiny {bpb['tiny'][g]['bpb']:.3f}" if tiny_table and g in tiny_table else ""
            log(f"[build {name}] held-out {g}: {row['bpb']:.3f} bits/byte (unigram {row['unigram_bpb']:.3f}{vs_tiny}; "
                f"{row['bytes']:,} bytes)")
        log(f"[build {name}] least-used expert per layer (share of fair, held-out): "
            + " ".join(f"{100 * s:.0f}%" for s in shares.values()))
        (tmp / "moeq_build.json").write_text(json.dumps(stats, indent=2))
        # beside the folder too, so that a build failing the checks below still leaves its numbers
        (Path(out).parent / f"{Path(out).name}.build.json").write_text(json.dumps(stats, indent=2))
        if ratio > train["max_ce_ratio"]:
            raise RuntimeError(f"{name} did not learn enough: held-out CE is {100 * ratio:.1f}% of unigram")
        check_expert_shares(shares, train.get("min_expert_share", 0.05))
        model.save_pretrained(tmp)
    return stats
