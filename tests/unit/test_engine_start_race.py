"""An engine whose start-up memory profile a neighbour spoiled (vLLM: "Error in memory profiling", session 10's
fp8-block accuracy engine beside a quantization that ended) starts once more; twice spoiled is a failure."""
import json
from pathlib import Path

import pytest

from moeq.evaluate import engine, run
from moeq.evaluate.engine import Job


class FakePopen:
    """Stands for the engine process the real EngineProcess starts: exits NEIGHBOUR_EXIT as often as told, then 0."""
    started = []
    spoiled = 0

    def __init__(self, argv, env=None):
        FakePopen.started.append(json.loads(Path(argv[-1]).read_text())["scheme"])
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            spoiled = FakePopen.spoiled > 0
            FakePopen.spoiled -= spoiled
            self.returncode = engine.NEIGHBOUR_EXIT if spoiled else 0
        return self.returncode

    def wait(self):
        return self.poll()

    def kill(self):
        pass


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(run.subprocess, "Popen", FakePopen)
    FakePopen.started = []
    return FakePopen


@pytest.fixture
def job(tmp_path):
    return lambda scheme: Job(model="tiny", scheme=scheme, path="/nowhere", ledger=str(tmp_path / "l.sqlite"),
                              settings={})


def test_a_spoiled_start_is_retried_once(fake, job):
    fake.spoiled = 1
    lines = []
    run.run_job(job("fp8-block"), log=lines.append)
    assert fake.started == ["fp8-block", "fp8-block"] and "starting it once more" in lines[0]


def test_twice_spoiled_is_a_failure(fake, job):
    fake.spoiled = 2
    with pytest.raises(RuntimeError, match="spoiled twice"):
        run.run_job(job("fp8-block"), log=lambda line: None)


def test_accuracy_engines_retry_once_then_fail(fake, job):
    fake.spoiled = 1
    assert run.score_jobs([(None, job("fp8"), None), (None, job("w8a16"), None)], 1, log=lambda line: None) == []
    assert fake.started == ["fp8", "fp8", "w8a16"]
    fake.started, fake.spoiled = [], 2
    failures = run.score_jobs([(None, job("fp8"), None)], 1, log=lambda line: None)
    assert fake.started == ["fp8", "fp8"] and failures and "spoiled" in failures[0]


def test_the_engine_exits_with_the_status_the_driver_retries(tmp_path, monkeypatch, capsys, job):
    (tmp_path / "job.json").write_text(engine.job_json(job("fp8-block")))

    def spoiled(job, log=print):
        raise engine.NeighbourFreedMemory("AssertionError: Error in memory profiling. Initial free memory 132.93 GiB")
    monkeypatch.setattr(engine, "run", spoiled)
    monkeypatch.setattr(engine, "die_with_parent", lambda: None)
    monkeypatch.setattr("sys.argv", ["engine", str(tmp_path / "job.json")])
    with pytest.raises(SystemExit) as exit_:
        engine.main()
    assert exit_.value.code == engine.NEIGHBOUR_EXIT not in (0, 1, 2)
    assert "another process freed GPU memory" in capsys.readouterr().out


def test_a_run_removes_only_its_own_ledgers_dead_jobs(fake, tmp_path):
    """Two streams of one host keep ledgers side by side; each run's lock covers its own ledger only, so a
    run must not take the other stream's live job folder for a dead run's (session 11's g0 and g1 did)."""
    mine, other = tmp_path / "ledger-g0.sqlite", tmp_path / "ledger-g1.sqlite"
    live = run.EngineProcess(Job(model="tiny", scheme="bf16", path="/nowhere", ledger=str(other), settings={}))
    dead = Path(tmp_path / f"{run.job_prefix(mine)}killed")
    dead.mkdir()
    lines = []
    run.remove_dead_jobs(mine, log=lines.append)
    assert not dead.exists() and Path(live.tmp.name).is_dir() and len(lines) == 1
    live.wait()
    assert not Path(live.tmp.name).exists()
