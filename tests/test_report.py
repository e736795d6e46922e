"""`moeq report` on a fixed ledger written with the real Ledger: exact verdicts, outputs, HTML in Chromium."""
import json
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from moeq import roofline
from moeq.evaluate.ledger import Ledger
from moeq.evaluate.perf import summarize
from moeq.evaluate.report.build import build_report
from moeq.errors import UserError

MiB = 2**20
H200 = {"model": "tiny", "provenance": "real", "backend": "vllm-cuda", "device": "NVIDIA H200", "settings": "s1"}
CPU = {"model": "tiny", "provenance": "shape-only", "backend": "vllm-cpu", "device": "cpu: Test CPU", "settings": "s1"}
OTHER = H200 | {"settings": "s2"}  # the same model and device with other engine settings
CONFIG = {"model_type": "mixtral", "hidden_size": 2048, "num_layers": 16, "num_experts": 64, "top_k": 8,
          "vocab_size": 50304, "num_kv_heads": 4, "head_dim": 128, "params_dense": 1.0e9,
          "params_per_expert": 3 * 2048 * 1024, "moe_layers": 16}
BITS = {"bf16": (16, 16), "fp8": (8.1, 8), "w4a16-gptq": (4.25, 16)}


def write_perf(ledger, group, scheme, batch, throughputs, env):
    """A perf cell as evaluate/perf.py writes it, derived from the per-repeat throughputs."""
    lat = [batch * 256 / t for t in throughputs]
    metrics = [summarize("throughput", "tok/s", throughputs), summarize("latency", "s", lat),
               summarize("ttft", "s", [0.1 * x / 128 for x in lat]), summarize("itl_mean", "s", [x / 128 for x in lat]),
               summarize("itl_p99", "s", [1.2 * x / 128 for x in lat])]
    ledger.write(group | {"scheme": scheme}, "perf", f"b{batch}-i128-o128", metrics, env_id=env)


def write_memory(ledger, group, scheme, weights_mib, disk_mib, env):
    ledger.write(group | {"scheme": scheme}, "memory", "engine", [
        {"metric": "weights_bytes", "value": weights_mib * MiB},
        {"metric": "checkpoint_bytes", "value": disk_mib * MiB},
        {"metric": "peak_memory_bytes", "value": 2 * weights_mib * MiB, "note": "nvml"}], env_id=env)


def write_accuracy(ledger, group, scheme, flips, env, n=2000, correct=1500):
    """arc_easy acc and acc_norm: bf16 gets the first `correct` items right, the scheme `flips` fewer."""
    scores = (np.arange(n) < correct - flips).astype(float)
    metrics, items = [], []
    for metric in ("acc", "acc_norm"):
        metrics.append({"metric": metric, "value": scores.mean(), "spread": scores.std() / np.sqrt(n),
                        "spread_kind": "stderr", "n": n})
        items += [("arc_easy", metric, i, v) for i, v in enumerate(scores)]
    ledger.write(group | {"scheme": scheme}, "accuracy", "arc_easy", metrics, items, env_id=env)


