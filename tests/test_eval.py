"""Issue: `moeq eval` measures the baseline and checkpoints through vLLM and lm-eval into the ledger,
resumes after a kill without re-measuring, records unsupported schemes, and rejects corrupt folders."""
import json
import math
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from conftest import QUANT_PYTHON, ROOT, serve_moeq

# small cells and a few items per task: this checks the mechanics, `make eval` measures for real
CELLS = ["--batch", "1,4", "--input-len", "32", "--output-len", "8", "--repeats", "3"]
FEW_ITEMS = ["--limit", "24"]


def eval_args(ledger, checkpoints, *extra):
    return ["eval", "--model", "tiny", "--ledger", ledger, "--checkpoints", checkpoints, *CELLS, *extra]


def rows(ledger, where="1"):
    db = sqlite3.connect(ledger)
    db.row_factory = sqlite3.Row
    return [dict(r) for r in db.execute(f"SELECT * FROM results WHERE {where}")]


def perf_cells(ledger) -> dict:
    """cell -> when it was written, for every perf cell in the ledger."""
    return {r["cell"]: r["created"] for r in rows(ledger, "kind = 'perf'")} if ledger.exists() else {}


def wait_for_new_cell(proc, ledger, known: int) -> float:
    """Waits until the ledger holds more than `known` perf cells; returns when that was seen."""
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None and len(perf_cells(ledger)) <= known:
        time.sleep(0.05)
    assert len(perf_cells(ledger)) > known, f"no new cell (driver exit {proc.poll()})"
    return time.time()


