"""reports/h200/device.sh's own plumbing, run here: a build folder leaves in pieces and comes back whole
(fetch/restore), and steps run detached are followed by collect (session 7 lost its quantization to call limits)."""
import gzip
import json
import os
import sqlite3
import subprocess
import sys
import tarfile
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "reports/h200/device.sh"


def device(tmp_path, *steps, **env):
    return subprocess.run(["bash", str(SCRIPT), *steps], cwd=tmp_path / "repo", capture_output=True, text=True,
                          env=os.environ | {"MOEQ_DEVICE_DIR": str(tmp_path / "w"), "OUT": str(tmp_path / "io")} | env)


def test_a_build_folder_goes_back_in_pieces_and_is_restored_whole(tmp_path):
    model = tmp_path / "w/cache/models/fake"
    model.mkdir(parents=True)
    payload = os.urandom(40 * 2**20)  # three 15 MiB pieces
    (model / "model.safetensors").write_bytes(payload)
    (model / ".moeq-complete").touch()
    (tmp_path / "repo").mkdir()
    back = tmp_path / "back"
    back.mkdir()
    r = device(tmp_path, "fetch=fake/0", OUT=str(back))
    assert "last piece: 3 in all" in r.stdout, r.stdout + r.stderr
    assert sorted(p.name for p in back.iterdir()) == ["fake.SHA256", "fake.tar.000", "fake.tar.001", "fake.tar.002"]
    assert max(p.stat().st_size for p in back.iterdir()) == 15 * 2**20

    # carried in over two calls (a call's carried folders are gone from the next call's tree)
    pieces = sorted(back.iterdir())
    for call, names in enumerate((pieces[:2], pieces[2:])):
        carried = tmp_path / "repo/.h200/builds/fake/u0"
        carried.mkdir(parents=True, exist_ok=True)
        for old in carried.iterdir():
            old.unlink()
        for p in names:
            (carried / p.name).write_bytes(p.read_bytes())
        r = device(tmp_path, "stash=fake", MOEQ_CHUNKS=str(tmp_path / "chunks"))
        assert f"{2 * (call + 1)} pieces of fake stashed" in r.stdout, r.stdout + r.stderr
    (model / "model.safetensors").unlink()
    r = device(tmp_path, "restore=fake", MOEQ_CHUNKS=str(tmp_path / "chunks"))
    assert "restored fake" in r.stdout and (model / "model.safetensors").read_bytes() == payload

    (tmp_path / "chunks/build-fake/fake.tar.000").write_bytes(b"damaged")  # not in this call's carried folder
    (model / "model.safetensors").unlink()
    r = device(tmp_path, "restore=fake", MOEQ_CHUNKS=str(tmp_path / "chunks"))
    assert "pieces missing or damaged" in r.stdout and not (model / "model.safetensors").exists()


def test_steps_after_detach_run_in_the_background_and_collect_follows_them(tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "w/cache/models/fake").mkdir(parents=True)
    (tmp_path / "w/cache/models/fake/config.json").write_text("{}")
    with sqlite3.connect(tmp_path / "w/ledger.sqlite") as db:  # what install leaves: each stream starts from it
        db.execute("CREATE TABLE results (cell TEXT)")
        db.execute("INSERT INTO results VALUES ('b1')")
    r = device(tmp_path, "detach=g9", "fetch=fake/0")
    assert "detached g9" in r.stdout and "fetched" not in r.stdout  # the step ran elsewhere
    for _ in range(100):
        back = tmp_path / "back"
        back.mkdir(exist_ok=True)
        r = device(tmp_path, "collect=g9", OUT=str(back))
        if "g9 ended" in r.stdout:
            break
        time.sleep(0.1)
    assert "g9 == fetch=fake/0" in r.stdout and "fetched 1 of 1 pieces" in r.stdout
    # a call that only follows returns its bundle and nothing of its own (no ledger, no results)
    assert sorted(p.name for p in back.iterdir()) == ["bg-g9.tgz"]
    with tarfile.open(back / "bg-g9.tgz") as t:
        assert {"./console.log", "./ledger-g9.sqlite.gz", "./results-g9.tar"} <= set(t.getnames())
        (tmp_path / "g9.sqlite").write_bytes(gzip.decompress(t.extractfile("./ledger-g9.sqlite.gz").read()))
    assert sqlite3.connect(tmp_path / "g9.sqlite").execute("SELECT cell FROM results").fetchall() == [("b1",)]


