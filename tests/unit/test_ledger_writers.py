"""`moeq ledger merge`: cells measured in another copy of a ledger (a second GPU's stream) come in whole;
and an engine whose driver is gone stops before it writes to any ledger."""
import sqlite3
import subprocess
import sys
import time

from moeq.evaluate.ledger import Ledger

KEY = {"model": "mixtral", "scheme": "fp8", "provenance": "shape-only", "backend": "vllm-cuda",
       "device": "NVIDIA H200", "settings": "s1"}


def ledger_with(path, cells, env=None, value=1.0):
    db = Ledger(path)
    db.add_settings("s1", {"llm": {}})
    env_id = db.env_id(env or {"device": "NVIDIA H200"})
    for cell in cells:
        db.write(KEY, "perf", cell, [{"metric": "throughput", "value": value, "repeats": [value, value]},
                                     {"metric": "itl_p50", "value": value / 10}], env_id=env_id)
    return db


def test_merge_takes_missing_and_newer_cells_and_keeps_the_rest(tmp_path):
    main = ledger_with(tmp_path / "main.sqlite", ["b1", "b16"], value=1.0)
    time.sleep(1.1)  # `created` has one-second resolution: the other copy's cells are later
    other = ledger_with(tmp_path / "gpu1.sqlite", ["b16", "b64"], env={"device": "NVIDIA H200", "gpu": "1"}, value=2.0)
    other.add_settings("s2", {"llm": {"moe_backend": "triton"}})
    other.write(dict(KEY, settings="s2"), "perf", "b1", [{"metric": "throughput", "value": 3.0}])
    other.close()
    assert main.merge(tmp_path / "gpu1.sqlite") == (3, 0)
    values = {(r["settings"], r["cell"], r["metric"]): r["value"] for r in main.rows()}
    assert values[("s1", "b1", "throughput")] == 1.0      # only here: kept
    assert values[("s1", "b16", "throughput")] == 2.0     # newer there: taken, both metrics
    assert values[("s1", "b16", "itl_p50")] == 0.2
    assert values[("s1", "b64", "throughput")] == 2.0     # missing here: taken
    assert values[("s2", "b1", "throughput")] == 3.0      # with its engine settings
    assert main.db.execute("SELECT COUNT(*) FROM settings").fetchone()[0] == 2
    # the taken rows point at the other copy's environment record, re-numbered here by content
    env = main.db.execute("SELECT e.record FROM results r JOIN env e ON e.id = r.env_id WHERE r.cell = 'b64'").fetchone()[0]
    assert '"gpu": "1"' in env
    assert main.merge(tmp_path / "gpu1.sqlite") == (0, 3)  # merging again changes nothing


def test_merge_leaves_no_free_pages(tmp_path):
    """Per-item scores replaced by a later copy's would leave free pages; the merged file is compacted."""
    items = [("moeq_mc4", "acc", i, 1.0) for i in range(20000)]
    main = Ledger(tmp_path / "main.sqlite")
    main.add_settings("s1", {"llm": {}})
    main.write(dict(KEY, provenance="real"), "accuracy", "moeq_mc4", [{"metric": "acc", "value": 1.0}], items)
    time.sleep(1.1)
    other = Ledger(tmp_path / "gpu1.sqlite")
    other.add_settings("s1", {"llm": {}})
    other.write(dict(KEY, provenance="real"), "accuracy", "moeq_mc4", [{"metric": "acc", "value": 0.5}], items[:10])
    other.close()
    assert main.merge(tmp_path / "gpu1.sqlite") == (1, 0)
    assert main.db.execute("PRAGMA freelist_count").fetchone()[0] == 0
    assert main.db.execute("SELECT COUNT(*) FROM item_rows").fetchone()[0] == 10