@pytest.fixture(scope="module")
def ledger_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("ledger") / "ledger.sqlite"
    led = Ledger(path)
    env = led.env_id({"vllm": "0.0-test", "lm_eval": "0.4.13", "git": "abc123"})
    led.add_settings("s1", {"llm": {}, "routing": "uniform_random", "warmup_tokens": None, "non_default": {}})
    led.add_settings("s2", {"llm": {"enforce_eager": True}, "routing": "uniform_random", "warmup_tokens": None,
                            "non_default": {"enforce_eager": True}})
    tput = {"bf16": {1: [100, 101, 99], 8: [800, 805, 795]},
            "fp8": {1: [125, 126, 124], 8: [880, 1000, 1040]},        # b1 holds; b8's interval straddles +20%
            "w4a16-gptq": {1: [105, 106, 104], 8: [1000, 1001, 999]}}  # b1 fails +15%; b8 holds, above range
    for scheme, cells in tput.items():
        for batch, values in cells.items():
            write_perf(led, H200, scheme, batch, values, env)
        wbits, abits = BITS[scheme]
        active = CONFIG["params_dense"] + 16 * 8 * CONFIG["params_per_expert"]
        config = CONFIG | {"params_total": active, "params_active": active,
                           "weight_bits": wbits, "activation_bits": abits}
        led.write(H200 | {"scheme": scheme}, "model", "config",
                  [{"metric": "config", "value": None, "note": json.dumps(config)}], env_id=env)
    write_memory(led, H200, "bf16", 1000, 1010, env)
    write_memory(led, H200, "fp8", 550, 560, env)         # -45%: holds, in range
    write_memory(led, H200, "w4a16-gptq", 520, 300, env)  # -48%: fails the 50% bound, below range
    write_accuracy(led, H200, "bf16", 0, env)
    write_accuracy(led, H200, "fp8", 2, env)          # 0.13% loss: holds
    write_accuracy(led, H200, "w4a16-gptq", 29, env)  # 1.9% loss, interval straddles 2%: inconclusive
    for scheme in ("w8a16", "w8a8-int8"):
        led.write(H200 | {"scheme": scheme}, "status", "engine", [
            {"metric": "supported", "status": "unsupported", "note": "unsupported on vllm-cpu: no int8 MoE kernel"}])
    write_perf(led, H200, "mystery", 1, [100, 100, 100], env)  # no recipe: no claim class
    write_perf(led, OTHER, "fp8", 1, [200, 201, 199], env)
    write_perf(led, H200, "bf16", 64, [5000, 5001, 4999], env)
    write_perf(led, H200, "fp8", 64, [1e7, 1e7, 1e7], env)  # faster than an H200 can be: flagged, not judged
    write_perf(led, H200, "fp8-online", 1, [150, 151, 149], env)  # one precision, 20% apart from fp8: a finding  # other settings: never compared with s1's bf16
    # shape-only on a CPU: compared with its own bf16 (2000 MiB), never with the real one (1000 MiB)
    write_perf(led, CPU, "bf16", 1, [10, 10.1, 9.9], env)
    write_perf(led, CPU, "fp8", 1, [10.5, 10.6, 10.4], env)  # +5%: fails
    write_memory(led, CPU, "bf16", 2000, 2000, env)
    write_memory(led, CPU, "fp8", 900, 1000, env)  # -55%: holds, above range
    led.close()
    return path


@pytest.fixture(scope="module")
def report(ledger_path, tmp_path_factory):
    return build_report(ledger_path, "test", tmp_path_factory.mktemp("reports"), log=lambda *_: None)


def test_verdicts_exact(report):
    v = pd.read_csv(report / "verdicts.csv", keep_default_na=False)
    other = v[(v.settings == "s2") & (v.claim == "fp8-throughput") & (v.scheme == "fp8")]
    assert set(other.verdict) == {"not measured"} and other.note.str.contains("engine settings").all()
    v = v[v.settings == "s1"]
    from moeq.evaluate.report import verdicts
    v = v[v.claim.isin([c["id"] for c in verdicts.scheme_claims(verdicts.load_claims()["claims"])]) | (v.claim == "")]
    got = {(r.provenance, r.claim, r.scheme, r.cell): r.verdict for r in v.itertuples()}
    measured = {("real", "fp8-throughput", "fp8", "b1-i128-o128"): "holds",
                ("real", "fp8-throughput", "fp8", "b8-i128-o128"): "inconclusive",
                ("real", "fp8-throughput", "fp8", "b64-i128-o128"): "flagged",
                ("real", "fp8-throughput", "fp8-online", "b1-i128-o128"): "holds",
                ("real", "fp8-accuracy", "fp8", "arc_easy"): "holds",
                ("real", "fp8-memory", "fp8", "engine"): "holds",
                ("real", "int-throughput", "w4a16-gptq", "b1-i128-o128"): "fails",
                ("real", "int-throughput", "w4a16-gptq", "b8-i128-o128"): "holds",
                ("real", "int-accuracy", "w4a16-gptq", "arc_easy"): "inconclusive",
                ("real", "int-memory", "w4a16-gptq", "engine"): "fails",
                ("shape-only", "fp8-throughput", "fp8", "b1-i128-o128"): "fails",
                ("shape-only", "fp8-memory", "fp8", "engine"): "holds"}
    assert {k: g for k, g in got.items() if g != "not measured"} == measured
    assert len(v) == len(got)  # one row per claim x scheme x group x cell
    notes = {(r.provenance, r.claim, r.scheme): r.note for r in v.itertuples() if r.verdict == "not measured"}
    assert "no int8 MoE kernel" in notes[("real", "int-memory", "w8a16")]
    # claims select by what is quantized: INT8 activations are not "weight-only"
    assert not len(v[(v.scheme == "w8a8-int8") & v.claim.str.startswith("int-")])
    assert "fp8-block" not in set(v.scheme)  # a scheme nothing measured gets no verdict rows
    assert notes[("shape-only", "fp8-accuracy", "fp8")] == "shape-only weights: accuracy not measured"
    assert "format and claims are unknown" in notes[("real", "", "mystery")]
    position = {(r.provenance, r.claim, r.scheme, r.cell): r.position for r in v.itertuples()}
    assert position[("real", "fp8-throughput", "fp8", "b1-i128-o128")] == "in range"
    assert position[("real", "int-throughput", "w4a16-gptq", "b8-i128-o128")] == "above range"
    assert position[("real", "int-memory", "w4a16-gptq", "engine")] == "below range"
    assert position[("shape-only", "fp8-memory", "fp8", "engine")] == "above range"
    memory = v[(v.claim == "fp8-memory") & (v.provenance == "shape-only") & (v.scheme == "fp8")].iloc[0]
    assert float(memory.value) == pytest.approx(55) and float(memory.checkpoint_reduction) == pytest.approx(50)


