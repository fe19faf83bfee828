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


# A step process as `python -m steps.X` runs it: exit handlers of both kinds, a file written in
# the step, buffered output, and an object that only the interpreter's teardown finalises
STEP = """
import atexit, os, sys, threading, time
from pathlib import Path
from steps.errors import UserError
from steps.outcome import run_step

out = Path(sys.argv[1])

class Teardown:  # a module-level object: only the interpreter's teardown finalises it
    def __del__(self, write=os.write, fd=os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT)):
        write(fd, b"teardown\\n")

KEPT = Teardown()
atexit.register(lambda: out.open("a").write("atexit\\n"))
threading._register_atexit(lambda: out.open("a").write("threading-atexit\\n"))
worker = threading.Thread(target=lambda: (time.sleep(0.5), out.open("a").write("thread\\n")))
worker.start()

def main():
    print("buffered", end="")
    if sys.argv[2] == "user-error":
        raise UserError("params.yaml: train.max_steps: must be > 0")
    if sys.argv[2] == "crash":
        raise RuntimeError("boom")
    return {"ok": 1}

run_step(main)
"""


@pytest.mark.parametrize(
    ("how", "status", "events"),
    [
        ("ran", 0, ["threading-atexit", "thread", "atexit"]),
        ("user-error", USER_ERROR_EXIT, ["threading-atexit", "thread", "atexit"]),
        # a crash exits the stock way: its traceback, then the teardown
        ("crash", 1, ["threading-atexit", "thread", "atexit", "teardown"]),
    ],
)
def test_a_step_process_exits_without_the_teardown_but_runs_its_exit_handlers(
    tmp_path, how, status, events
):
    import subprocess
    import sys

    from benchmarks.workloads import REPO

    events_file = tmp_path / "events.txt"
    done = subprocess.run(
        [sys.executable, "-c", STEP, str(events_file), how],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", OUTCOME_ENV: str(tmp_path / "outcome.json")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == status, done.stderr
    assert done.stdout == "buffered"  # flushed before the process left
    # threading's exit hooks, the wait for the non-daemon thread, then atexit's handlers, in the
    # order of a normal exit; the teardown itself only after a crash
    assert events_file.read_text().split() == events
    assert read_outcome(tmp_path / "outcome.json")["status"] == {
        "ran": "ran", "user-error": "user_error", "crash": "crashed"
    }[how]  # fmt: skip