def test_follow_waits_for_the_chain_to_end_then_collects_and_never_past_its_seconds(tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "w").mkdir()
    r = device(tmp_path, "detach=f1", "set=X=1", "set=Y=2")  # a chain that ends at once
    assert "detached f1" in r.stdout
    t0 = time.monotonic()
    (tmp_path / "back").mkdir()
    r = device(tmp_path, "follow=f1/60", OUT=str(tmp_path / "back"))
    assert "f1 ended" in r.stdout and time.monotonic() - t0 < 30  # it stopped waiting when the chain ended
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == ["bg-f1.tgz"]
    sleeper = subprocess.Popen(["sleep", "60"])  # a chain still running: follow returns after its seconds
    try:
        (tmp_path / "w/bg-f2").mkdir()
        (tmp_path / "w/bg-f2.pid").write_text(str(sleeper.pid))
        t0 = time.monotonic()
        r = device(tmp_path, "follow=f2/6")
        assert "f2 running" in r.stdout and 5 <= time.monotonic() - t0 < 30
    finally:
        sleeper.kill()


def test_later_calls_record_the_commit_the_frozen_moeq_came_from(tmp_path):
    """Session 27's calls after the install did not export MOEQ_GIT_COMMIT, and their env records lost the commit."""
    src = tmp_path / "repo/src"
    for part in ("core", "quantize", "evaluate", "recipes"):
        (src / part).mkdir(parents=True)
    (tmp_path / "w").mkdir()
    r = device(tmp_path, "freeze", SRC="src", MOEQ_GIT_COMMIT="b42863a4")
    assert (tmp_path / "w/pkg/GIT_COMMIT").read_text().strip() == "b42863a4" and (tmp_path / "w/pkg/moeq").is_dir()
    env = {k: v for k, v in os.environ.items() if k != "MOEQ_GIT_COMMIT"}
    r = subprocess.run(["bash", str(SCRIPT), "freeze"], cwd=tmp_path / "repo", capture_output=True, text=True,
                       env=env | {"MOEQ_DEVICE_DIR": str(tmp_path / "w"), "OUT": str(tmp_path / "io")})
    assert "at b42863a4" in r.stdout, r.stdout + r.stderr  # a call that exports nothing runs under the frozen commit


def test_borrow_lends_a_tuned_config_to_other_expert_counts_or_to_a_dtype(tmp_path):
    configs, bin_ = tmp_path / "configs", tmp_path / "bin"
    configs.mkdir()
    bin_.mkdir()
    (configs / "E=8,N=14336,device_name=NVIDIA_H200.json").write_text('{"1": {"BLOCK_SIZE_M": 16}}')
    (bin_ / "nvidia-smi").write_text("#!/bin/sh\necho NVIDIA H200\n")
    (bin_ / "nvidia-smi").chmod(0o755)
    (tmp_path / "repo").mkdir()
    env = {"MOEQ_MOE_CONFIGS": str(configs), "PATH": f"{bin_}:{os.environ['PATH']}"}
    r = device(tmp_path, "borrow=E=8,N=14336:dtype=int8_w8a16", **env)
    assert "E=8,N=14336,device_name=NVIDIA_H200,dtype=int8_w8a16.json" in r.stdout, r.stdout + r.stderr
    r = device(tmp_path, "borrow=E=8,N=14336:4,2", **env)
    assert "E=2,N=14336,device_name=NVIDIA_H200.json" in r.stdout and "E=4,N=14336" in r.stdout
    r = device(tmp_path, "borrow=E=8,N=4096:dtype=int8_w8a16", **env)
    assert r.returncode == 2 and "vLLM ships no" in r.stdout


def test_await_waits_for_checkpoints_another_stream_writes(tmp_path):
    """await= waits while a quantization runs and gives up once none does (a failed one writes nothing)."""
    (tmp_path / "repo").mkdir()
    done = tmp_path / "w/checkpoints/m/fp8"
    done.mkdir(parents=True)
    (done / ".moeq-complete").touch()
    t0 = time.monotonic()
    r = device(tmp_path, "await=m/fp8,w8a16", BUDGET="120")  # w8a16 never comes and nothing quantizes
    assert "m/fp8 written" in r.stdout and "m/w8a16 not written (no quantization running" in r.stdout
    assert 14 < time.monotonic() - t0 < 60  # the 15 s grace, not the 120 s budget
    # a quantization running (its command line, as the quantize environment's python runs it): waited for
    quantizer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(25)", "-m", "moeq.cli", "quantize"])
    try:
        late = tmp_path / "w/checkpoints/m/w8a16"
        writer = subprocess.Popen(["bash", "-c", f"sleep 20; mkdir -p {late} && touch {late}/.moeq-complete"])
        r = device(tmp_path, "await=m/w8a16", BUDGET="120")
        writer.wait()
    finally:
        quantizer.kill()
    assert "m/w8a16 written" in r.stdout