def test_accuracy_uses_acc_norm_paired(report):
    acc = pd.read_csv(report / "accuracy.csv")
    row = acc[(acc.scheme == "w4a16-gptq") & acc.primary].iloc[0]
    assert row.metric == "acc_norm" and row.paired_items == 2000
    assert row.delta_pct == pytest.approx(-100 * 29 / 1500)
    assert row.delta_lo < -2 < row.delta_hi


def test_outputs_and_roofline(report):
    names = {p.name for p in report.iterdir()}
    for table in ("verdicts", "performance", "accuracy", "memory", "summary"):
        assert {f"{table}.csv", f"{table}.json"} <= names
    assert {"README.md", "index.html"} <= names
    # per device: speedup, memory, ITL vs throughput, and accuracy where a group has it (the H200's)
    assert sorted(n for n in names if n.endswith(".png")) == [
        "cpu-test-cpu-frontier.png", "cpu-test-cpu-memory.png", "cpu-test-cpu-speedup.png", "nvidia-h200-accuracy.png",
        "nvidia-h200-frontier.png", "nvidia-h200-memory.png", "nvidia-h200-speedup.png"]
    readme = (report / "README.md").read_text()
    pages = readme + "".join(p.read_text() for p in report.glob("*.md"))  # folded blocks are their own pages
    for phrase in ("median of the repeats", "(max − min) / median", "bootstrap", "95%", "accuracy is not measured",
                   "1,000.00 MiB", "NVIDIA H200"):
        assert phrase in pages
    # the first screen: a sentence per claim, then what to deploy
    # s2 has fp8 but no bf16 of its own: nothing to say of the claim there, so tiny needs no settings label
    claim = readme.index("**FP8 raises throughput by 20-30%** (holds if ≥ +20%): tiny: fp8 holds at b1 (+25.0% [")
    assert claim < readme.index("What to deploy") < readme.index("models × schemes")
    assert "no bf16 at these settings" not in readme[claim:readme.index("What to deploy")]
    assert "b1: **fp8** +25.0% [" in readme  # the fastest scheme above bf16 whose accuracy holds
    assert "accuracy not measured on this shape (random weights): recommendation on speed only" in readme
    # data files hold numbers: one row per group, scheme, cell and metric, with value, low, high and unit
    summary = pd.read_csv(report / "summary.csv")
    assert list(summary.columns[-6:]) == ["cell", "metric", "value", "low", "high", "unit"]
    assert pd.api.types.is_float_dtype(summary.value) and pd.api.types.is_float_dtype(summary.low)
    row = summary[(summary.settings == "s1") & (summary.provenance == "real") & (summary.scheme == "fp8")
                  & (summary.cell == "b1-i128-o128") & (summary.metric == "throughput_change_vs_bf16")].iloc[0]
    assert row.value == pytest.approx(25) and row.low < 25 < row.high and row.unit == "%"
    assert not summary.duplicated(["model", "scheme", "provenance", "backend", "device", "settings", "cell",
                                   "metric"]).any()
    perf = pd.read_csv(report / "performance.csv")
    gpu = perf[(perf.backend == "vllm-cuda") & perf.throughput_ceiling.notna()]  # those with a model config
    cpu = perf[perf.backend == "vllm-cpu"]
    # the ceiling is the roofline's own arithmetic on the fixture's config, not a bound on any number
    row = gpu[(gpu.scheme == "bf16") & (gpu.cell == "b1-i128-o128")].iloc[0]
    active = CONFIG["params_dense"] + 16 * 8 * CONFIG["params_per_expert"]
    config = CONFIG | {"params_total": active, "params_active": active, "weight_bits": 16, "activation_bits": 16}
    expected = roofline.floors(config, roofline.match_device("NVIDIA H200"), 1, 128, 128, routing="uniform_random")
    assert row.throughput_ceiling == pytest.approx(expected["throughput_ceiling"])
    assert row.pct_of_ceiling == pytest.approx(100 * row.throughput / row.throughput_ceiling)
    fast = gpu.flag.notna()
    assert (gpu[~fast].throughput_ceiling > gpu[~fast].throughput).all() and gpu[~fast].pct_of_ceiling.between(0, 100).all()
    assert list(gpu[fast].cell) == ["b64-i128-o128"] and gpu[fast].flag.str.startswith("faster than physics").all()
    assert cpu.roofline.str.startswith("no roofline").all() and cpu.throughput_ceiling.isna().all()
    assert "data:image/png;base64," in (report / "index.html").read_text()
    assert not any(n.startswith(("http", "src=\"http")) for n in (report / "index.html").read_text().split())


