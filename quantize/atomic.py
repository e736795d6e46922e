"""Write a folder somewhere temporary and rename it into place only when it is complete."""
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

COMPLETE_MARKER = ".moeq-complete"


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


@contextlib.contextmanager
def staged_dir(final: Path):
    """Yield an empty sibling folder of `final`; on success it replaces `final`, on error it is removed.

    A sibling (same filesystem) makes the final rename atomic, so a reader never sees a half-written
    folder under the final name, and a crash leaves only a `.tmp-*` folder that is never reused.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    except OSError as e:
        from moeq.quantize.registry import UserError
        raise UserError(f"cannot write under {final.parent}: {e.strerror or e}") from e
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
