"""A run stopped at any step (SIGTERM from a service manager, SIGHUP from a closed terminal, Ctrl-C)
leaves the champion where it was, its MLflow run FAILED, the lock free and no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from benchmarks.workloads import make_project, tiny_params
from steps.registry import champion_version

pytestmark = pytest.mark.integration

LLMPIPE = Path(sys.executable).parent / "llmpipe"

# (signal, a line of the run's log that shows it is inside that step)
STOP_POINTS = [
    (signal.SIGTERM, "Running stage 'train'"),  # inside a DVC stage
    (signal.SIGHUP, "Task run 'register-"),  # while the candidate is registered
    (signal.SIGINT, "smoke_serve: serving models:/"),  # while the candidate is being served
]


def processes_in(project: Path) -> list[psutil.Process]:
    """Live processes whose working directory is the project (stages, servers, the run itself)."""
    found = []
    for proc in psutil.process_iter(["cwd", "status"]):
        if proc.info["cwd"] == str(project) and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def run_and_stop(project: Path, env: dict[str, str], sig: signal.Signals, marker: str) -> str:
    """Start `llmpipe run`, send `sig` once `marker` appears in its output to its whole process
    group, as a terminal's Ctrl-C or a service manager's stop does; return the output."""
    proc = subprocess.Popen([LLMPIPE, "run"], cwd=project, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            time.sleep(1)  # well inside the step
            os.killpg(proc.pid, sig)  # llmpipe leads its group (start_new_session)
            break
    rest, _ = proc.communicate(timeout=120)
    output = "".join(lines) + rest
    assert proc.returncode == 128 + sig, output[-3000:]
    return output


def test_a_run_stopped_at_any_step_changes_nothing_and_leaves_nothing(
    tmp_path, tiny_model_dir, prefect_server
):
    from mlflow import MlflowClient

    project = make_project(tmp_path / "project", tiny_params(tiny_model_dir, learning_rate=3e-3))
    uri = f"sqlite:///{project}/mlflow.db"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    for sig, marker in STOP_POINTS:
        # the first run starts its own temporary Prefect server, which the stop must take down
        # too; the others use the session's server (a temporary one takes ~20 s to start)
        if sig != STOP_POINTS[0][0]:
            env["PREFECT_API_URL"] = prefect_server
        output = run_and_stop(project, env, sig, marker)
        if "PREFECT_API_URL" not in env:  # its own server, out of reach of the group's signal
            assert "llmpipe: a temporary Prefect server on http://127.0.0.1:" in output
        assert f"error: llmpipe stopped by {sig.name}; the running stage was killed" in output
        assert "Traceback" not in output, output[-3000:]
        assert champion_version(uri, "llmpipe") is None, f"{sig.name} at {marker!r}"
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("llmpipe")
        [last] = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"],
                                    max_results=1)  # fmt: skip
        assert last.info.status == "FAILED", (sig.name, output[-4000:])
        assert (project / ".llmpipe.lock").read_text() == ""  # released
        deadline = time.monotonic() + 20  # processes may take a moment to be reaped
        while (left := processes_in(project)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, [" ".join(p.cmdline())[:120] for p in left]
        if sig == signal.SIGINT:  # smoke_serve runs only for a candidate that passed the gate:
            assert "register: gate passed=True" in output  # only the stop kept the champion


def test_a_task_timeout_on_smoke_serve_stops_the_scoring_server(project, prefect_server):
    """The smoke_serve task hits its timeout while the scoring server starts: the step and the
    server it started (in a session of its own) are both stopped; champion unchanged."""
    from dataclasses import replace

    from prefect import flow

    from flows.finetune import run_task
    from steps.stages import STAGE

    uri = f"sqlite:///{project}/mlflow.db"
    stage = replace(STAGE["smoke_serve"], timeout_s=6, retries=0)
    env = {"MLFLOW_TRACKING_URI": uri}

    @flow
    def serve_with_a_short_timeout() -> None:
        run_task(stage, project, env, ("--model-uri", "models:/llmpipe/1"))

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        serve_with_a_short_timeout()
    assert time.monotonic() - started < 60  # stopped by SIGTERM, not left to finish
    deadline = time.monotonic() + 20
    while processes_in(project) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_in(project) == []
    assert str(champion_version(uri, "llmpipe").version) == "1"
