"""steps/outcome.py: the record each step leaves for the flow (ran, user error, crash)."""

from __future__ import annotations

import json

import pytest

from steps.errors import USER_ERROR_EXIT, UserError
from steps.outcome import OUTCOME_ENV, read_outcome, run_main

pytestmark = pytest.mark.unit


@pytest.fixture
def record(tmp_path, monkeypatch):
    path = tmp_path / "outcome.json"
    monkeypatch.setenv(OUTCOME_ENV, str(path))
    return path


def test_a_step_that_ran_records_its_facts_and_seconds(record):
    run_main(lambda: {"documents": 3})
    out = json.loads(record.read_text())
    assert out["status"] == "ran" and out["facts"] == {"documents": 3} and out["seconds"] >= 0
    assert out["process_seconds"] > out["seconds"]  # from the process's creation


def test_a_user_error_is_recorded_as_data_and_exits_2(record, capsys):
    def bad():
        raise UserError("data.jsonl:2: not valid JSON")

    with pytest.raises(SystemExit) as exit_info:
        run_main(bad)
    assert exit_info.value.code == USER_ERROR_EXIT
    assert read_outcome(record)["message"] == "data.jsonl:2: not valid JSON"
    assert capsys.readouterr().err == "error: data.jsonl:2: not valid JSON\n"


def test_a_crash_is_recorded_and_re_raised(record):
    def crash():
        raise MemoryError("out of memory\nsecond line")

    with pytest.raises(MemoryError):
        run_main(crash)
    out = read_outcome(record)
    assert out | {"seconds": 0, "process_seconds": 0} == {
        "status": "crashed", "message": "MemoryError: out of memory", "seconds": 0,
        "process_seconds": 0,
    }  # fmt: skip
    assert out["process_seconds"] > out["seconds"]  # this process ran before run_main


def test_without_the_variable_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv(OUTCOME_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    run_main(lambda: {"x": 1})
    assert list(tmp_path.iterdir()) == []
    assert read_outcome(tmp_path / "missing.json") is None