def test_score_passes_one_engine_argument(tmp_path):
    """set=MOEQ_ENGINE_ARG=moe_backend=humming reaches moeq eval (a W8A8-INT8 run with the experts' activations
    quantized, vLLM 0.26's HUMMING backend); without it no engine argument is passed."""
    (tmp_path / "repo").mkdir()
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "python3").write_text('#!/bin/sh\necho "ARGS: $*"\n')
    (bin_ / "python3").chmod(0o755)
    path = f"{bin_}:{os.environ['PATH']}"
    log = tmp_path / "io/device.log"  # the full output (the console shows moeq's own lines only)
    device(tmp_path, "set=MOEQ_ENGINE_ARG=moe_backend=humming", "score=m/w8a8-int8/none", PATH=path)
    assert "--scheme w8a8-int8 --tasks none --engine-arg moe_backend=humming" in log.read_text()
    log.unlink()
    device(tmp_path, "score=m/w8a8-int8/none", PATH=path)
    assert "ARGS: -m moeq.cli eval" in log.read_text() and "--engine-arg" not in log.read_text()


def test_set_with_no_value_unsets_the_variable(tmp_path):
    """vLLM reads an empty VLLM_HUMMING_INPUT_QUANT_CONFIG as JSON text and fails (session 25's chain lost three
    engines to set=NAME=): set=NAME= takes the variable away for the steps after it."""
    (tmp_path / "repo").mkdir()
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "python3").write_text('#!/bin/sh\necho "HUMMING: ${VLLM_HUMMING_INPUT_QUANT_CONFIG-unset}"\n')
    (bin_ / "python3").chmod(0o755)
    path, log = f"{bin_}:{os.environ['PATH']}", tmp_path / "io/device.log"
    device(tmp_path, 'set=VLLM_HUMMING_INPUT_QUANT_CONFIG={"dtype":"int8"}', "score=m/w8a8-int8/none",
           "set=VLLM_HUMMING_INPUT_QUANT_CONFIG=", "score=m/w8a8-int8/none", PATH=path)
    assert [x for x in log.read_text().splitlines() if x.startswith("HUMMING:")] == \
        ['HUMMING: {"dtype":"int8"}', "HUMMING: unset"]


