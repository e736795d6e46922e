"""What a timing depends on besides the GPU: the host's CPU, and what else ran on the host meanwhile.

A small model's steps are mostly vLLM's Python scheduling, so its rows time the host as much as the GPU:
session 10's host (another kernel build) timed moe-500m ~30% slower than session 11's, and session 11's
perf engines, beside quantizations and lm-eval engines on the host's other GPU, spread 10-39% against
1.3-3.5% alone (reports/h200/NOTES.md)."""
import os
import platform
from pathlib import Path


def host_cpu() -> str:
    """The host's CPU model and core count."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
               platform.processor() or "cpu")
    return f"{cpu} x{os.cpu_count()}"


def _handle(pynvml, name: str):
    """NVML's handle of one CUDA_VISIBLE_DEVICES entry (an index or a UUID); None for an index NVML lacks."""
    if name.startswith(("GPU-", "MIG-")):
        return pynvml.nvmlDeviceGetHandleByUUID(name)
    return pynvml.nvmlDeviceGetHandleByIndex(int(name)) if name.isdigit() and int(name) < pynvml.nvmlDeviceGetCount() else None


def visible_gpu(pynvml):
    """NVML's handle of the first GPU this process sees. NVML numbers GPUs by PCI bus and ignores
    CUDA_VISIBLE_DEVICES, so index 0 would be another process's GPU when streams share a host."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return _handle(pynvml, first if first.startswith(("GPU-", "MIG-")) or first.isdigit() else "0")


def _own_gpus(pynvml) -> set[str]:
    """UUIDs of the GPUs this process may use (all of them when CUDA_VISIBLE_DEVICES is unset)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = ([v.strip() for v in visible.split(",") if v.strip()] if visible is not None
             else [str(i) for i in range(pynvml.nvmlDeviceGetCount())])
    return {pynvml.nvmlDeviceGetUUID(h) for h in (_handle(pynvml, n) for n in names) if h is not None}


def busy_other_gpus() -> int | None:
    """How many of the host's other GPUs run compute work now (a process on it, or any utilization);
    None without NVML (a CPU host)."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:  # no NVML library or no driver: nothing to count
        return None
    own, busy = _own_gpus(pynvml), 0
    for i in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        if pynvml.nvmlDeviceGetUUID(handle) in own:
            continue
        busy += bool(pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                     or pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    return busy


def activity() -> list[dict]:
    """A timed cell's neighbours, as ledger metrics: the host's 1-minute load per core and the busy GPUs
    beside the engine's. Read right after the timed runs (the load average trails by up to a minute)."""
    rows = [{"metric": "host_load", "value": os.getloadavg()[0] / (os.cpu_count() or 1), "unit": "load/core", "n": 1}]
    busy = busy_other_gpus()
    if busy is not None:
        rows.append({"metric": "busy_other_gpus", "value": float(busy), "unit": "GPUs", "n": 1})
    return rows
