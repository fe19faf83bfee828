"""Two `llmpipe run`s started together in one project: the second waits, nothing is corrupted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.workloads import make_project, tiny_params
from steps.stages import dvc_stages

pytestmark = pytest.mark.integration

LLMPIPE = Path(sys.executable).parent / "llmpipe"


def test_concurrent_runs_are_serialised_and_leave_a_consistent_workspace(
    tmp_path, tiny_model_dir, prefect_server
):
    from mlflow import MlflowClient

    project = make_project(tmp_path / "project", tiny_params(tiny_model_dir, learning_rate=3.0e-3))
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlflow.db",
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        # the session's server: the lock is llmpipe's own, whichever server runs the flows (a
        # temporary server per run costs ~20 s each and is covered by test_signals)
        "PREFECT_API_URL": prefect_server,
    }
    runs = [
        subprocess.Popen(
            [LLMPIPE, "run", "--no-serve-check"],
            cwd=project,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert any("waiting for the workspace" in o for o in outputs)  # one queued behind the other
    # one of them trained; the other found every stage up to date and registered nothing new
    assert sorted("train cached" in o for o in outputs) == [False, True]
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == {s.name for s in dvc_stages()}
    status = subprocess.run(
        [Path(sys.executable).parent / "dvc", "status", "--json"],
        cwd=project,
        text=True,
        capture_output=True,
        env={**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"},
    )
    assert set(json.loads(status.stdout)) == {"model_source"}, status.stdout + status.stderr
    versions = MlflowClient(env["MLFLOW_TRACKING_URI"]).search_model_versions("name='llmpipe'")
    assert len(versions) == 1
