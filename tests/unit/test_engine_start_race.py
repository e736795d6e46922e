"""An engine whose start-up memory profile a neighbour spoiled (vLLM: "Error in memory profiling", session 10's
fp8-block accuracy engine beside a quantization that ended) starts once more; twice spoiled is a failure."""
import pytest

from moeq.evaluate import engine, run
from moeq.evaluate.engine import Job


class FakeEngine:
    """Stands for the engine process: exits NEIGHBOUR_EXIT as often as told, then 0."""
    started = []
    spoiled = 0

    def __init__(self, job):
        self.job = job
        FakeEngine.started.append(job.scheme)

    def done(self):
        return True

    def wait(self):
        if FakeEngine.spoiled:
            FakeEngine.spoiled -= 1
            raise run.EngineStartRace(f"engine process for {self.job.model} / {self.job.scheme}: spoiled")


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(run, "EngineProcess", FakeEngine)
    FakeEngine.started = []
    return FakeEngine


def job(scheme):
    return Job(model="tiny", scheme=scheme, path="/nowhere", ledger="/nowhere/l.sqlite", settings={})


def test_a_spoiled_start_is_retried_once(fake):
    fake.spoiled = 1
    lines = []
    run.run_job(job("fp8-block"), log=lines.append)
    assert fake.started == ["fp8-block", "fp8-block"] and "starting it once more" in lines[0]


def test_twice_spoiled_is_a_failure(fake):
    fake.spoiled = 2
    with pytest.raises(run.EngineStartRace):
        run.run_job(job("fp8-block"), log=lambda line: None)


def test_accuracy_engines_retry_once_then_fail(fake):
    fake.spoiled = 1
    assert run.score_jobs([(None, job("fp8"), None), (None, job("w8a16"), None)], 1, log=lambda line: None) == []
    assert fake.started == ["fp8", "fp8", "w8a16"]
    fake.started, fake.spoiled = [], 2
    failures = run.score_jobs([(None, job("fp8"), None)], 1, log=lambda line: None)
    assert fake.started == ["fp8", "fp8"] and failures and "spoiled" in failures[0]


def test_the_engine_exits_with_the_status_the_driver_retries(tmp_path, monkeypatch, capsys):
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