def test_merge_back_unpacks_bundles_and_merges_their_ledgers(tmp_path):
    from moeq.evaluate.ledger import Ledger
    key = dict(model="m", scheme="bf16", provenance="real", backend="b", device="d", settings="s")
    Ledger(tmp_path / "reports/ledger.sqlite").write(key, "perf", "b1", [{"metric": "tps", "value": 1.0}])
    stream = tmp_path / "stream"
    stream.mkdir()
    Ledger(stream / "ledger-g0.sqlite").write(key, "perf", "b16", [{"metric": "tps", "value": 16.0}])
    (stream / "outliers-m.json").write_text("{}")
    for run in ("fused_moe.json", "fused_moe-run2.json"):  # two fused benchmark runs of one chain
        (stream / run).write_text(json.dumps({"run": run}))
    subprocess.run(["gzip", str(stream / "ledger-g0.sqlite")], check=True)
    with tarfile.open(tmp_path / "bg-g0.tgz", "w:gz") as t:
        t.add(stream, arcname=".")
    moeq = Path(sys.executable).parent / "moeq"
    r = subprocess.run(["bash", str(SCRIPT.parent / "merge-back.sh"), "s0", str(tmp_path / "bg-g0.tgz")], cwd=tmp_path,
                       capture_output=True, text=True, env=os.environ | {"LEDGER": "reports/ledger.sqlite",
                                                                          "MOEQ": str(moeq), "NO_REPORT": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / ".h200/back/s0/g0/ledger-g0.sqlite").is_file() and (tmp_path / "reports/outliers/outliers-m.json").is_file()
    cells = Ledger(tmp_path / "reports/ledger.sqlite", readonly=True).db.execute("SELECT cell FROM results").fetchall()
    assert sorted(c[0] for c in cells) == ["b1", "b16"]
    runs = {f.name: json.loads(f.read_text())["run"] for f in (tmp_path / "reports/benchmarks").iterdir()}
    assert runs == {"fused_moe-s0.json": "fused_moe.json", "fused_moe-s0-run2.json": "fused_moe-run2.json"}


def test_a_plan_step_finds_the_plan_install_kept_and_stops_the_chain_on_a_wrong_one(tmp_path):
    """plan= picks the sweep plan of the steps after it; a detached chain outlives the call's tree, so the
    plan install copied under $W/plans wins; a name that is no plan stops the chain, naming the plans."""
    (tmp_path / "repo/reports/h200").mkdir(parents=True)
    (tmp_path / "repo/reports/h200/plan-topk-mixtral.yaml").write_text("models: [mixtral]\n")
    kept = tmp_path / "w/plans/h200/plan-fit.yaml"
    kept.parent.mkdir(parents=True)
    kept.write_text("models: [mixtral]\n")
    r = device(tmp_path, "plan=h200/plan-fit.yaml", "plan=h200/plan-topk-mixtral.yaml")
    assert f"plan: {kept}" in r.stdout and "plan: ./reports/h200/plan-topk-mixtral.yaml" in r.stdout, r.stdout + r.stderr
    r = device(tmp_path, "plan=h200/plan-topk.yaml", "plan=h200/plan-fit.yaml")
    assert r.returncode == 2 and "plan=h200/plan-topk.yaml: no such plan" in r.stdout
    assert "h200/plan-topk-mixtral.yaml" in r.stdout and f"plan: {kept}" not in r.stdout


def test_prune_runs_in_the_quantize_environment_and_score_finds_the_pruned_model(tmp_path):
    """prune=moe-500m/0.5,0.25 calls `moeq prune` once per fraction with the quantize environment's python;
    score=moe-500m-keep50/bf16 then evaluates the folder prune wrote (a pruned model is not a registry name)."""
    (tmp_path / "repo").mkdir()
    w = tmp_path / "w"
    (w / "pkg" / "moeq").mkdir(parents=True)  # freeze: moeq already frozen for the quantize environment
    for name, where in (("quant-python", w), ("python3", tmp_path / "bin")):
        where.mkdir(exist_ok=True)
        (where / name).write_text(f'#!/bin/sh\necho "{name}: $*"\n')
        (where / name).chmod(0o755)
    path = f"{tmp_path / 'bin'}:{os.environ['PATH']}"
    device(tmp_path, "prune=moe-500m/0.5,0.25", PATH=path)
    log = (tmp_path / "io/device.log").read_text()
    ckpt = w / "checkpoints"
    assert f"quant-python: -m moeq.cli prune --model moe-500m --keep 0.5 --out {ckpt}" in log
    assert f"quant-python: -m moeq.cli prune --model moe-500m --keep 0.25 --out {ckpt}" in log
    (ckpt / ".pruned" / "moe-500m-keep50").mkdir(parents=True)
    device(tmp_path, "score=moe-500m-keep50/bf16/moeq_xl", "score=moe-500m/bf16/moeq_xl", PATH=path)
    log = (tmp_path / "io/device.log").read_text()
    assert f"python3: -m moeq.cli eval --model {ckpt}/.pruned/moe-500m-keep50 --scheme bf16" in log
    assert "python3: -m moeq.cli eval --model moe-500m --scheme bf16" in log


def test_a_second_fused_run_in_one_chain_is_kept_beside_the_first(tmp_path):
    """fused twice in one chain (at its start and after its engines: two leases timed the kernel 16% apart)
    writes two files; merge-back names them fused_moe-sN.json and fused_moe-sN-run2.json."""
    (tmp_path / "repo").mkdir()
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "python3").write_text('#!/bin/sh\nwhile [ "$1" != --out ]; do shift; done; echo "{}" > "$2"\n')
    (bin_ / "python3").chmod(0o755)
    r = device(tmp_path, "fused", "fused", PATH=f"{bin_}:{os.environ['PATH']}")
    assert sorted(p.name for p in (tmp_path / "io").glob("fused_moe*.json")) == ["fused_moe-run2.json", "fused_moe.json"], \
        r.stdout + r.stderr