@pytest.fixture(scope="module")
def measured(checkpoints, tmp_path_factory):
    ledger = tmp_path_factory.mktemp("ledger") / "ledger.sqlite"
    proc = serve_moeq(*eval_args(ledger, checkpoints, "--scheme", "bf16,fp8,w4a16-gptq", *FEW_ITEMS), check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return ledger, proc.stdout


def test_baseline_perf_is_complete_and_sane(measured):
    ledger, _ = measured
    perf = rows(ledger, "scheme = 'bf16' AND kind = 'perf'")
    cells = {r["cell"] for r in perf}
    assert cells == {"b1-i32-o8", "b4-i32-o8"}
    assert {r["cell"] for r in perf if r["metric"] == "host_load"} == cells  # what else ran on the host (host.py)
    for r in perf:
        if r["metric"] == "host_load":
            assert r["n"] == 1 and r["value"] >= 0 and r["unit"] == "load/core"
            continue
        assert r["value"] is not None and math.isfinite(r["value"]) and r["value"] > 0, r
        if r["metric"] != "warmup":  # the one untimed warm-up run per cell is kept for the harness cost
            assert r["n"] == 3 and r["spread"] is not None
        assert r["provenance"] == "real" and r["backend"] == "vllm-cpu" and r["env_id"] is not None
    for cell in cells:
        runs = {r["metric"]: json.loads(r["repeats"]) for r in perf if r["cell"] == cell and r["repeats"]}
        batch, inp, out = (int(x[1:]) for x in cell.split("-"))
        for lat, ttft, itl, p50, p99 in zip(runs["latency"], runs["ttft"], runs["itl_mean"], runs["itl_p50"], runs["itl_p99"]):
            # moeq's wall clock against vLLM's own per-token timestamps (engine-core clock) of the same run
            assert 0.3 * lat <= ttft + (out - 1) * itl <= 1.02 * lat
            assert 0 < p50 <= p99 and ttft < lat
    memory = {r["metric"]: r["value"] for r in rows(ledger, "scheme = 'bf16' AND kind = 'memory'")}
    assert memory["weights_bytes"] > 1e6 and memory["kv_cache_tokens"] > 0 and memory["peak_memory_bytes"] > 0
    assert memory["checkpoint_bytes"] > 1e6 and memory["load_seconds"] > 0
    # what the experts' kernel computes with, read from vLLM's worker: BF16 runs unquantized
    quant = rows(ledger, "scheme = 'bf16' AND metric = 'moe_quant'")
    assert quant and quant[0]["note"].endswith("activations unquantized"), quant


def test_every_scheme_gets_accuracy_on_the_baselines_backend(measured):
    ledger, _ = measured
    acc = rows(ledger, "kind = 'accuracy'")
    for scheme in ("bf16", "fp8", "w4a16-gptq"):
        tasks = {r["cell"] for r in acc if r["scheme"] == scheme}
        assert tasks == {"moeq_ppl", "moeq_mc4", "moeq_nextline"}, scheme
        assert {r["backend"] for r in acc if r["scheme"] == scheme} == {"vllm-cpu"}
    for r in acc:
        assert r["value"] is not None and math.isfinite(r["value"]) and r["value"] >= 0
    items = sqlite3.connect(ledger).execute(
        "SELECT COUNT(*) FROM item_rows WHERE scheme = 'fp8' AND task = 'moeq_mc4' AND metric = 'acc'").fetchone()[0]
    assert items == 24
    # a quantized checkpoint's rows name the bf16 build it was made from, and are keyed on it
    bf16 = {r["checkpoint"] for r in acc if r["scheme"] == "bf16"}
    for scheme in ("fp8", "w4a16-gptq"):
        made = {(r["checkpoint"].split("+from:")[1], r["build"]) for r in acc if r["scheme"] == scheme}
        assert made == {(b, b) for b in bf16}, (scheme, made, bf16)


def test_unsupported_scheme_is_recorded_with_vllms_reason(measured):
    """FP8-dynamic MoE has no kernel in vLLM's CPU backend: a status row, no invented perf numbers."""
    ledger, out = measured
    status = rows(ledger, "scheme = 'fp8' AND kind = 'status'")
    assert status and status[0]["status"] == "unsupported" and status[0]["note"].startswith("unsupported on vllm-cpu:")
    assert not rows(ledger, "scheme = 'fp8' AND kind = 'perf'")
    notes = {r["note"] for r in rows(ledger, "scheme = 'fp8' AND kind = 'accuracy'")}
    assert notes and all("decompressed" in n for n in notes)


def test_rerun_measures_nothing_twice(measured, checkpoints):
    ledger, _ = measured
    before = {(r["scheme"], r["cell"], r["metric"]): r["created"] for r in rows(ledger)}
    proc = serve_moeq(*eval_args(ledger, checkpoints, "--scheme", "bf16,fp8,w4a16-gptq", *FEW_ITEMS))
    assert "starting the engine" not in proc.stdout
    assert {(r["scheme"], r["cell"], r["metric"]): r["created"] for r in rows(ledger)} == before


def test_killed_eval_resumes_without_remeasuring(tiny_model, tmp_path):
    """Fault injection: the driver is SIGKILLed at random moments of a sweep; after each kill no engine
    goes on measuring, every row in the ledger is whole and unchanged, and the last run completes it."""
    ledger, checkpoints = tmp_path / "ledger.sqlite", tmp_path / "no-checkpoints"  # bf16 only
    cells = {f"b{b}-i128-o96" for b in (1, 2, 4, 8, 16)}  # a cell to spare after the second kill
    args = eval_args(ledger, checkpoints, "--scheme", "bf16", "--tasks", "none", "--batch", "1,2,4,8,16",
                     "--input-len", "128", "--output-len", "96")
    cmd = [sys.executable, "-m", "moeq.cli", *map(str, args)]
    env = {**os.environ, "MOEQ_QUANT_PYTHON": QUANT_PYTHON}
    rng, done, cell_seconds = random.Random(0), {}, None
    for attempt in range(2):
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
        finished = wait_for_new_cell(proc, ledger, len(done))
        if cell_seconds is None:  # one cell's duration on this machine times the kills (later cells are larger)
            cell_seconds = wait_for_new_cell(proc, ledger, len(done) + 1) - finished
        time.sleep(rng.uniform(0, 0.9 * cell_seconds))
        assert proc.poll() is None, f"the driver ended (exit {proc.returncode}) before the kill could land"
        os.kill(proc.pid, signal.SIGKILL)  # the driver alone: its engine must not go on measuring
        proc.wait()
        time.sleep(5)
        now = perf_cells(ledger)
        time.sleep(3)
        assert perf_cells(ledger) == now, "an orphaned engine kept writing"
        engines = subprocess.run(["pgrep", "-s", str(proc.pid), "-f", "moeq.evaluate.engine"], capture_output=True, text=True)
        assert not engines.stdout.strip(), "the engine process outlived its driver"
        assert all(now[c] == created for c, created in done.items()), "a finished cell was measured again"
        for cell in now:  # whole rows only: every metric of a cell, each with its repeats
            metrics = {r["metric"]: r for r in rows(ledger, f"kind = 'perf' AND cell = '{cell}'")}
            assert metrics["throughput"]["n"] == 3 and {"latency", "ttft_p99", "itl_p99"} <= set(metrics)
        done = now
    assert done and done.keys() < cells, "the kills must land part-way"
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    after = perf_cells(ledger)
    assert set(after) == cells and all(after[cell] == created for cell, created in done.items())
    assert not list(tmp_path.glob(".ledger.sqlite.job-*")), "the interrupted runs' job folders were cleaned up"


class ScriptedLLM:
    """Stands in for vllm.LLM in perf.run_cell: each generate() takes a duration the test chose (its own
    clock, not run_cell's) and returns `tokens` per request; it counts every token it was sent and gave."""

    def __init__(self, seconds: list[float], tokens: int | None = None):
        self.seconds, self.tokens, self.calls = list(seconds), tokens, []

    def generate(self, prompts, params, use_tqdm=False):
        from types import SimpleNamespace
        n = params.max_tokens if self.tokens is None else self.tokens
        sent = sum(len(p["prompt_token_ids"]) for p in prompts)
        time.sleep(self.seconds.pop(0))
        self.calls.append(sent + n * len(prompts))
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[7] * n)],
                                metrics=SimpleNamespace(first_token_latency=0.001)) for _ in prompts]


