"""Stages run as subprocesses: outcome records (not console text), kill on interrupt, retries."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.runner import StageFailed, UserInputError, run_logged, run_stage
from steps.stages import Stage

STEP = """
import sys
from pathlib import Path
from steps.errors import UserError
from steps.outcome import run_main
from steps.tracking import log_to_flow_run

def main():
    kind = sys.argv[1]
    print("working on", kind)
    if kind == "bad_input":
        raise UserError("data.txt:3: not valid JSON; fix the line")
    if kind == "crash":
        raise MemoryError("boom")
    if kind == "logs":
        Path("c.json").write_text("{}")
        log_to_flow_run(metrics={"loss": 1.5}, params={"split": "ab"}, artifacts=[Path("c.json")])
        log_to_flow_run(metrics={"ppl": 4.0}, table=({"prompt": ["p"], "tuned": ["t"]}, "s.json"))
        return {"mlflow_imported": "mlflow" in sys.modules}
    return {"documents": 7}

run_main(main)
"""


@pytest.fixture
def fake_steps(tmp_path) -> Path:
    """A project whose package `fake_steps.step` behaves as argv[1] says, through steps.outcome."""
    pkg = tmp_path / "fake_steps"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "step.py").write_text(STEP)
    return tmp_path


TICK = 1 / os.sysconf("SC_CLK_TCK")  # steps.overhead.process_age's resolution


def task_stage(kind: str) -> Stage:
    """A flow task without a DVC stage; its command is `python -m fake_steps.step <kind>`."""
    return Stage(f"fake-{kind}", "fake_steps.step", dvc=False)


@pytest.mark.unit
def test_the_outcome_record_says_what_happened(fake_steps):
    lines: list[str] = []
    done = run_stage(task_stage("ok"), fake_steps, {}, lines.append, extra_args=("ok",))
    assert done.skipped is False and done.facts == {"documents": 7}
    assert 0 < done.step_seconds < done.process_seconds  # + python, imports
    # the process's age is read to the kernel's clock tick (10 ms): a run of ~40 ms can read older
    # than the task's own timer by up to a tick (seen: 0.0400 against 0.0389)
    assert done.process_seconds <= done.seconds + TICK
    assert lines == ["working on ok"]
    with pytest.raises(UserInputError) as info:
        run_stage(task_stage("bad"), fake_steps, {}, lines.append, extra_args=("bad_input",))
    assert str(info.value) == "data.txt:3: not valid JSON; fix the line"
    with pytest.raises(StageFailed, match=r"exit 1\): MemoryError: boom"):
        run_stage(task_stage("crash"), fake_steps, {}, lines.append, extra_args=("crash",))


@pytest.mark.unit
def test_what_a_step_logs_is_logged_by_the_flow_process_into_the_flow_run(fake_steps):
    from mlflow import MlflowClient

    uri = f"sqlite:///{fake_steps / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_RUN_ID": run_id}
    done = run_stage(task_stage("logs"), fake_steps, env, lambda line: None, extra_args=("logs",))
    assert done.facts == {"mlflow_imported": False}  # the step never loads MLflow
    data = client.get_run(run_id).data
    assert data.metrics == {"loss": 1.5, "ppl": 4.0} and data.params == {"split": "ab"}
    assert {a.path for a in client.list_artifacts(run_id)} == {"c.json", "s.json"}


@pytest.mark.integration
def test_a_dvc_stage_that_dvc_skips_is_reported_cached(fake_steps):
    """Real DVC: the first repro runs the step (a record of its facts), the second runs nothing."""
    bin_dir = Path(sys.executable).parent
    subprocess.run(["git", "init", "-q"], cwd=fake_steps, check=True)
    subprocess.run([bin_dir / "dvc", "init", "-q"], cwd=fake_steps, check=True)
    (fake_steps / "dvc.yaml").write_text(
        "stages:\n  fake:\n    cmd: python -m fake_steps.step ok > out.txt\n"
        "    deps: [fake_steps/step.py]\n    outs: [out.txt]\n"
    )
    stage = Stage("fake", "fake_steps.step")
    first = run_stage(stage, fake_steps, {}, lambda line: None)
    assert first.skipped is False and first.facts == {"documents": 7}
    again = run_stage(stage, fake_steps, {}, lambda line: None)
    assert again.skipped is True and again.facts == {}


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
        "from steps.outcome import run_main\n"
        "run_main(lambda: print('second attempt done'))\n"
    )
    lines: list[str] = []

    @task(retries=2, **{**RETRY_POLICY, "retry_delay_seconds": 0})
    def stage() -> float:
        killed_once = Stage("killed_once", "fake_stage.killed_once", dvc=False)
        return run_stage(killed_once, tmp_path, {}, lines.append, (str(tmp_path / "marker"),))

    @flow
    def one_stage() -> str:
        return stage(return_state=True).type.value

    assert one_stage() == "COMPLETED"
    assert (tmp_path / "marker").read_text() == "killed" and lines == ["second attempt done"]
