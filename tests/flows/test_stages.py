"""Running stages as subprocesses: output streaming, kill on interrupt, and the retry policy."""

from __future__ import annotations

import os
import sys
import time

import pytest

from flows.stages import StageFailed, UserInputError, run_logged, run_step_module, user_error_line


@pytest.mark.unit
def test_user_error_line_needs_exit_2_and_an_error_line():
    lines = [
        "Running stage 'prepare':",
        "error: data/x.jsonl:3: not valid JSON (oops)",
        "ERROR: failed to reproduce 'prepare': failed to run: python -m steps.prepare, exited with 2",
    ]
    assert user_error_line(lines) == "data/x.jsonl:3: not valid JSON (oops)"
    assert user_error_line([*lines[:2], "... exited with 1"]) is None  # a crash, not the user
    assert user_error_line(["exited with 2"]) is None  # no message to show


@pytest.mark.unit
def test_run_logged_streams_lines_and_returns_the_exit_code(tmp_path):
    seen = []
    code, tail = run_logged(
        [sys.executable, "-c", "print('a'); print('b'); raise SystemExit(3)"],
        tmp_path,
        dict(os.environ),
        seen.append,
    )
    assert code == 3 and seen == ["a", "b"] and tail == ["a", "b"]


@pytest.mark.unit
def test_interrupt_kills_the_stage_and_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n"
    )

    def interrupt(line: str) -> None:
        raise KeyboardInterrupt  # what a task timeout or Ctrl-C does to the waiting task

    with pytest.raises(KeyboardInterrupt):
        run_logged([sys.executable, "-c", script], tmp_path, dict(os.environ), interrupt)
    child = int(pid_file.read_text())
    for _ in range(50):  # the grandchild is reaped by init shortly after SIGKILL
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {child} survived the interrupt")


@pytest.mark.unit
def test_step_module_exit_2_is_a_user_error_other_codes_are_transient(tmp_path, monkeypatch):
    pkg = tmp_path / "fake_steps"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "bad_input.py").write_text(
        "import sys\nprint('error: data.txt: empty', file=sys.stderr)\nsys.exit(2)\n"
    )
    (pkg / "crash.py").write_text("raise MemoryError('boom')\n")
    with pytest.raises(UserInputError, match=r"data\.txt: empty"):
        run_step_module("fake_steps.bad_input", [], tmp_path, {}, lambda line: None)
    with pytest.raises(StageFailed, match="exit 1"):
        run_step_module("fake_steps.crash", [], tmp_path, {}, lambda line: None)


@pytest.mark.integration
def test_prefect_retries_transient_failures_but_not_user_errors(prefect_server):
    from prefect import flow, task

    from flows.finetune import not_user_error

    attempts = {"user": 0, "flaky": 0}

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=not_user_error)
    def bad_input() -> None:
        attempts["user"] += 1
        raise UserInputError("data.txt: empty")

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=not_user_error)
    def flaky() -> str:
        attempts["flaky"] += 1
        if attempts["flaky"] < 3:
            raise StageFailed("killed")
        return "ok"

    @flow
    def both() -> tuple:
        states = bad_input(return_state=True), flaky(return_state=True)
        return tuple(s.type.value for s in states)

    assert both() == ("FAILED", "COMPLETED")
    assert attempts == {"user": 1, "flaky": 3}


@pytest.mark.integration
def test_a_killed_stage_is_retried_by_prefect(prefect_server, tmp_path):
    """A stage process killed by SIGKILL (out-of-memory killer, a node going away) is retried."""
    from prefect import flow, task

    from flows.finetune import RETRY_POLICY

    pkg = tmp_path / "fake_stage"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "killed_once.py").write_text(
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "marker = Path(sys.argv[1])\n"
        "if not marker.exists():\n"
        "    marker.write_text('killed')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "print('second attempt done')\n"
    )
    lines: list[str] = []

    @task(retries=2, **{**RETRY_POLICY, "retry_delay_seconds": 0})
    def stage() -> float:
        return run_step_module(
            "fake_stage.killed_once", [str(tmp_path / "marker")], tmp_path, {}, lines.append
        )

    @flow
    def one_stage() -> str:
        return stage(return_state=True).type.value

    assert one_stage() == "COMPLETED"
    assert (tmp_path / "marker").read_text() == "killed" and lines == ["second attempt done"]
