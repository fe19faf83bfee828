"""`llmpipe deploy --pool`: its refusals, the pull step that enters the worker's project, and the
default path that syncs nothing. The end-to-end run (a worker in a second clone runs the manual
deployment, its data through the DVC remote, into PostgreSQL-backed servers) is
tests/flows/test_team_setup.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.manual import PROJECT_ENV
from flows.pool import SYNC_ENV, enter_project, synced
from steps.errors import UserError

BIN = Path(sys.executable).parent
POOL = "other-machine"


@pytest.fixture
def shared(tmp_path, prefect_server) -> dict[str, str]:
    """The environment both machines share: the Prefect server and the MLflow tracking store."""
    (tmp_path / "shared").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LLMPIPE_"))}
    return {
        **env,
        "PREFECT_API_URL": prefect_server,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'shared/mlflow.db'}",
    }


@pytest.mark.integration
def test_deploy_to_a_pool_that_does_not_exist_names_the_command_that_creates_it(tmp_path, shared):
    (tmp_path / "params.yaml").write_text((Path(__file__).parents[2] / "params.yaml").read_text())
    done = subprocess.run([str(BIN / "llmpipe"), "deploy", "--pool", "nowhere"], cwd=tmp_path,
                          env=shared, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        "error: work pool 'nowhere' not found on the Prefect server; create it: "
        "`prefect work-pool create nowhere --type process` (or --type docker / kubernetes with a "
        "template of deploy/)"
    ]


@pytest.mark.unit
def test_the_pull_step_enters_the_project_the_worker_names(tmp_path, monkeypatch):
    monkeypatch.delenv(PROJECT_ENV, raising=False)
    with pytest.raises(UserError, match=f"{PROJECT_ENV} is not set on the worker"):
        enter_project()
    monkeypatch.setenv(PROJECT_ENV, str(tmp_path))
    with pytest.raises(UserError, match=r"no params\.yaml there"):
        enter_project()
    (tmp_path / "params.yaml").write_text("")
    assert enter_project() == {"directory": str(tmp_path.resolve())}


@pytest.mark.unit
def test_off_a_pool_a_run_pulls_and_pushes_nothing(tmp_path, monkeypatch):
    """The runner's deployments set no LLMPIPE_DVC_SYNC: `synced` only calls the run (no DVC
    call could succeed here: tmp_path is no DVC project)."""
    monkeypatch.delenv(SYNC_ENV, raising=False)
    assert synced(tmp_path, lambda: {"done": True}) == {"done": True}
