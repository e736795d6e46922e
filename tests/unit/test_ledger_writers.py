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
    assert main.db.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 10


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
