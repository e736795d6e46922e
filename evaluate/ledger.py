"""The results ledger: one SQLite file, one row per (model, scheme, settings, build, cell or task, metric).

Every write is one transaction, so a run killed part-way leaves only whole rows behind, and a rerun
skips what `has()` finds. Repeated timings and per-item accuracy scores are kept beside the summary
values so that the report can compute its own intervals (bootstrap, paired comparisons): a task's scores
of one metric are one JSON row (view `item_rows`: one row per item), as one row per item repeated the
whole key (23 of the H200 ledger's 25 MiB, and a device call carries the ledger in 64 MiB with vLLM). Each row
names the engine settings it was measured with (table `settings`, evaluate/settings.py) and the
checkpoint identity it measured, so a differently-set run or a re-quantized checkpoint never stands in
for another. A real model's build (the weights a checkpoint was made from: `build_of`) is part of every
row's key: an embedded model rebuilt in a later session is other weights, and its rows stand beside the
earlier build's instead of replacing them (session 15's rebuilt moe-500m had replaced the first build's
bf16 scores). One writer at a time: `lock()`.
"""
import contextlib
import fcntl
import hashlib
import itertools
import json
import math
import os
import shutil
import sqlite3
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from moeq.errors import UserError

VERSION = 4
SCHEMA = """
CREATE TABLE IF NOT EXISTS env (
  id INTEGER PRIMARY KEY, digest TEXT UNIQUE NOT NULL, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS settings (id TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
  model TEXT NOT NULL, scheme TEXT NOT NULL, provenance TEXT NOT NULL, backend TEXT NOT NULL,
  device TEXT NOT NULL, settings TEXT NOT NULL, build TEXT NOT NULL DEFAULT '', kind TEXT NOT NULL,
  cell TEXT NOT NULL, metric TEXT NOT NULL, value REAL, spread REAL, spread_kind TEXT, n INTEGER, unit TEXT, repeats TEXT,
  status TEXT NOT NULL DEFAULT 'ok', note TEXT, recipe_sha TEXT, env_id INTEGER REFERENCES env(id),
  checkpoint TEXT, item_limit INTEGER, created TEXT NOT NULL,
  PRIMARY KEY (model, scheme, provenance, backend, device, settings, build, cell, metric));
CREATE TABLE IF NOT EXISTS items (
  model TEXT NOT NULL, scheme TEXT NOT NULL, provenance TEXT NOT NULL, backend TEXT NOT NULL,
  device TEXT NOT NULL, settings TEXT NOT NULL, build TEXT NOT NULL DEFAULT '', task TEXT NOT NULL,
  metric TEXT NOT NULL, scores TEXT NOT NULL,
  PRIMARY KEY (model, scheme, provenance, backend, device, settings, build, task, metric)) WITHOUT ROWID;
CREATE VIEW IF NOT EXISTS item_rows AS
  SELECT i.model, i.scheme, i.provenance, i.backend, i.device, i.settings, i.build, i.task, i.metric,
         CAST(j.key AS INTEGER) AS item, CAST(j.value AS REAL) AS value
  FROM items i, json_each(i.scores) j;
"""
KEY = ("model", "scheme", "provenance", "backend", "device", "settings")
COLUMNS = (*KEY, "build", "kind", "cell", "metric", "value", "spread", "spread_kind", "n", "unit", "repeats", "status",
           "note", "recipe_sha", "env_id", "checkpoint", "item_limit", "created")
ITEM_COLUMNS = (*KEY, "build", "task", "metric", "scores")
# Rows of a schema-1 ledger were written before settings were recorded.
LEGACY = "legacy-v1"
LEGACY_RECORD = {"legacy": "engine settings were not recorded (ledger schema 1)"}


def schema_version(db: sqlite3.Connection) -> int:
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version == 0 and db.execute("SELECT 1 FROM sqlite_master WHERE name = 'results'").fetchone():
        return 1  # schema 1 never set user_version
    return version or VERSION  # an empty file is created at the current version


def build_of(provenance: str, checkpoint: str | None) -> str:
    """The weights a row measured, as a key: a real checkpoint's source build ('<id>+from:<build>' for a
    quantized or pruned checkpoint, '<build>+vllm:<method>' for a load-time scheme, the build itself for
    bf16). '' for dummy weights (a shape-only folder is its config, and a changed config replaces its rows)
    and for rows written before checkpoints were recorded, which stand for whichever build measures next."""
    if not provenance.startswith("real") or not checkpoint:
        return ""
    if "+from:" in checkpoint:
        return checkpoint.split("+from:", 1)[1]
    return checkpoint.split("+vllm:", 1)[0]


