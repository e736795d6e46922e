"""What a checkpoint was made from, by content: the source model's identity, the recipe text that ran,
and the calibration size. Only the standard library (and huggingface_hub for hub snapshots), so the
serve environment can key measurements on `checkpoint_identity` without torch or llm-compressor."""
import hashlib
import json
from pathlib import Path

from moeq.errors import UserError

FULL_HASH_LIMIT = 256 * 2**20  # larger weight files are sampled: hashing a 93 GB model would take minutes
SAMPLE = 2**20


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:16]


def text_sha256(text: str) -> str:
    return _sha(text)


def _file_digest(path: Path) -> tuple[str, bool]:
    """(hash, sampled): whole contents, or size + mtime + first and last MiB for a large file."""
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if st.st_size <= FULL_HASH_LIMIT:
            for block in iter(lambda: f.read(8 * SAMPLE), b""):
                h.update(block)
            return h.hexdigest()[:16], False
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        h.update(f.read(SAMPLE))
        f.seek(-SAMPLE, 2)
        h.update(f.read(SAMPLE))
    return h.hexdigest()[:16], True


def _hub_revision(path: Path) -> dict | None:
    """A snapshot folder of the Hugging Face cache names its commit; the hub library reads the cache."""
    if path.parent.name != "snapshots" or not path.parent.parent.name.startswith("models--"):
        return None
    try:
        from huggingface_hub import scan_cache_dir
        cache = scan_cache_dir(path.parent.parent.parent)
    except Exception:
        return None
    for repo in cache.repos:
        for rev in repo.revisions:
            if Path(rev.snapshot_path).resolve() == path.resolve():
                return {"kind": "hub", "repo_id": repo.repo_id, "revision": rev.commit_hash,
                        "refs": sorted(rev.refs)}
    return None


def source_identity(path: Path) -> dict:
    """The identity of a model folder; `digest` is what is compared."""
    path = Path(path)
    ident = _hub_revision(path)
    if ident is None:
        if not (path / "config.json").is_file():
            raise UserError(f"{path} has no config.json: not a Hugging Face checkpoint folder")
        h = hashlib.sha256((path / "config.json").read_bytes())
        sampled = []
        for f in sorted(path.glob("*.safetensors")):
            digest, was_sampled = _file_digest(f)
            h.update(f"{f.name}:{f.stat().st_size}:{digest}".encode())
            if was_sampled:
                sampled.append(f.name)
        ident = {"kind": "files", "sha256": h.hexdigest()[:16],
                 "hashed": "config.json and every *.safetensors (name, size, contents"
                           + (f"; over {FULL_HASH_LIMIT >> 20} MiB: mtime, first and last MiB)" if sampled else ")"),
                 "sampled_files": sampled}
    keys = ("repo_id", "revision") if ident["kind"] == "hub" else ("sha256",)
    ident["digest"] = _sha(json.dumps([ident["kind"], *(ident[k] for k in keys)]))
    return ident


def describe(ident: dict) -> str:
    if ident.get("kind") == "hub":
        return f"{ident['repo_id']}@{ident['revision'][:12]}"
    if ident.get("kind") == "files":
        return f"files sha256 {ident['sha256']}"
    return "unrecorded: no source identity in its manifest"


def calibration_key(calibration: dict) -> str:
    return f"{calibration.get('samples', 0)}x{calibration.get('seq_len', 0)}"


def read_manifest(ckpt: Path) -> dict:
    try:
        return json.loads((Path(ckpt) / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{ckpt}: no readable manifest.json ({e})") from e


def checkpoint_identity(ckpt: Path) -> str:
    """A short hash of what the checkpoint was made from: equal for equal source, recipe and calibration.

    A manifest without a source identity (older moeq, shape-only folders) is identified by its own bytes,
    so it never matches another checkpoint."""
    m = read_manifest(ckpt)
    if "source" not in m:
        return "m-" + _sha((Path(ckpt) / "manifest.json").read_bytes())
    return _sha(json.dumps([m["source"]["digest"], m["resolved_recipe_sha256"], calibration_key(m["calibration"])]))


def differences(manifest: dict, source: dict, recipe_sha: str, calibration: dict) -> list[str]:
    """What differs between a checkpoint's manifest and what a run would make now, in words."""
    out = []
    old = manifest.get("source", {})
    if old.get("digest") != source["digest"]:
        out.append(f"a different source model ({describe(old)}; now {describe(source)})")
    if manifest.get("resolved_recipe_sha256") != recipe_sha:
        out.append(f"a different recipe (resolved recipe sha256 {manifest.get('resolved_recipe_sha256')}; "
                   f"now {recipe_sha})")
    if calibration_key(manifest.get("calibration", {})) != calibration_key(calibration):
        out.append(f"different calibration ({calibration_key(manifest.get('calibration', {}))} tokens; "
                   f"now {calibration_key(calibration)})")
    return out
