"""Issue 16, quantize side: checkpoints are identified by content (source model, resolved recipe,
calibration), written by one process at a time, and a kill at any moment leaves nothing wrong behind."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from conftest import QUANT_PYTHON, ROOT, moeq, read_json
from moeq import atomic, identity, schemes
from moeq.env import env_flag
from moeq.errors import UserError


def fake_model(folder: Path, weights: bytes = b"\0" * 64, config: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "mixtral"}))
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# --- identity, on fake folders -------------------------------------------------------------------

def test_source_identity_is_by_content(tmp_path):
    a = identity.source_identity(fake_model(tmp_path / "a" / "tiny"))
    assert a == identity.source_identity(fake_model(tmp_path / "b" / "tiny"))  # a copy elsewhere is the same model
    assert a["kind"] == "files" and a["sampled_files"] == [] and "contents" in a["hashed"]
    same_size = identity.source_identity(fake_model(tmp_path / "c" / "tiny", b"\0" * 63 + b"\1"))
    other_config = identity.source_identity(fake_model(tmp_path / "d" / "tiny", config={"model_type": "qwen3_moe"}))
    assert len({a["digest"], same_size["digest"], other_config["digest"]}) == 3


def test_large_weight_files_are_sampled_and_say_so(tmp_path, monkeypatch):
    monkeypatch.setattr(identity, "SAMPLE", 4)
    monkeypatch.setattr(identity, "FULL_HASH_LIMIT", 16)
    folder = fake_model(tmp_path / "big", b"a" * 40)
    ident = identity.source_identity(folder)
    assert ident["sampled_files"] == ["model.safetensors"] and "first and last MiB" in ident["hashed"]
    (folder / "model.safetensors").write_bytes(b"a" * 39 + b"b")  # the last bytes are read
    assert identity.source_identity(folder)["digest"] != ident["digest"]


def test_hub_snapshot_is_identified_by_revision(tmp_path):
    repo, commit = tmp_path / "hub" / "models--org--moe", "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, data in {"config.json": b"{}", "model.safetensors": b"\0" * 8}.items():
        (repo / "blobs" / name).write_bytes(data)
        (snap / name).symlink_to(repo / "blobs" / name)
    ident = identity.source_identity(snap)
    assert (ident["kind"], ident["repo_id"], ident["revision"], ident["refs"]) == ("hub", "org/moe", commit, ["main"])
    assert identity.describe(ident) == "org/moe@0123456789ab"


def manifest(folder: Path, digest="s1", recipe="r1", samples=0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({
        "source": {"kind": "files", "sha256": digest, "digest": digest}, "resolved_recipe_sha256": recipe,
        "calibration": {"samples": samples, "seq_len": 128 if samples else 0}}))
    return folder


def test_checkpoint_identity_without_torch(tmp_path):
    """The serve environment keys measurements on it, so it must not need torch or llm-compressor."""
    same = [manifest(tmp_path / n) for n in ("a", "b")]
    others = [manifest(tmp_path / "c", digest="s2"), manifest(tmp_path / "d", recipe="r2"),
              manifest(tmp_path / "e", samples=16)]
    code = ("import sys; from moeq.identity import checkpoint_identity as c; "
            "print(*[c(p) for p in sys.argv[1:]]); assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code, *same, *others], capture_output=True, text=True, check=True)
    ids = out.stdout.split()
    assert ids[0] == ids[1] and len(set(ids)) == 4
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text('{"model": "tiny"}')  # before identities were recorded
    assert identity.checkpoint_identity(tmp_path / "old").startswith("m-")
    with pytest.raises(UserError, match="no readable manifest.json"):
        identity.checkpoint_identity(tmp_path / "missing")


def test_differences_say_what_differs():
    old = {"source": {"kind": "files", "sha256": "s1", "digest": "s1"}, "resolved_recipe_sha256": "r1",
           "calibration": {"samples": 16, "seq_len": 128}}
    assert identity.differences(old, old["source"], "r1", old["calibration"]) == []
    said = " ".join(identity.differences(old, {"kind": "files", "sha256": "s2", "digest": "s2"}, "r2",
                                         {"samples": 32, "seq_len": 128}))
    assert "different source model (files sha256 s1; now files sha256 s2)" in said
    assert "different recipe" in said and "16x128" in said and "32x128" in said
    assert "unrecorded" in identity.differences({}, old["source"], "r1", {})[0]


# --- atomic folders: clean-up, crash safety, locking ----------------------------------------------

def test_leftovers_of_dead_writers_are_cleaned_or_restored(tmp_path):
    dead, lines = dead_pid(), []
    restore = tmp_path / "fp8"
    (tmp_path / f".old-fp8-{dead}").mkdir()
    (tmp_path / f".old-fp8-{dead}" / atomic.COMPLETE_MARKER).touch()  # a redo killed between its two renames
    (tmp_path / f".tmp-fp8-{dead}-abc_12").mkdir()
    (tmp_path / f".tmp-fp8-{os.getpid()}-live1").mkdir()  # a live writer's: kept
    (tmp_path / f".tmp-fp8-static-{dead}-xyz").mkdir()  # another folder's: kept
    (tmp_path / "w4a16").mkdir()
    (tmp_path / f".old-w4a16-{dead}").mkdir()  # killed while removing the replaced copy: removed
    atomic.clean_stale(restore, log=lines.append)
    atomic.clean_stale(tmp_path / "w4a16", log=lines.append)
    assert atomic.is_complete(restore)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([f".tmp-fp8-{os.getpid()}-live1", f".tmp-fp8-static-{dead}-xyz", "fp8", "w4a16"])
    assert len(lines) == 3 and all(f"killed process {dead}" in line for line in lines)


def test_staged_dir_names_its_writer_and_cleans_first(tmp_path):
    dead = dead_pid()
    (tmp_path / f".tmp-out-{dead}-abc").mkdir()
    with atomic.staged_dir(tmp_path / "out") as tmp:
        assert tmp.name.startswith(f".tmp-out-{os.getpid()}-")
        (tmp / "x").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock file, no leftovers
    assert atomic.is_complete(tmp_path / "out")


def test_second_writer_fails_fast_naming_the_holder(tmp_path):
    final = tmp_path / "fp8"
    code = ("import sys; from moeq.atomic import staged_dir\n"
            "with staged_dir(sys.argv[1]): pass")
    with atomic.folder_lock(final):
        with atomic.folder_lock(final):  # the same process may nest (build -> staged_dir)
            pass
        assert atomic.lock_file(final).read_text().strip() == str(os.getpid())
        proc = subprocess.run([sys.executable, "-c", code, final], capture_output=True, text=True)
        assert proc.returncode != 0 and f"being written by another process (pid {os.getpid()}" in proc.stderr
    assert not atomic.lock_file(final).exists()
    subprocess.run([sys.executable, "-c", code, final], check=True)  # released: the next writer goes ahead


def test_yes_no_environment_values_are_strict(monkeypatch):
    for value, expected in {"0": False, "1": True, "no": False, "true": True, "": False}.items():
        monkeypatch.setenv("MOEQ_FORCE", value)
        assert env_flag("FORCE") is expected, value
    monkeypatch.setenv("MOEQ_FORCE", "0")
    monkeypatch.setenv("FORCE", "1")
    assert env_flag("FORCE") is False  # a bare FORCE is not moeq's: only MOEQ_ variables count
    monkeypatch.setenv("MOEQ_FORCE", "maybe")
    with pytest.raises(UserError, match="MOEQ_FORCE='maybe' is not a yes/no value; valid: 1, true"):
        env_flag("FORCE")


# --- the real command on the embedded model -------------------------------------------------------

def loadable(ckpt: Path) -> bool:
    files = list(ckpt.glob("*.safetensors"))
    for f in files:
        with safe_open(f, "pt") as st:
            assert list(st.keys())
    return atomic.is_complete(ckpt) and "quantization_config" in read_json(ckpt / "config.json") and bool(files)


@pytest.fixture(scope="module")
def fp8(tiny_model, tmp_path_factory) -> tuple[Path, float]:
    """tiny x fp8 (no calibration: seconds), and how long one run took."""
    root = tmp_path_factory.mktemp("identity")
    t0 = time.time()
    moeq("quantize", "--model", "tiny", "--scheme", "fp8", "--out", root)
    return root, time.time() - t0


def test_force_0_reuses_and_manifest_has_identity(fp8, tiny_model):
    root, _ = fp8
    folder = root / "tiny" / "fp8"
    before = (folder / "manifest.json").stat().st_mtime_ns
    proc = moeq("quantize", "--model", "tiny", "--scheme", "fp8", "--out", root, env={"MOEQ_FORCE": "0"})
    assert "reusing" in proc.stdout and (folder / "manifest.json").stat().st_mtime_ns == before
    m = read_json(folder / "manifest.json")
    assert m["source"] == identity.source_identity(tiny_model)


def test_other_source_with_the_same_name_is_refused(fp8, tiny_model, tmp_path):
    root, _ = fp8
    other = tmp_path / "other" / "tiny"
    shutil.copytree(tiny_model, other)
    weights = other / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-2] ^= 1  # one mantissa bit of one weight
    weights.write_bytes(data)
    before = (root / "tiny" / "fp8" / "manifest.json").stat().st_mtime_ns
    proc = moeq("quantize", "--model", other, "--scheme", "fp8", "--out", root, check=False)
    assert proc.returncode == 2 and "was made from a different source model (files sha256" in proc.stderr
    assert "rerun with FORCE=1 / --force" in proc.stderr
    assert (root / "tiny" / "fp8" / "manifest.json").stat().st_mtime_ns == before


def test_custom_recipe_named_fp8_is_not_reused_as_fp8(fp8, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(fp8[0], root)
    doc = yaml.safe_load(schemes.load("fp8").path.read_text())
    doc["quant_stage"]["quant_modifiers"]["QuantizationModifier"]["scheme"] = "FP8_BLOCK"
    custom = tmp_path / "mine" / "fp8.yaml"
    custom.parent.mkdir()
    custom.write_text(yaml.safe_dump(doc))
    proc = moeq("quantize", "--model", "tiny", "--scheme", custom, "--out", root, check=False)
    assert proc.returncode == 2 and "was made from a different recipe" in proc.stderr
    proc = moeq("quantize", "--model", "tiny", "--scheme", custom, "--out", root, "--force")
    assert "redoing" in proc.stdout and "different recipe" in proc.stdout
    assert read_json(root / "tiny" / "fp8" / "config.json")["quantization_config"]["config_groups"]["group_0"][
        "weights"]["strategy"] == "block"


def test_second_quantize_of_the_same_target_fails_fast(fp8):
    root, _ = fp8
    with atomic.folder_lock(root / "tiny" / "fp8"):
        proc = moeq("quantize", "--model", "tiny", "--scheme", "fp8", "--out", root, "--force", check=False)
    assert proc.returncode == 2 and f"pid {os.getpid()}" in proc.stderr
    assert loadable(root / "tiny" / "fp8")


def quantize_fp8(root: Path, force: bool, kill: tuple[str, float] | None = None) -> tuple[int, float, float]:
    """Run `moeq quantize --model tiny --scheme fp8`; with kill=(phase, seconds), SIGKILL it that long after
    its start ("start") or after its temporary folder appeared ("write"). Returns the exit status and the
    seconds from the start and from the temporary folder's appearance to the end."""
    cmd = [QUANT_PYTHON, "-m", "moeq.cli", "quantize", "--model", "tiny", "--scheme", "fp8",
           "--out", root, *(["--force"] if force else [])]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start, wrote = time.time(), None
    while proc.poll() is None:
        if wrote is None and list((root / "tiny").glob(".tmp-fp8-*")):
            wrote = time.time()
        since = start if kill and kill[0] == "start" else wrote
        if kill and since and time.time() - since >= kill[1]:
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.02)
    end = time.time()
    return proc.wait(), end - start, end - (wrote or end)