def scores_json(scores) -> str:
    """One task's per-item scores of one metric, [(item, value), ...], as JSON: a list when the items are 0..n-1
    (lm-eval's doc ids), else an object by item; whole numbers without '.0', a non-finite score null."""
    scores = sorted(scores)

    def num(v):
        v = float(v)
        return None if not math.isfinite(v) else int(v) if v.is_integer() else v
    values = [num(v) for _, v in scores]
    if all(i == n for n, (i, _) in enumerate(scores)):
        return json.dumps(values, separators=(",", ":"))
    return json.dumps({str(i): v for (i, _), v in zip(scores, values)}, separators=(",", ":"))


def migrate(path: Path, legacy_record: dict | None = None) -> bool:
    """Bring a ledger of schema 1-3 to the current one on a copy, then swap it in: a failure at any point
    leaves the original untouched. Returns whether anything was migrated."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        version = schema_version(db)
    if version == VERSION:
        return False
    if version not in (1, 2, 3):
        raise UserError(f"{path} has ledger schema {version}; this moeq reads {VERSION} (and migrates 1-3)")
    tmp = path.with_name(f".{path.name}.migrating-{os.getpid()}")
    shutil.copy2(path, tmp)
    try:
        with contextlib.closing(sqlite3.connect(tmp)) as db:
            db.create_function("build_of", 2, build_of, deterministic=True)
            with db:
                for table in ("results", "items"):
                    db.execute(f"ALTER TABLE {table} RENAME TO old_{table}")
                db.executescript(SCHEMA)
                old = [c[1] for c in db.execute("PRAGMA table_info(old_results)")]
                legacy = "settings" not in old  # schema 1 had no settings: LEGACY
                db.execute(f"INSERT INTO results ({', '.join(old)}{', settings' if legacy else ''}) SELECT {', '.join(old)}"
                           f"{', ?' if legacy else ''} FROM old_results", (LEGACY,) if legacy else ())
                if version == 1:
                    _from_schema_1(db, legacy_record)
                if version < 3:  # schema 3's build column, from what the rows recorded
                    db.execute("UPDATE results SET build = build_of(provenance, checkpoint)")
                _items_as_json(db)
                db.execute("DROP TABLE old_results")
                db.execute(f"PRAGMA user_version = {VERSION}")
            db.execute("VACUUM")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def _from_schema_1(db: sqlite3.Connection, legacy_record: dict | None):
    # schema 1's ITL percentiles were over per-request mean ITLs, not over inter-token gaps
    for q in ("p50", "p99"):
        db.execute("UPDATE results SET metric = ? WHERE metric = ?", (f"itl_request_{q}", f"itl_{q}"))
    db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)",
               (LEGACY, json.dumps(legacy_record or LEGACY_RECORD, sort_keys=True)))


def _items_as_json(db: sqlite3.Connection):
    """Schema 1-3's one row per item into one JSON row per task and metric. Rows of schema 1 take LEGACY
    settings; rows of schema 1-2 their cell's build (one row per key and cell then, so the lookup is unique)."""
    old = [c[1] for c in db.execute("PRAGMA table_info(old_items)")]
    if "settings" not in old:
        db.execute(f"ALTER TABLE old_items ADD COLUMN settings TEXT NOT NULL DEFAULT '{LEGACY}'")
    if "build" not in old:
        db.execute("ALTER TABLE old_items ADD COLUMN build TEXT NOT NULL DEFAULT ''")
        same = " AND ".join(f"r.{k} = old_items.{k}" for k in KEY)
        db.execute(f"UPDATE old_items SET build = COALESCE((SELECT r.build FROM results r WHERE {same} "
                   "AND r.cell = old_items.task LIMIT 1), '')")
    group = ", ".join((*KEY, "build", "task", "metric"))
    rows = db.execute(f"SELECT {group}, item, value FROM old_items ORDER BY {group}, item")
    for key, scores in itertools.groupby(rows, key=lambda r: r[:9]):
        db.execute("INSERT INTO items VALUES (?,?,?,?,?,?,?,?,?,?)", (*key, scores_json(r[9:] for r in scores)))
    db.execute("DROP TABLE old_items")


