"""A ledger that is garbage, read-only or on a full disk: a clear error (exit 2) before any engine starts,
or a rolled-back transaction mid-run; never a traceback, never a changed byte of what was there."""
import contextlib
import sqlite3
import subprocess
import uuid

import pytest

from conftest import serve_moeq
from moeq.errors import UserError
from moeq.evaluate.ledger import Ledger

KEY = {"model": "m", "scheme": "bf16", "provenance": "p", "backend": "b", "device": "d", "settings": "s"}


@contextlib.contextmanager
def small_disk(tmp_path, size="256k"):
    """A tmpfs of `size` (root only): a real full disk or, remounted, a real read-only file system."""
    mnt = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mnt], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root; the full-disk and read-only cases need one")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", mnt], check=True)


def fill(folder):
    with open(folder / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 1024)


def dump(path) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return list(db.iterdump())


def eval_on(ledger, tmp_path):
    return serve_moeq("eval", "--model", "tiny", "--scheme", "bf16", "--tasks", "none", "--batch", "1",
                      "--ledger", ledger, "--checkpoints", tmp_path / "none", check=False)


def a_ledger(path):
    db = Ledger(path)
    db.write(KEY, "perf", "b1-i8-o8", [{"metric": "throughput", "value": 1.0}])
    db.close()
    return dump(path)


def test_garbage_ledger_is_refused_untouched(tiny_model, tmp_path):
    ledger = tmp_path / "ledger.sqlite"
    ledger.write_bytes(b"not a database at all")
    for args in (["report", "--ledger", ledger, "--out", tmp_path / "r"], ["ledger", "check", "--ledger", ledger]):
        proc = serve_moeq(*args, check=False)
        assert proc.returncode == 2 and "ledger" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = eval_on(ledger, tmp_path)
    assert proc.returncode == 2 and "not a usable moeq ledger" in proc.stderr and "Traceback" not in proc.stderr
    assert "starting the engine" not in proc.stdout and ledger.read_bytes() == b"not a database at all"


def test_full_disk_stops_before_any_engine_and_changes_nothing(tiny_model, tmp_path):
    with small_disk(tmp_path) as disk:
        before = a_ledger(disk / "ledger.sqlite")
        fill(disk)
        proc = eval_on(disk / "ledger.sqlite", tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "disk is full" in proc.stderr or "No space left" in proc.stderr
        assert "starting the engine" not in proc.stdout and dump(disk / "ledger.sqlite") == before


def test_read_only_ledger_stops_before_any_engine(tiny_model, tmp_path):
    with small_disk(tmp_path) as disk:
        before = a_ledger(disk / "ledger.sqlite")
        subprocess.run(["mount", "-o", "remount,ro", disk], check=True)
        proc = eval_on(disk / "ledger.sqlite", tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "read-only" in proc.stderr.lower() or "readonly" in proc.stderr.lower()
        assert "starting the engine" not in proc.stdout
        check = serve_moeq("ledger", "check", "--ledger", disk / "ledger.sqlite", check=False)
        assert check.returncode == 0 and "1 rows" in check.stdout  # reading needs no write
        assert dump(disk / "ledger.sqlite") == before


def test_disk_filling_mid_run_rolls_the_cell_back(tmp_path):
    """The engine's write of a cell fails when the disk fills: a clear UserError, and the ledger still
    holds exactly the whole cells it held before."""
    with small_disk(tmp_path) as disk:
        path = disk / "ledger.sqlite"
        before = a_ledger(path)
        db = Ledger(path)
        fill(disk)
        with pytest.raises(UserError, match="rolled back"):
            db.write(KEY, "perf", "b2-i8-o8", [{"metric": "throughput", "value": 2.0, "note": "x" * 400_000}])
        db.close()
        (disk / "filler").unlink()
        assert dump(path) == before
