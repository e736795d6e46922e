"""One generic loader for moeq's lm-eval tasks: `custom_dataset: !function moeq_data.load`.

lm-eval calls `load(**metadata, **dataset_kwargs)`. `file` names a JSONL in the task-data folder; with
`build: {kind: ..., seed: ..., ...}` the file is made on first use from the held-out corpus split only
(files never seen in training or calibration), so a new task is one YAML, with no Python edit. The
file name carries the corpus fingerprint and a hash of `build` and of this code: another interpreter,
other build parameters or changed builders give another file, never stale data. Deterministic (seeded):
the same corpus and `build` give the same bytes.
"""
import bisect
import hashlib
import json
import os
import random
import re
import tempfile
from pathlib import Path

from moeq import corpus
from moeq.env import cache_root


def data_dir() -> Path:
    return cache_root() / "tasks"


def data_path(file: str, build: dict | None) -> Path:
    path = Path(file).expanduser()
    if path.is_absolute() or not build:
        return path if path.is_absolute() else data_dir() / path
    # this file's source is part of the key, so data built by an older version of the builders is not reused
    key = hashlib.sha256(json.dumps(build, sort_keys=True).encode() + Path(__file__).read_bytes()).hexdigest()[:8]
    return data_dir() / corpus.fingerprint("heldout") / f"{path.stem}.{key}{path.suffix}"


def load(file: str, build: dict | None = None, **_metadata):
    """A DatasetDict with one `test` split; the other kwargs are lm-eval's task metadata (ignored)."""
    import datasets
    path = data_path(file, build)
    if not path.exists():
        if not build:
            raise FileNotFoundError(f"{path}: no such task data file, and the task YAML gives no `build`")
        kind = build.get("kind")
        if kind not in BUILDERS:
            raise ValueError(f"{file}: unknown build kind {kind!r}; valid: {', '.join(BUILDERS)}")
        write_jsonl(path, BUILDERS[kind](**{k: v for k, v in build.items() if k != "kind"}))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def write_jsonl(path: Path, rows: list[dict]):
    # temp file + rename: concurrent runs or a crash never leave a half-written file under the real name
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shared like any other
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def heldout_lines() -> list[tuple[str, list[str]]]:
    """(path relative to the stdlib, lines without trailing whitespace) per held-out file."""
    root = corpus.stdlib_root()
    return [(p.relative_to(root).as_posix(), [ln.rstrip() for ln in
             p.read_text(encoding="utf-8", errors="replace").splitlines()]) for p in corpus.files("heldout")]


def build_ppl(n: int, chunk_lines: int, seed: int) -> list[dict]:
    """Whole runs of `chunk_lines` lines, sampled across held-out files: rolling loglikelihood per chunk."""
    chunks = [(src, i, "\n".join(lines[i:i + chunk_lines]) + "\n") for src, lines in heldout_lines()
              for i in range(0, len(lines), chunk_lines)]
    chunks = [c for c in chunks if len(c[2].split()) >= 20]  # skip nearly empty tails
    picked = random.Random(seed).sample(chunks, min(n, len(chunks)))
    return [{"id": k, "source": src, "line": i, "text": text} for k, (src, i, text) in enumerate(picked)]


# Where a line is cut into prompt | answer: nowhere (the whole line is the answer), after its first word,
# or before its last word. The cut is right before a space: byte-level BPE starts tokens with the space,
# so prompt and answer tokenize as in running text (a cut after "\n" would split the newline+indent token).
CUTS = {"none": r"()(.*\S)$", "first": r"(\s*\S+)(\s.*\S)$", "last": r"(.*\S)(\s+\S+)$"}


def _positions(context_lines: int, min_chars: int, max_chars: int, cut: str):
    """(source, line number, prompt, answer) for every non-blank held-out line of bounded length that
    follows `context_lines` lines with some code in them."""
    for src, lines in heldout_lines():
        for i in range(context_lines, len(lines)):
            line, ctx = lines[i], lines[i - context_lines:i]
            m = re.match(CUTS[cut], line)
            if m and min_chars <= len(line.strip()) and len(line) <= max_chars and sum(map(len, ctx)) >= min_chars:
                yield src, i, "\n".join(ctx) + "\n" + m[1], m[2]


def build_mc(n: int, choices: int, context_lines: int, seed: int, cut: str = "none", min_chars: int = 12,
             max_chars: int = 100, length_tolerance: float | None = None):
    """Prompt -> which of `choices` answers comes next? Distractors: answers of other positions, optionally
    of about the same length (so that an answer is not favoured merely for being short)."""
    cands = list(_positions(context_lines, min_chars, max_chars, cut))
    rng = random.Random(seed)
    pool = sorted({c[3] for c in cands}, key=lambda a: (len(a), a))
    lens = [len(a) for a in pool]
    rows = []
    for src, i, prompt, answer in rng.sample(cands, min(n, len(cands))):
        tol = len(pool) if length_tolerance is None else max(2, int(length_tolerance * len(answer)))
        lo, hi = bisect.bisect_left(lens, len(answer) - tol), bisect.bisect_right(lens, len(answer) + tol)
        opts = [answer]
        while len(opts) < choices:  # distinct after stripping, so no distractor is the answer re-indented
            d = pool[rng.randrange(lo, hi)]
            if d.strip() not in {o.strip() for o in opts}:
                opts.append(d)
        rng.shuffle(opts)
        rows.append({"id": len(rows), "source": src, "line": i, "context": prompt, "choices": opts,
                     "label": opts.index(answer)})
    return rows


def build_nextline(n: int, context_lines: int, seed: int, cut: str = "first", min_chars: int = 12,
                   max_chars: int = 80):
    """Prompt -> the rest of the line, for greedy generation (the task YAML decides how much of it is scored)."""
    cands = list(_positions(context_lines, min_chars, max_chars, cut))
    picked = random.Random(seed).sample(cands, min(n, len(cands)))
    return [{"id": k, "source": src, "line": i, "context": prompt, "target": answer}
            for k, (src, i, prompt, answer) in enumerate(picked)]


BUILDERS = {"ppl": build_ppl, "mc": build_mc, "nextline": build_nextline}
