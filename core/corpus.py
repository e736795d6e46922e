"""The project's own corpus: the running interpreter's standard-library sources.

Every machine with Python has them, so nothing is downloaded. Files (not lines) are split into
train / calibration / held-out parts by a hash of their relative path, so the split is stable and
no held-out file was ever seen in training or calibration.
"""
import hashlib
import sysconfig
from functools import lru_cache
from pathlib import Path

SPLITS = {"train": range(0, 90), "calibration": range(90, 95), "heldout": range(95, 100)}
SKIP_DIRS = {"site-packages", "__pycache__", "idlelib", "turtledemo", "lib2to3"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relpath: str) -> str:
    bucket = int(hashlib.sha1(relpath.encode()).hexdigest(), 16) % 100
    return next(name for name, r in SPLITS.items() if bucket in r)


@lru_cache(maxsize=None)
def files(split: str) -> tuple[Path, ...]:
    if split not in SPLITS:
        raise ValueError(f"unknown corpus split {split!r}; valid: {', '.join(SPLITS)}")
    root = stdlib_root()
    chosen = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if SKIP_DIRS.intersection(path.relative_to(root).parts) or split_of(rel) != split:
            continue
        chosen.append(path)
    return tuple(chosen)


def texts(split: str, max_chars: int | None = None) -> list[str]:
    """File contents of one split, in sorted path order, optionally capped in total size."""
    out, total = [], 0
    for path in files(split):
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        out.append(text)
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    return out


def fingerprint(split: str) -> str:
    """Identifies exactly which files (and interpreter) a split held, for manifests."""
    h = hashlib.sha256(str(stdlib_root()).encode())
    for path in files(split):
        h.update(path.name.encode())
        h.update(str(path.stat().st_size).encode())
    return h.hexdigest()[:16]