class Gaps:
    def take(self):
        return [0.001] * 4


def test_throughput_matches_an_independent_clock_and_token_count():
    """Throughput = tokens processed / time, checked against what the stand-in engine itself counted
    and the durations the test chose: a wrong token count (output only, one request instead of the
    batch) or a timer around the wrong thing (the warm-up included) fails here."""
    from moeq.evaluate import perf
    batch, inp, out = 4, 48, 16
    durations = [0.05, 0.30, 0.20, 0.40]  # warm-up, then three timed runs
    llm = ScriptedLLM(durations)
    metrics = {m["metric"]: m for m in perf.run_cell(llm, batch, inp, out, vocab=2048, repeats=3,
                                                     timings=Gaps(), log=lambda *_: None)}
    tokens = llm.calls[1:]  # the timed runs, as counted by the engine side
    assert tokens == [batch * (inp + out)] * 3
    for got, want in zip(metrics["throughput"]["repeats"], [t / s for t, s in zip(tokens, durations[1:])]):
        assert 0.85 * want <= got <= want  # the clock can only add time (a sleep is never shorter)
    assert metrics["throughput"]["value"] == pytest.approx(tokens[0] / 0.30, rel=0.15)  # the median run
    for got, s in zip(metrics["output_throughput"]["repeats"], durations[1:]):
        assert 0.85 * batch * out / s <= got <= batch * out / s
    assert metrics["warmup"]["value"] == pytest.approx(0.05, abs=0.04)
    with pytest.raises(RuntimeError, match=f"expected {out} tokens per request, got \\[{out - 1}\\]"):
        perf.run_cell(ScriptedLLM([0.01, 0.01], tokens=out - 1), batch, inp, out, 2048, 1, timings=Gaps(),
                      log=lambda *_: None)


@pytest.mark.parametrize("damage", ["truncated weights", "half-written"])
def test_corrupt_checkpoint_gives_a_clear_error(checkpoints, tmp_path, damage):
    root = tmp_path / "ckpts"
    shutil.copytree(checkpoints / "tiny" / "fp8", root / "tiny" / "fp8")
    folder = root / "tiny" / "fp8"
    if damage == "truncated weights":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[:100])
    else:
        (folder / ".moeq-complete").unlink()
    proc = serve_moeq(*eval_args(tmp_path / "l.sqlite", root, "--scheme", "fp8"), check=False)
    assert proc.returncode == 2 and "incomplete or corrupt" in proc.stderr


@pytest.mark.parametrize("flags, message", [
    (["--batch", "0"], "--batch 0: must be at least 1"),
    (["--batch", "none", "--tasks", "none"], "BATCH=none measures accuracy only"),
    (["--repeats", "0"], "--repeats 0"),
    (["--limit", "-5"], "--limit -5"),
    (["--engine-arg", "enforce_eagr=true"], "unknown engine argument 'enforce_eagr'"),
    (["--tasks", "no_such_task"], "unknown task 'no_such_task'"),
    (["--weights", "fake"], "invalid choice: 'fake'"),
    (["--engine-process", "apart"], "unknown engine process 'apart'; valid: inprocess, separate"),
    (["--one-engine", "--batch", "none"], "ONE_ENGINE runs the perf cells and the accuracy tasks in one engine"),
    (["--one-engine", "--tasks", "none"], "it needs both (batch given, tasks none)")])