def test_kill_at_random_points_leaves_nothing_wrong(fp8, tmp_path):
    """SIGKILL `moeq quantize` at random moments: a fresh write (anywhere in the run), then two FORCE redos
    (while the new folder is written, renamed or the old one removed). After each kill no complete
    checkpoint is wrong; the next plain run ends with the right, loadable checkpoint and no leftovers."""
    expected = identity.checkpoint_identity(fp8[0] / "tiny" / "fp8")
    root, rng, seen = tmp_path / "root", random.Random(16), []
    folder = root / "tiny" / "fp8"
    _, total, writing = quantize_fp8(root, force=False)  # a warm run times the kill moments
    shutil.rmtree(root)
    for attempt in range(3):
        kill = ("write", rng.uniform(0, 0.9) * writing) if attempt else ("start", rng.uniform(0.1, 0.9) * total)
        status, _, _ = quantize_fp8(root, force=bool(attempt), kill=kill)
        seen.append((status, sorted(p.name for p in folder.parent.glob("*"))))
        if atomic.is_complete(folder):
            assert loadable(folder) and identity.checkpoint_identity(folder) == expected
        moeq("quantize", "--model", "tiny", "--scheme", "fp8", "--out", root)
        assert loadable(folder) and identity.checkpoint_identity(folder) == expected
        assert [p.name for p in (root / "tiny").iterdir()] == ["fp8"], "no .tmp-*, .old-* or lock left"
    print("exit status and folders after each kill:", seen)
    assert any(status == -signal.SIGKILL for status, _ in seen)
