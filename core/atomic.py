"""Write a folder somewhere temporary and rename it into place only when it is complete; one writer at a
time per folder; leftovers of killed writers are cleaned up (or restored) by the next one."""
import contextlib
import fcntl
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

COMPLETE_MARKER = ".moeq-complete"
LEGACY_AGE_S = 3600
_held: dict[Path, int] = {}  # locks this process holds, so nested users (build -> staged_dir) do not self-block


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def lock_file(final: Path) -> Path:
    return final.parent / f".{final.name}.lock"


def _cannot_write(final: Path, e: OSError):
    from moeq.errors import UserError
    return UserError(f"cannot write under {final.parent}: {e.strerror or e}")


@contextlib.contextmanager
def folder_lock(final: Path, wait: bool = False):
    """An advisory lock on writing `final` (flock on `<parent>/.<name>.lock`, which holds the writer's pid).

    Without `wait`, a second writer fails at once naming the holder. The file is removed on release;
    a lock taken on a file that was removed meanwhile is retaken on the new one."""
    final = Path(final).absolute()
    if final in _held:
        _held[final] += 1
        try:
            yield
        finally:
            _held[final] -= 1
        return
    path = lock_file(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                from moeq.errors import UserError
                raise UserError(f"{final} is being written by another process (pid {holder}; lock {path}); "
                                "wait for it to finish or stop it, then rerun") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as e:
        raise _cannot_write(final, e) from e
    _held[final] = 1
    try:
        yield
    finally:
        del _held[final]
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def clean_stale(final: Path, log=print) -> None:
    """Remove `.tmp-NAME-PID-*` folders of dead writers; restore a dead redo's `.old-NAME-PID` to NAME when
    NAME is missing (a kill between its two renames), else remove it. Skipped while another process writes."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    from moeq.errors import UserError
    try:
        with folder_lock(final):
            name = re.escape(final.name)  # exact: the leftovers of fp8 are not those of fp8-static
            pattern = re.compile(rf"\.tmp-{name}-(\d+)-[a-z0-9_]+|\.old-{name}-(\d+)")
            # moeq before pids were in the names wrote `.tmp-NAME-<8 random>`, without this lock
            legacy = re.compile(rf"\.tmp-{name}-[a-z0-9_]{{8}}")
            for p in sorted(final.parent.iterdir()):
                if legacy.fullmatch(p.name) and time.time() - p.stat().st_mtime > LEGACY_AGE_S:
                    shutil.rmtree(p, ignore_errors=True)
                    log(f"[moeq] removed {p}, left by an earlier moeq (untouched for over an hour)")
                    continue
                m = pattern.fullmatch(p.name)
                pid = m and int(m[1] or m[2])
                if not m or _alive(pid):
                    continue
                if m[2] and not final.exists() and is_complete(p):
                    p.rename(final)
                    log(f"[moeq] restored {final} from {p.name}, left by killed process {pid}")
                else:
                    shutil.rmtree(p, ignore_errors=True)
                    log(f"[moeq] removed {p}, left by killed process {pid}")
    except UserError:
        pass


@contextlib.contextmanager
def staged_dir(final: Path):
    """Yield an empty sibling folder of `final`; on success it replaces `final`, on error it is removed.

    A sibling (same filesystem) makes the final rename atomic, so a reader never sees a half-written
    folder under the final name. The temporary name carries the writer's pid, so a later writer knows
    which leftovers are from dead processes."""
    final = Path(final)
    with folder_lock(final):
        clean_stale(final)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-{os.getpid()}-", dir=final.parent))
        except OSError as e:
            raise _cannot_write(final, e) from e
        try:
            yield tmp
            (tmp / COMPLETE_MARKER).touch()
            if final.exists():
                old = final.with_name(f".old-{final.name}-{os.getpid()}")
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old)
            else:
                tmp.rename(final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
