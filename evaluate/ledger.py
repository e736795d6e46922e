"""The results ledger: one SQLite file, one row per (model, scheme, cell or task, metric).

Every write is one transaction, so a run killed part-way leaves only whole rows behind, and a rerun
skips what `has()` finds. Repeated timings and per-item accuracy scores are kept beside the summary
values so that the report can compute its own intervals (bootstrap, paired comparisons).
"""
import hashlib
import json
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS env (
  id INTEGER PRIMARY KEY, digest TEXT UNIQUE NOT NULL, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
  model TEXT NOT NULL, scheme TEXT NOT NULL, provenance TEXT NOT NULL, backend TEXT NOT NULL,
  device TEXT NOT NULL, kind TEXT NOT NULL, cell TEXT NOT NULL, metric TEXT NOT NULL,
  value REAL, spread REAL, spread_kind TEXT, n INTEGER, unit TEXT, repeats TEXT,
  status TEXT NOT NULL DEFAULT 'ok', note TEXT, recipe_sha TEXT, env_id INTEGER REFERENCES env(id),
  created TEXT NOT NULL,
  PRIMARY KEY (model, scheme, provenance, backend, device, cell, metric));
CREATE TABLE IF NOT EXISTS items (
  model TEXT NOT NULL, scheme TEXT NOT NULL, provenance TEXT NOT NULL, backend TEXT NOT NULL,
  device TEXT NOT NULL, task TEXT NOT NULL, metric TEXT NOT NULL, item INTEGER NOT NULL, value REAL NOT NULL,
  PRIMARY KEY (model, scheme, provenance, backend, device, task, metric, item));
"""

KEY = ("model", "scheme", "provenance", "backend", "device")


class Ledger:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=60)
        self.db.row_factory = sqlite3.Row
        with self.db:
            self.db.executescript(SCHEMA)

    def env_id(self, record: dict) -> int:
        text = json.dumps(record, sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        with self.db:
            self.db.execute("INSERT OR IGNORE INTO env (digest, record) VALUES (?, ?)", (digest, text))
        return self.db.execute("SELECT id FROM env WHERE digest = ?", (digest,)).fetchone()[0]

    def has(self, key: dict, cell: str) -> bool:
        """True if the cell (a perf cell or a task) already has rows for this key."""
        where = " AND ".join(f"{k} = ?" for k in KEY)
        row = self.db.execute(f"SELECT 1 FROM results WHERE {where} AND cell = ? LIMIT 1",
                              (*[key[k] for k in KEY], cell)).fetchone()
        return row is not None

    def write(self, key: dict, kind: str, cell: str, metrics: list[dict], items: list[tuple] = (),
              env_id: int | None = None, recipe_sha: str | None = None):
        """All of a cell's metrics (and per-item scores) in one transaction, replacing earlier ones.

        Each metric: {metric, value, spread?, spread_kind?, n?, unit?, repeats?, status?, note?}.
        Each item: (task, metric, item_index, value).
        """
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        kv = [key[k] for k in KEY]
        with self.db:
            self.db.execute(f"DELETE FROM results WHERE {' AND '.join(f'{k} = ?' for k in KEY)} AND cell = ?",
                            (*kv, cell))
            for m in metrics:
                self.db.execute(
                    "INSERT INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (*kv, kind, cell, m["metric"], m.get("value"), m.get("spread"), m.get("spread_kind"),
                     m.get("n"), m.get("unit"), json.dumps(m["repeats"]) if m.get("repeats") else None,
                     m.get("status", "ok"), m.get("note"), recipe_sha, env_id, now))
            if items:
                self.db.execute(f"DELETE FROM items WHERE {' AND '.join(f'{k} = ?' for k in KEY)} AND task = ?",
                                (*kv, cell))
                self.db.executemany("INSERT INTO items VALUES (?,?,?,?,?,?,?,?,?)",
                                    [(*kv, *item) for item in items])

    def rows(self, **where) -> list[dict]:
        clause = " AND ".join(f"{k} = ?" for k in where) or "1"
        return [dict(r) for r in self.db.execute(f"SELECT * FROM results WHERE {clause}", tuple(where.values()))]

    def close(self):
        self.db.close()