def test_bad_input_fails_before_any_engine_and_writes_nothing(tmp_path, flags, message):
    """A bad flag is the user's error (exit 2, the value named), never an 'unsupported' verdict."""
    ledger = tmp_path / "ledger.sqlite"
    proc = serve_moeq("eval", "--model", "tiny", "--ledger", ledger, "--checkpoints", tmp_path, *flags, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "starting the engine" not in proc.stdout and not ledger.exists()


def test_accuracy_only_starts_no_perf_engine(checkpoints, tmp_path):
    """BATCH=none (a GPU lease scoring many checkpoints): accuracy rows and the kernel each accuracy engine ran
    (vLLM 0.26 on the H200 ran w8a8-int8's experts on 16-bit activations), no perf or memory rows; a scheme the
    backend refuses (vllm-cpu: FP8 MoE) is found refused by its accuracy engine and scored on its BF16 copy."""
    ledger = tmp_path / "ledger.sqlite"
    proc = serve_moeq("eval", "--model", "tiny", "--scheme", "bf16,fp8", "--batch", "none", "--tasks", "moeq_mc4",
                      *FEW_ITEMS, "--ledger", ledger, "--checkpoints", checkpoints, timeout=900)
    assert "0 cells" in proc.stdout and "scoring fp8 on decompressed BF16 weights instead" in proc.stdout
    kinds = {r["kind"] for r in rows(ledger)}
    assert kinds == {"accuracy", "status", "engine"}, kinds
    quant = rows(ledger, "scheme = 'bf16' AND metric = 'moe_quant'")
    assert quant and quant[0]["note"].endswith("activations unquantized"), quant
    notes = {r["note"] for r in rows(ledger, "scheme = 'fp8' AND kind = 'accuracy'")}
    assert len(notes) == 1 and notes.pop().startswith("weights decompressed to BF16")


def test_one_engine_times_then_scores_in_one_start(checkpoints, tmp_path):
    """--one-engine (a GPU lease that must fit every scheme's rows): perf cells, memory and accuracy of a scheme
    from one engine start, in the same settings group as two engines' rows; a refused scheme (vllm-cpu: FP8 MoE)
    still gets its accuracy on the BF16 copy."""
    ledger = tmp_path / "ledger.sqlite"
    proc = serve_moeq(*eval_args(ledger, checkpoints, "--scheme", "bf16,fp8", "--tasks", "moeq_mc4", "--one-engine",
                                 *FEW_ITEMS), timeout=900)
    assert proc.stdout.count("starting the engine") == 3, proc.stdout[-3000:]  # bf16, fp8 (refused), fp8's copy
    assert "scoring fp8 on decompressed BF16 weights instead" in proc.stdout
    bf16 = rows(ledger, "scheme = 'bf16'")
    assert {r["kind"] for r in bf16} >= {"perf", "memory", "accuracy", "engine"}
    assert len({r["settings"] for r in rows(ledger)}) == 1
    assert rows(ledger, "scheme = 'fp8' AND kind = 'accuracy'")
    assert "everything already measured" in serve_moeq(*eval_args(ledger, checkpoints, "--scheme", "bf16", "--tasks",
                                                                  "moeq_mc4", "--one-engine", *FEW_ITEMS)).stdout


def test_engine_core_in_a_process_of_its_own(tiny_model, tmp_path):
    """engine_process=separate, as vllm bench and servers run vLLM: the rows, the kernel vLLM logged (read
    through the pipes its process writes to) and the memory of both processes, in a settings group of its own."""
    ledger = tmp_path / "ledger.sqlite"
    serve_moeq("eval", "--model", "tiny", "--scheme", "bf16", "--tasks", "none", "--batch", "2", "--input-len", "64",
               "--output-len", "8", "--repeats", "1", "--engine-process", "separate", "--ledger", ledger,
               "--checkpoints", tmp_path, timeout=900)
    con = sqlite3.connect(ledger)
    rows = dict(con.execute("select metric, coalesce(note, value) from results where cell in ('kernel', 'engine')"))
    assert "MoE backend" in rows["vllm_log"] and rows["moe_kernel"].startswith("CPU")
    assert rows["moe_quant"].endswith("activations unquantized"), rows["moe_quant"]  # read across the process
    assert "engine core, added" in rows["peak_memory_bytes"]
    record = json.loads(con.execute("select record from settings").fetchone()[0])
    assert record["non_default"]["engine_process"] == "separate"
    assert con.execute("select value from results where metric = 'throughput'").fetchone()[0] > 0
