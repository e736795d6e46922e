"""The one command: every verb parses, and a bad plan file is the user's error (exit 2), not a traceback."""
import pytest

from moeq import cli


@pytest.mark.parametrize("text, message", [(None, "No such file"), ("- a list\n", "expected a mapping"),
                                           ("models: [\n", "plan")])
def test_bad_plan_file_exits_2_naming_it(tmp_path, capsys, text, message):
    plan = tmp_path / "plan.yaml"
    if text is not None:
        plan.write_text(text)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["sweep", str(plan), "--ledger", str(tmp_path / "l.sqlite")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and str(plan) in err and message in err
    assert not (tmp_path / "l.sqlite").exists()


def test_every_verb_module_has_the_verb_interface():
    import importlib
    for name in cli.VERBS:
        verb = importlib.import_module(name)
        assert verb.HELP and verb.ENVIRONMENT in (None, *cli.ENVIRONMENTS) and callable(verb.add_args) and callable(verb.run)


def test_numeric_environment_variables_are_strict(monkeypatch):
    from moeq.env import env_number
    from moeq.errors import UserError
    assert env_number("KV_CACHE_GIB", 2) == 2.0
    monkeypatch.setenv("MOEQ_KV_CACHE_GIB", "0.5")
    assert env_number("KV_CACHE_GIB", 2, low=0.0625) == 0.5
    for bad in ("two", "-1", "0.01"):
        monkeypatch.setenv("MOEQ_KV_CACHE_GIB", bad)
        with pytest.raises(UserError, match=f"MOEQ_KV_CACHE_GIB='{bad}' is not valid; valid: a number >= 0.0625"):
            env_number("KV_CACHE_GIB", 2, low=0.0625)
    monkeypatch.setenv("MOEQ_THREADS", "1.5")
    with pytest.raises(UserError, match="a whole number >= 1"):
        env_number("THREADS", 0, low=1, kind=int)