def test_merge_verb_refuses_a_missing_ledger(tmp_path):
    ledger_with(tmp_path / "main.sqlite", ["b1"]).close()
    out = subprocess.run([sys.executable, "-m", "moeq.cli", "ledger", "merge", "--ledger", str(tmp_path / "main.sqlite"),
                          "--from", str(tmp_path / "nope.sqlite")], capture_output=True, text=True)
    assert out.returncode == 2 and "no ledger at" in out.stderr and "nope.sqlite" in out.stderr
    with sqlite3.connect(tmp_path / "main.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 2


def test_an_engine_whose_driver_is_gone_measures_nothing(tmp_path):
    """A driver killed while its engine process was starting: the engine sees another parent and stops."""
    job = tmp_path / "job.json"
    job.write_text("{}")
    env = {**__import__("os").environ, "MOEQ_DRIVER_PID": "1"}  # not this test's pid, the engine's real parent
    out = subprocess.run([sys.executable, "-m", "moeq.evaluate.engine", str(job)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 1 and "ended before this engine started" in out.stderr


# schema 2 (sessions 1-14): no build column, so a rebuilt model's rows replaced the earlier build's
V2_SCHEMA = """
CREATE TABLE env (id INTEGER PRIMARY KEY, digest TEXT UNIQUE NOT NULL, record TEXT NOT NULL);
CREATE TABLE settings (id TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE results (
  model TEXT NOT NULL, scheme TEXT NOT NULL, provenance TEXT NOT NULL, backend TEXT NOT NULL,
  device TEXT NOT NULL, settings TEXT NOT NULL, kind TEXT NOT NULL, cell TEXT NOT NULL, metric TEXT NOT NULL,
  value REAL, spread REAL, spread_kind TEXT, n INTEGER, unit TEXT, repeats TEXT,
  status TEXT NOT NULL DEFAULT 'ok', note TEXT, recipe_sha TEXT, env_id INTEGER REFERENCES env(id),
  checkpoint TEXT, item_limit INTEGER, created TEXT NOT NULL,
  PRIMARY KEY (model, scheme, provenance, backend, device, settings, cell, metric));
CREATE TABLE items (
  model TEXT NOT NULL, scheme TEXT NOT NULL, provenance TEXT NOT NULL, backend TEXT NOT NULL,
  device TEXT NOT NULL, settings TEXT NOT NULL, task TEXT NOT NULL, metric TEXT NOT NULL, item INTEGER NOT NULL,
  value REAL NOT NULL,
  PRIMARY KEY (model, scheme, provenance, backend, device, settings, task, metric, item)) WITHOUT ROWID;
"""
REAL = dict(KEY, model="moe-500m", scheme="bf16", provenance="real")


def _v2_ledger(path):
    with sqlite3.connect(path) as db:
        db.executescript(V2_SCHEMA)
        db.execute("PRAGMA user_version = 2")
        db.execute("INSERT INTO settings VALUES ('s1', '{}')")
        for scheme, prov, ckpt in (("bf16", "real", "buildA"), ("fp8", "real", "q1+from:buildA"),
                                   ("fp8-online", "real", "buildA+vllm:fp8"), ("fp8", "shape-only", "cfg")):
            db.execute("INSERT INTO results (model, scheme, provenance, backend, device, settings, kind, cell, metric, "
                       "value, checkpoint, created) VALUES ('moe-500m', ?, ?, 'vllm-cuda', 'NVIDIA H200', 's1', "
                       "'accuracy', 'moeq_mc4', 'acc', 0.5, ?, 'then')", (scheme, prov, ckpt))
            db.execute("INSERT INTO items VALUES ('moe-500m', ?, ?, 'vllm-cuda', 'NVIDIA H200', 's1', 'moeq_mc4', "
                       "'acc', 0, 1.0)", (scheme, prov))
    db.close()


def test_schema_2_ledgers_get_each_rows_build(tmp_path):
    """Migration names the build each row measured, from its checkpoint; per-item scores take their cell's."""
    _v2_ledger(tmp_path / "v2.sqlite")
    db = Ledger(tmp_path / "v2.sqlite")
    got = dict(db.db.execute("SELECT scheme || ' ' || provenance, build FROM results").fetchall())
    assert got == {"bf16 real": "buildA", "fp8 real": "buildA", "fp8-online real": "buildA", "fp8 shape-only": ""}
    assert dict(db.db.execute("SELECT scheme || ' ' || provenance, build FROM item_rows").fetchall()) == got


def test_a_rebuilt_model_keeps_the_earlier_builds_rows(tmp_path):
    """Session 15 rebuilt moe-500m (other weights) and its bf16 scores replaced the first build's: now each
    build keeps its rows; re-measuring one build (or re-quantizing it) still replaces that build's rows."""
    db = Ledger(tmp_path / "l.sqlite")
    db.add_settings("s1", {"llm": {}})
    for ckpt, value in (("buildA", 0.80), ("buildB", 0.70)):
        db.write(REAL, "accuracy", "moeq_mc4", [{"metric": "acc", "value": value}], [("moeq_mc4", "acc", 0, value)],
                 checkpoint=ckpt)
    assert db.has(REAL, "moeq_mc4", "buildA") and db.has(REAL, "moeq_mc4", "buildB")
    assert not db.has(REAL, "moeq_mc4", "buildC")
    db.write(REAL, "accuracy", "moeq_mc4", [{"metric": "acc", "value": 0.75}], [("moeq_mc4", "acc", 0, 0.75)],
             checkpoint="buildB")
    for table in ("results", "item_rows"):
        assert sorted(map(tuple, db.db.execute(f"SELECT build, value FROM {table}"))) == [("buildA", 0.8), ("buildB", 0.75)]
    fp8 = dict(REAL, scheme="fp8")
    db.write(fp8, "accuracy", "moeq_mc4", [{"metric": "acc", "value": 0.7}], checkpoint="q1+from:buildA")
    db.write(fp8, "accuracy", "moeq_mc4", [{"metric": "acc", "value": 0.6}], checkpoint="q2+from:buildA")  # new recipe
    assert [r["checkpoint"] for r in db.rows(scheme="fp8")] == ["q2+from:buildA"]
    # dummy weights have no build: a changed shape-only folder replaces its rows, as before
    shape = dict(KEY, provenance="shape-only")
    db.write(shape, "perf", "b1", [{"metric": "throughput", "value": 1.0}], checkpoint="cfg1")
    db.write(shape, "perf", "b1", [{"metric": "throughput", "value": 2.0}], checkpoint="cfg2")
    assert [r["value"] for r in db.rows(provenance="shape-only")] == [2.0]


def test_merge_keeps_both_builds_and_reads_an_older_schema(tmp_path):
    _v2_ledger(tmp_path / "v2.sqlite")
    before = (tmp_path / "v2.sqlite").read_bytes()
    main = Ledger(tmp_path / "main.sqlite")
    main.add_settings("s1", {})
    main.write(dict(REAL, settings="s1"), "accuracy", "moeq_mc4", [{"metric": "acc", "value": 0.9}], checkpoint="buildB")
    assert main.merge(tmp_path / "v2.sqlite") == (4, 0)
    assert (tmp_path / "v2.sqlite").read_bytes() == before  # read from a migrated copy
    assert sorted(map(tuple, main.db.execute("SELECT build, value FROM results WHERE scheme = 'bf16'"))) == [
        ("buildA", 0.5), ("buildB", 0.9)]
