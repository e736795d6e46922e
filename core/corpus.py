"""The project's own corpus: the running interpreter's standard-library sources.

Every machine with Python has them, so nothing is downloaded. Files (not lines) are split into
train / calibration / held-out parts by a hash of their relative path, so the split is stable and
no held-out file was ever seen in training or calibration.
"""
import gzip
import hashlib
import json
import sys
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


# --- A larger corpus, pinned by a manifest -------------------------------------------------------------
# The standard library alone is ~11 MB (~3M tokens): enough for `tiny`, far too little for a model trained
# on hundreds of millions of tokens. A registry entry's `train.corpus` block can name installed packages
# whose Python sources (*.py, *.pyi) and text documents (*.md, *.rst, *.txt) join the standard library's.
# Their files are listed in a manifest (where each came from, its path, sha256, size and split) so that the
# same split can be rebuilt and checked on another machine: a build given a manifest refuses to train
# when any file differs. Files are split by `split_of` of their path relative to their root (the stdlib
# folder or a package's install folder), the function `tiny` uses, so a held-out stdlib file is held out
# for both models. Exact duplicates (vendored copies) are kept once, where first met in sorted order.
DOC_SUFFIXES = (".md", ".rst", ".txt")
CODE_SUFFIXES = (".py", ".pyi")
MAX_FILE_BYTES = 1_000_000  # larger files are generated tables and data dumps, not prose or code
MANIFEST_VERSION = 1


def _package_files(dist_name: str):
    """(relpath, absolute path) of a distribution's code and text files, sorted, from its RECORD."""
    from importlib import metadata
    dist = metadata.distribution(dist_name)
    out = []
    for f in dist.files or ():
        rel = f.as_posix()
        parts = f.parts
        if not rel.endswith(CODE_SUFFIXES + DOC_SUFFIXES) or ".." in parts or "__pycache__" in parts \
                or any(p.endswith(".dist-info") for p in parts):
            continue
        out.append((rel, Path(dist.locate_file(f))))
    return dist.version, sorted(out)


def _stdlib_files():
    root = stdlib_root()
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.suffix not in CODE_SUFFIXES + DOC_SUFFIXES or SKIP_DIRS.intersection(rel.parts) or not path.is_file():
            continue
        out.append((rel.as_posix(), path))
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def collect(packages: list[str], stdlib: bool = True, log=print) -> dict:
    """A new manifest of the standard library and `packages` as installed in this interpreter.

    A package that is not installed is left out with a warning (the manifest records what was used)."""
    from importlib import metadata
    sources, versions, missing = [], {}, []
    if stdlib:
        sources.append(("stdlib", _stdlib_files()))
    for name in packages:
        try:
            versions[name], found = _package_files(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        sources.append((f"pkg:{name}", found))
    if missing:
        log(f"[corpus] not installed here, left out: {', '.join(missing)}")
    files, seen = [], set()
    for root, found in sources:
        for rel, path in found:
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if not data.strip() or len(data) > MAX_FILE_BYTES:
                continue
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            digest = hashlib.sha256(data).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            files.append({"root": root, "path": rel, "sha256": digest, "bytes": len(data), "split": split_of(rel)})
    return {"version": MANIFEST_VERSION, "python": sys.version.split()[0], "packages": versions,
            "stdlib": stdlib, "missing": missing, "files": files}


def write_manifest(manifest: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=9) as f:
        head = {k: v for k, v in manifest.items() if k != "files"}
        f.write(json.dumps(head, sort_keys=True) + "\n")
        for e in manifest["files"]:
            f.write(f"{e['split']}\t{e['sha256']}\t{e['bytes']}\t{e['root']}\t{e['path']}\n")
    tmp.replace(path)


def read_manifest(path: Path) -> dict:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        manifest = json.loads(f.readline())
        manifest["files"] = []
        for line in f:
            split, digest, size, root, rel = line.rstrip("\n").split("\t", 4)
            manifest["files"].append({"root": root, "path": rel, "sha256": digest, "bytes": int(size), "split": split})
    return manifest


def locate(entry: dict) -> Path:
    """Where a manifest entry's file is in this interpreter's installation."""
    from importlib import metadata
    if entry["root"] == "stdlib":
        return stdlib_root() / entry["path"]
    return Path(metadata.distribution(entry["root"][4:]).locate_file(entry["path"]))


def verify(manifest: dict) -> None:
    """Raise UserError unless every file the manifest lists is here with the same content."""
    from importlib import metadata
    from moeq.errors import UserError
    bad = []
    for e in manifest["files"]:
        try:
            ok = sha256_file(locate(e)) == e["sha256"]
        except (OSError, metadata.PackageNotFoundError):
            ok = False
        if not ok:
            bad.append(f"{e['root']}/{e['path']}")
    if bad:
        here = {}
        for name in manifest["packages"]:
            try:
                here[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                here[name] = "missing"
        differ = {n: f"{v} -> {here[n]}" for n, v in manifest["packages"].items() if here[n] != v}
        raise UserError(
            f"the corpus differs from its manifest: {len(bad):,} of {len(manifest['files']):,} files are missing or "
            f"changed (first: {', '.join(bad[:3])}); manifest made with Python {manifest['python']}, here "
            f"{sys.version.split()[0]}; package versions that differ: {differ or 'none'}. The split cannot be "
            f"rebuilt on this machine: build where the manifest was made, or make a new manifest (and a new model)")


def manifest_texts(manifest: dict, split: str, max_chars: int | None = None) -> list[str]:
    """The contents of one split's files, in manifest order, optionally capped in total size."""
    if split not in SPLITS:
        raise ValueError(f"unknown corpus split {split!r}; valid: {', '.join(SPLITS)}")
    out, total = [], 0
    for e in manifest["files"]:
        if e["split"] != split:
            continue
        text = locate(e).read_text(encoding="utf-8", errors="replace")
        out.append(text)
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    return out


def manifest_summary(manifest: dict) -> dict:
    """Files and bytes per split and per root, and a fingerprint of the whole list."""
    per_split = {s: {"files": 0, "bytes": 0} for s in SPLITS}
    per_root: dict[str, int] = {}
    h = hashlib.sha256()
    for e in manifest["files"]:
        per_split[e["split"]]["files"] += 1
        per_split[e["split"]]["bytes"] += e["bytes"]
        per_root[e["root"]] = per_root.get(e["root"], 0) + e["bytes"]
        h.update(f"{e['split']}\t{e['sha256']}\t{e['root']}\t{e['path']}\n".encode())
    return {"python": manifest["python"], "splits": per_split, "bytes_per_root": per_root,
            "bytes": sum(s["bytes"] for s in per_split.values()), "fingerprint": h.hexdigest()[:16]}
