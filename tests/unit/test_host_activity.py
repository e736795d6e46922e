"""A timed cell records what else ran on its host (evaluate/host.py), and the report says so beside the group:
session 11's perf engines shared their host with quantizations and lm-eval engines on the other GPU."""
import sys
import types

import pandas as pd

from moeq.evaluate import host
from moeq.evaluate.report import build, headline


class Handle:
    def __init__(self, uuid, processes, utilization):
        self.uuid, self.processes, self.utilization = uuid, processes, utilization


def nvml(gpus):
    """Stands for NVML on a host of these GPUs (no NVIDIA driver here)."""
    m = types.ModuleType("pynvml")
    m.nvmlInit = lambda: None
    m.nvmlDeviceGetCount = lambda: len(gpus)
    m.nvmlDeviceGetHandleByIndex = lambda i: gpus[i]
    m.nvmlDeviceGetHandleByUUID = lambda u: next(g for g in gpus if g.uuid == u)
    m.nvmlDeviceGetUUID = lambda h: h.uuid
    m.nvmlDeviceGetComputeRunningProcesses = lambda h: h.processes
    m.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=h.utilization)
    return m


def test_only_the_other_gpus_busy_count(monkeypatch):
    gpus = [Handle("GPU-a", ["pid 7"], 0), Handle("GPU-b", ["pid 9"], 95), Handle("GPU-c", [], 3), Handle("GPU-d", [], 0)]
    monkeypatch.setitem(sys.modules, "pynvml", nvml(gpus))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert host.busy_other_gpus() == 2  # a (a process) and c (utilization); b is the engine's own, d idle
    assert host.visible_gpu(sys.modules["pynvml"]) is gpus[1]  # the GPU peak_memory reads
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a,GPU-c")  # a TP=2 engine: both its GPUs are its own
    assert host.busy_other_gpus() == 1 and host.visible_gpu(sys.modules["pynvml"]) is gpus[0]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")  # every GPU is the engine's
    assert host.busy_other_gpus() == 0
    rows = {r["metric"]: r for r in host.activity()}
    assert rows["busy_other_gpus"]["value"] == 0 and rows["host_load"]["value"] >= 0


def test_without_nvml_only_the_load_is_recorded(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails, as on a host without the NVIDIA driver
    assert host.busy_other_gpus() is None
    assert [r["metric"] for r in host.activity()] == ["host_load"]


def perf_rows(busy):
    return pd.DataFrame({"scheme": ["bf16", "fp8", "bf16"], "cell": ["b1", "b1", "b16"], "moe_kernel": ["TRITON"] * 3,
                         "moe_config": [None] * 3, "experts_a16": [False] * 3, "moe_dtype": [None] * 3,
                         "busy_other_gpus": busy, "host_load": [0.4, 1.3, 0.2]})


def test_the_group_caveat_names_the_cells_timed_beside_other_work():
    gkey = {"provenance": "real", "settings": "s"}
    settings = {"s": {"llm": {}, "non_default": {}}}
    said = headline.caveats(gkey, perf_rows([0.0, 1.0, float("nan")]), settings)
    assert any(c.startswith("timed beside work on another GPU of the host: 1 of 2 cells (fp8; host load up to 1.30")
               for c in said), said
    assert not any("beside work" in c for c in headline.caveats(gkey, perf_rows([0.0, 0.0, 0.0]), settings))
    unknown_load = perf_rows([1.0, 1.0, 0.0]).assign(host_load=float("nan"))  # known from a session's logs only
    assert "timed beside work on another GPU of the host: 2 of 3 cells (bf16, fp8): small-batch" in "; ".join(
        headline.caveats(gkey, unknown_load, settings))


def test_a_cell_timed_beside_another_gpus_work_gets_no_verdict_and_no_pick():
    """Its flag (build.shared_host_flag) takes the verdict and the deploy pick away, as a physics flag does;
    a flagged bf16 cell flags every scheme's delta in it (build.perf_table)."""
    row = lambda busy: types.SimpleNamespace(busy_other_gpus=busy)
    assert build.shared_host_flag(row(1.0)).startswith("shared host: timed while 1 other GPU(s) of the host")
    assert build.shared_host_flag(row(0.0)) is None and build.shared_host_flag(row(float("nan"))) is None
    rows = pd.DataFrame({"cell": ["b1"] * 3, "scheme": ["bf16", "fp8", "w8a16"], "delta_pct": [float("nan"), 20.0, 50.0],
                         "delta_lo": [float("nan"), 10.0, 40.0], "delta_hi": [float("nan"), 30.0, 60.0]})
    flags = [build.shared_host_flag(row(b)) for b in (0.0, 0.0, 1.0)]
    assert headline._pick(rows.assign(flag=flags), "b1", ["fp8", "w8a16"])["scheme"] == "fp8"
    pick = headline._pick(rows.assign(flag=[build.shared_host_flag(row(1.0))] * 3), "b1", ["fp8", "w8a16"])
    assert pick["scheme"] is None and pick["why"] == "no speed verdict: shared host"
