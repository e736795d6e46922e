"""Leftovers of killed writers, in the names each moeq version used: removed or restored by the next write."""
import os
import subprocess
import sys
import time

from moeq import atomic


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_leftovers_are_cleaned_and_live_ones_kept(tmp_path):
    final = tmp_path / "fp8"
    dead, lines = dead_pid(), []
    mine = tmp_path / f".tmp-fp8-{os.getpid()}-abc"  # a live writer's (this process)
    for leftover in (tmp_path / f".tmp-fp8-{dead}-x1y2", tmp_path / ".tmp-fp8-k3j4h5g6", tmp_path / ".tmp-fp8-n0w0n0w0",
                     tmp_path / f".tmp-fp8-static-{dead}-zz", mine):
        leftover.mkdir()
    old = time.time() - 2 * atomic.LEGACY_AGE_S
    os.utime(tmp_path / ".tmp-fp8-k3j4h5g6", (old, old))  # an earlier moeq's, long untouched
    atomic.clean_stale(final, log=lines.append)
    left = {p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")}
    # gone: the dead writer's and the old unnamed one; kept: a fresh unnamed one (maybe still written),
    # the live writer's, and fp8-static's (another folder's leftovers)
    assert left == {".tmp-fp8-n0w0n0w0", mine.name, f".tmp-fp8-static-{dead}-zz"}, left
    assert len(lines) == 2 and all("removed" in line for line in lines)


def test_a_redo_killed_between_its_renames_is_restored(tmp_path):
    final, dead = tmp_path / "w4a16", dead_pid()
    old = tmp_path / f".old-w4a16-{dead}"
    old.mkdir()
    (old / atomic.COMPLETE_MARKER).touch()
    atomic.clean_stale(final, log=lambda *_: None)
    assert atomic.is_complete(final) and not old.exists()