def test_same_precision_gap_is_a_finding(report):
    f = pd.read_csv(report / "findings.csv")
    assert list(zip(f.scheme_a, f.scheme_b, f.cell)) == [("fp8", "fp8-online", "b1-i128-o128")]
    assert f.ratio.iloc[0] == pytest.approx(125 / 150) and "one precision, two speeds" in (report / "README.md").read_text()


def test_roofline_helpers():
    assert roofline.experts_touched(64, 8, 1) == pytest.approx(8)
    assert roofline.experts_touched(64, 8, 512) == pytest.approx(64)
    assert roofline.experts_touched(64, 8, 512, routing="model") == 8  # unknown routing: only the certain minimum
    assert roofline.match_device("NVIDIA H100 80GB HBM3")["name"] == "NVIDIA H100 SXM"
    assert roofline.match_device("NVIDIA H100 PCIe")["name"] == "NVIDIA H100 PCIe"
    assert roofline.match_device("NVIDIA A100-SXM4-80GB")["name"] == "NVIDIA A100 80GB SXM"
    assert roofline.match_device("cpu: AMD EPYC 7B13") is None


def test_missing_or_empty_ledger(tmp_path):
    missing = tmp_path / "results" / "ledger.sqlite"
    with pytest.raises(UserError, match="make eval") as err:
        build_report(missing, out_root=tmp_path / "reports")
    assert str(missing) in str(err.value) and not missing.exists()
    Ledger(missing).close()
    with pytest.raises(UserError, match=r"no results.*make eval"):
        build_report(missing, out_root=tmp_path / "reports")


def test_rebuild_replaces_in_place(ledger_path, report):
    again = build_report(ledger_path, "test", report.parent, log=lambda *_: None)
    assert again == report and (report / "README.md").is_file()
    assert [p.name for p in report.parent.iterdir()] == ["test"]  # no staging folders left behind


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_html_renders_in_chromium(report, tmp_path):
    if not CHROMIUM:
        pytest.skip("chromium is not installed (apt-get install chromium), so the HTML page cannot be rendered")
    page = (report / "index.html").as_uri()
    shot = tmp_path / "page.png"

    def chromium(*args):
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args, page],
                              capture_output=True, text=True, timeout=120)

    dom = chromium("--dump-dom").stdout
    assert 'id="verdicts"' in dom and '<td class="inconclusive">inconclusive</td>' in dom
    assert '<td class="holds">b1: +25.0% [' in dom  # grid cells coloured by their verdict
    chromium(f"--screenshot={shot}", "--window-size=1400,900")
    import matplotlib.image
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] >= 500 and len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 50


def test_first_screen_as_a_reader_sees_it(report, tmp_path):
    """In a 1400x900 window: the claims sentences (all above the "What to deploy" heading) and the
    recommendation table are visible without scrolling; every image has alt text and loads."""
    if not CHROMIUM:
        pytest.skip("chromium is not installed (apt-get install chromium), so the HTML page cannot be rendered")
    probe = """<script>window.addEventListener('load', () => {
      const bottom = sel => { const e = document.querySelector(sel); return e ? e.getBoundingClientRect().bottom : -1; };
      const imgs = [...document.images].map(i => ({alt: i.alt, loaded: i.complete && i.naturalWidth > 0}));
      const out = document.createElement('pre'); out.id = 'probe';
      out.textContent = JSON.stringify({claims: bottom('#what-to-deploy') - 1, deploy: bottom('table'),
                                        height: window.innerHeight, imgs});
      document.body.appendChild(out); });</script></body>"""
    page = tmp_path / "index.html"
    page.write_text((report / "index.html").read_text().replace("</body>", probe))
    for png in report.glob("*.png"):
        shutil.copy(png, tmp_path)
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,900",
                          "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    probe = json.loads(dom.split('<pre id="probe">')[1].split("</pre>")[0])
    first_table = dom.split("<table")[1]
    assert "What to deploy" in dom.split("<table")[0] and "b1: <strong>fp8</strong>" in first_table
    assert 0 < probe["claims"] <= probe["height"] and 0 < probe["deploy"] <= probe["height"], probe
    assert len(probe["imgs"]) == 7
    assert all(i["loaded"] and len(i["alt"]) > 40 for i in probe["imgs"]), probe["imgs"]
