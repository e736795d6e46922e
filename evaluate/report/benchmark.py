"""A claim read from the JSON a benchmark script wrote beside the ledger (claims.yaml `benchmark:`), e.g.
"fused MoE kernels: +12-18%" from benchmarks/fused_moe.py: one MoE layer stack timed per implementation."""
from moeq import roofline
from moeq.evaluate.report import verdicts


def benchmark_rows(claim: dict, benchmarks: dict) -> list[dict]:
    """A benchmark claim (`benchmark: {file, variant, reference}`) read from the JSON a benchmark script wrote
    (benchmarks/fused_moe.py: per implementation and batch, the timed runs of one MoE layer stack), one group
    per run: `fused_moe.json` and `fused_moe-<run>.json` (merge-back.sh names a device session's run so), as two
    leases of one GPU model need not agree (sessions 14 and 15: vLLM's kernel 16% apart at batch 64).
    Speedup = variant / reference tokens per second, bootstrap over the runs. A reduced shape or a CPU run is a
    test of the script: shown, with no verdict. An implementation that did not run says why."""
    spec = claim["benchmark"]
    stem = spec["file"].removesuffix(".json")
    return [row for name, data in sorted(benchmarks.items()) if name == spec["file"] or
            (name.startswith(f"{stem}-") and name.endswith(".json")) for row in _run_rows(spec, name, data)]


def _run_rows(spec: dict, name: str, data: dict) -> list[dict]:
    got = {(r["impl"], r["batch"]): r for r in data["results"]}
    where = {"model": data["model"], "provenance": "shape-only", "device": data["device"], "scheme": "bf16",
             "backend": ", ".join(f"{k} {v}" for k, v in data["libraries"].items() if v),
             "settings": name, "variant": spec["variant"], "reference": spec["reference"]}
    caveat = ("reduced shape (hidden and expert width / 16): a test of the script, not the claim" if data.get("reduced")
              else "CPU run: the claim speaks of GPU serving" if data["device"].startswith("cpu") else None)
    out = []
    for (impl, batch), v in sorted(got.items(), key=lambda kv: kv[0][1]):
        r = got.get((spec["reference"], batch))
        if impl != spec["variant"] or r is None:
            continue
        point, lo, hi = verdicts.ratio_of_medians([batch / t for t in v["ms_runs"]], [batch / t for t in r["ms_runs"]])
        note = (f"one stack of {data['layers']} MoE layers ({data['shape']['hidden_size']} hidden, "
                f"{data['shape']['intermediate_size']} expert width, {data['dtype']}), one decode step; "
                f"{v['ms_median']:.3f} vs {r['ms_median']:.3f} ms{_host(data)}{_floor(data, batch, v, r)}"
                f"{_unsteady(v, r)}; an end-to-end gain is at most this, scaled by the MoE layers' share of a step")
        if v.get("max_rel_err_vs_eager") is not None and impl != "eager":  # how far the outputs agree, and why not
            agree = v.get("routing_agreement_vs_eager")
            note += (f"; output vs eager: max error {v['max_rel_err_vs_eager']:.1%} of the largest output"
                     + (f", routing {agree:.1%} as eager's" if agree is not None else ", routing not compared"))
        out.append(where | {"cell": f"b{batch}", "value": 1 + point / 100, "lo": 1 + lo / 100, "hi": 1 + hi / 100,
                            "note": note} | ({"flag": caveat, "note": f"{caveat}; {note}"} if caveat else {}))
    not_run = [f"{k}: {why}" for k, why in (data.get("not_run") or {}).items() if k.startswith(spec["variant"])]
    if not out and not_run:
        out.append(where | {"cell": "-", "note": f"{name}: not run: " + "; ".join(not_run)})
    return out


def _host(data: dict) -> str:
    """Where the run was timed (written since session 15): the host and the GPU's clocks during the runs."""
    host = data.get("host") or {}
    clocks = host.get("sm_clock_mhz")
    return ((f" on {host['name']}" if host.get("name") else "") + (f", {host['cpu']}" if host.get("cpu") else "")
            + (f" (SM clock {clocks} MHz)" if clocks else ""))


def _floor(data: dict, batch: int, v: dict, r: dict) -> str:
    """The step's memory floor: the expert weights its routing reaches, read once at the GPU's peak bandwidth.
    A time near it is the kernel's; far above it at batch 1, the host launching kernels (sessions 14-16: eager
    at batch 1 took 2.9 ms on one host and 5.6 on another, against a 0.59 ms floor)."""
    device, shape = roofline.match_device(data["device"]), data["shape"]
    if device is None or data["device"].startswith("cpu") or "num_local_experts" not in shape:
        return ""
    hit = v.get("experts_hit_per_layer")  # measured since session 17; before, what balanced routing reaches
    expected = hit is None
    if expected:
        hit = roofline.experts_touched(shape["num_local_experts"], shape["num_experts_per_tok"], batch)
    gb = data["layers"] * hit * 3 * shape["hidden_size"] * shape["intermediate_size"] * 2 / 1e9  # BF16 gate, up, down
    floor = 1e3 * gb / device["memory_bandwidth_GBps"]
    return (f"; memory floor {floor:.3f} ms ({hit:.2f} experts per layer{', expected' if expected else ''}: {gb:.2f} GB "
            f"at {device['memory_bandwidth_GBps']:,} GB/s): {v['impl']} at {floor / v['ms_median']:.0%} of the "
            f"bandwidth, {r['impl']} at {floor / r['ms_median']:.0%}")


def _unsteady(*rows: dict) -> str:
    """Runs of one implementation that are not steady (session 16: eager at batch 64 went 13.5 -> 9.5 ms mid-run,
    right after a vLLM engine had exited): the median hides it, so say it."""
    wide = [f"{x['impl']} {min(x['ms_runs']):.2f}-{max(x['ms_runs']):.2f} ms" for x in rows
            if max(x["ms_runs"]) > 1.25 * min(x["ms_runs"])]
    return f"; runs not steady: {', '.join(wide)}" if wide else ""