class Ledger:
    def __init__(self, path: Path, readonly: bool = False):
        """readonly: opened without a single write (a committed ledger keeps its bytes); an older schema is
        then an error that names `moeq ledger migrate` instead of being migrated."""
        self.path = Path(path)
        try:
            if readonly:
                self.db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
                self.db.row_factory = sqlite3.Row
                if (version := schema_version(self.db)) != VERSION:
                    raise UserError(f"{self.path} has ledger schema {version}; `moeq ledger migrate` brings it to {VERSION}")
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                migrate(self.path)
            self.db = sqlite3.connect(self.path, timeout=60)
            self.db.row_factory = sqlite3.Row
            with self.db:
                self.db.executescript(SCHEMA)
                self.db.execute(f"PRAGMA user_version = {VERSION}")
        except sqlite3.OperationalError as e:  # full disk, read-only file or folder
            raise UserError(f"cannot open the ledger {self.path} for writing ({e}); nothing in it was changed") from e
        except sqlite3.DatabaseError as e:
            raise UserError(f"{self.path} is not a usable moeq ledger ({e}); nothing in it was changed. "
                            "Point --ledger at another file, or move this one away.") from e
        except OSError as e:
            raise UserError(f"cannot write the ledger {self.path}: {e.strerror or e}") from e

    @contextlib.contextmanager
    def writing(self, what: str):
        """A failed write (full disk, read-only file) rolls its transaction back: say so, plainly."""
        try:
            yield
        except sqlite3.OperationalError as e:
            raise UserError(f"cannot write {what} to the ledger {self.path} ({e}); the transaction was rolled "
                            "back, so the ledger holds only whole cells. Free space or fix permissions, then rerun: "
                            "finished cells are skipped") from e

    def env_id(self, record: dict) -> int:
        text = json.dumps(record, sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        with self.writing("the environment record"), self.db:
            self.db.execute("INSERT OR IGNORE INTO env (digest, record) VALUES (?, ?)", (digest, text))
        return self.db.execute("SELECT id FROM env WHERE digest = ?", (digest,)).fetchone()[0]

    def add_settings(self, settings_id: str, record: dict):
        with self.writing("the engine settings"), self.db:
            self.db.execute("INSERT OR IGNORE INTO settings VALUES (?, ?)", (settings_id, json.dumps(record, sort_keys=True)))

    def has(self, key: dict, cell: str, checkpoint: str | None = None, limit: int | None = None) -> bool:
        """True if the cell (a perf cell or a task) has rows for this key and build, measured on this checkpoint
        (when it is known) and, for a task, with this item limit."""
        where = " AND ".join(f"{k} = ?" for k in KEY)
        rows = self.db.execute(f"SELECT checkpoint, item_limit, kind FROM results WHERE {where} AND build IN (?, '') "
                               "AND cell = ?", (*[key[k] for k in KEY], build_of(key["provenance"], checkpoint), cell))
        return any((checkpoint is None or r["checkpoint"] in (None, checkpoint))
                   and (r["kind"] != "accuracy" or r["item_limit"] == limit) for r in rows.fetchall())

    def write(self, key: dict, kind: str, cell: str, metrics: list[dict], items: list[tuple] = (),
              env_id: int | None = None, recipe_sha: str | None = None, checkpoint: str | None = None,
              limit: int | None = None):
        """All of a cell's metrics (and per-item scores) in one transaction, replacing earlier ones of the same
        build (and rows that never said theirs); another build's rows stay.

        Each metric: {metric, value, spread?, spread_kind?, n?, unit?, repeats?, status?, note?}.
        Each item: (task, metric, item_index, value).
        """
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        build = build_of(key["provenance"], checkpoint)
        kv = [key[k] for k in KEY]
        match = " AND ".join(f"{k} = ?" for k in KEY) + " AND build IN (?, '')"
        with self.writing(f"cell {cell}"), self.db:
            self.db.execute(f"DELETE FROM results WHERE {match} AND cell = ?", (*kv, build, cell))
            for m in metrics:
                self.db.execute(
                    f"INSERT INTO results ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                    (*kv, build, kind, cell, m["metric"], m.get("value"), m.get("spread"), m.get("spread_kind"),
                     m.get("n"), m.get("unit"), json.dumps(m["repeats"]) if m.get("repeats") else None,
                     m.get("status", "ok"), m.get("note"), recipe_sha, env_id, checkpoint, limit, now))
            if items:
                self.db.execute(f"DELETE FROM items WHERE {match} AND task = ?", (*kv, build, cell))
                by_metric = itertools.groupby(sorted(items, key=lambda i: i[:2]), key=lambda i: i[:2])
                self.db.executemany(f"INSERT INTO items ({', '.join(ITEM_COLUMNS)}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                                    [(*kv, build, task, metric, scores_json(i[2:] for i in group))
                                     for (task, metric), group in by_metric])

    def rows(self, **where) -> list[dict]:
        clause = " AND ".join(f"{k} = ?" for k in where) or "1"
        return [dict(r) for r in self.db.execute(f"SELECT * FROM results WHERE {clause}", tuple(where.values()))]

    def delete(self, key: dict, cell: str | None = None, build: str | None = None):
        """A key's rows (of one cell, of one build: every build's when not given)."""
        match = " AND ".join(f"{k} = ?" for k in KEY) + (" AND cell = ?" if cell else "") + \
            (" AND build = ?" if build is not None else "")
        args = (*[key[k] for k in KEY], *([cell] if cell else []), *([build] if build is not None else []))
        with self.db:
            self.db.execute(f"DELETE FROM results WHERE {match}", args)
            self.db.execute(f"DELETE FROM items WHERE {match.replace('cell', 'task')}", args)

    def merge(self, other: Path) -> tuple[int, int]:
        """Take in the cells another ledger measured (e.g. a second GPU's stream, or another machine's copy):
        a cell missing here, or measured there later than here, replaces this ledger's rows for that cell,
        in one transaction with its items and engine settings; environment ids are matched by content.
        Returns (cells taken, cells kept as they were)."""
        with contextlib.closing(sqlite3.connect(f"{Path(other).resolve().as_uri()}?mode=ro", uri=True)) as db:
            current = schema_version(db) == VERSION
        if current:
            return self._merge(Path(other))
        with tempfile.TemporaryDirectory() as tmp:  # an older copy is read migrated; the file stays as it is
            copy = Path(tmp) / "ledger.sqlite"
            shutil.copy2(other, copy)
            migrate(copy)
            return self._merge(copy)

    def _merge(self, other: Path) -> tuple[int, int]:
        src = Ledger(other, readonly=True)
        env = {}
        for row in src.db.execute("SELECT id, digest, record FROM env"):
            with self.db:
                self.db.execute("INSERT OR IGNORE INTO env (digest, record) VALUES (?, ?)", (row["digest"], row["record"]))
            env[row["id"]] = self.db.execute("SELECT id FROM env WHERE digest = ?", (row["digest"],)).fetchone()[0]
        settings = dict(self.db.execute("SELECT id, record FROM settings").fetchall())
        exact = " AND ".join(f"{k} = ?" for k in (*KEY, "build")) + " AND cell = ?"
        match = exact.replace("build = ?", "build IN (?, '')")  # here, as write(): rows that never said their build
        taken = kept = 0
        group = ", ".join((*KEY, "build", "cell"))
        cells = src.db.execute(f"SELECT {group}, MAX(created) AS created FROM results GROUP BY {group}")
        for cell in cells.fetchall():
            args = tuple(cell[k] for k in (*KEY, "build", "cell"))
            here = self.db.execute(f"SELECT MAX(created) FROM results WHERE {match}", args).fetchone()[0]
            if here is not None and here >= cell["created"]:
                kept += 1
                continue
            record = src.db.execute("SELECT record FROM settings WHERE id = ?", (cell["settings"],)).fetchone()
            if record and cell["settings"] in settings and json.loads(settings[cell["settings"]]) != json.loads(record[0]):
                raise UserError(f"settings {cell['settings']} differ between {self.path} and {other}; nothing was merged "
                                "from that cell on")
            rows = [dict(r) for r in src.db.execute(f"SELECT * FROM results WHERE {exact}", args)]
            items = src.db.execute(f"SELECT * FROM items WHERE {exact.replace('cell', 'task')}", args).fetchall()
            with self.writing(f"cell {cell['cell']}"), self.db:
                if record:
                    self.db.execute("INSERT OR IGNORE INTO settings VALUES (?, ?)", (cell["settings"], record[0]))
                    settings[cell["settings"]] = record[0]
                self.db.execute(f"DELETE FROM results WHERE {match}", args)
                for r in rows:
                    r["env_id"] = env.get(r["env_id"])
                    self.db.execute(f"INSERT INTO results ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                                    tuple(r[c] for c in COLUMNS))
                if items:
                    self.db.execute(f"DELETE FROM items WHERE {match.replace('cell', 'task')}", args)
                    self.db.executemany(f"INSERT INTO items ({', '.join(ITEM_COLUMNS)}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                                        [tuple(i[c] for c in ITEM_COLUMNS) for i in items])
            taken += 1
        src.close()
        if taken:  # replaced items leave free pages behind: the committed ledger rides in every device call
            self.db.execute("VACUUM")
        return taken, kept

    def close(self):
        self.db.close()


@contextlib.contextmanager
def lock(path: Path):
    """One writer per ledger: a second `moeq eval` on it stops at once, naming the holder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(f".{path.name}.lock")
    try:
        f = open(lock_path, "a+b", buffering=0)  # unbuffered: a full disk fails at write, not at close
    except OSError as e:
        raise UserError(f"cannot write the ledger's lock file {lock_path}: {e.strerror}") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().decode(errors="replace").strip() or "another process"
            raise UserError(f"the ledger {path} is being written by {holder}; wait for it to finish "
                            "(or use another --ledger)") from None
        try:
            f.truncate(0)
            f.write(f"pid {os.getpid()}".encode())
        except OSError as e:
            raise UserError(f"cannot write the ledger's lock file {lock_path}: {e.strerror}") from None
        yield
