"""`llmpipe deploy --pool`: a process worker in a second clone of the project, standing for another
machine, runs the manual deployment; the data reaches it through the DVC remote, its stage outputs
go back there, and the model is registered in the tracking store both clones share (issue 11).

Real Prefect (the session's test server, `prefect work-pool create`, `prefect worker start`),
real DVC (a local-directory remote), real MLflow (one sqlite file at MLFLOW_TRACKING_URI), the
tiny model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from benchmarks.workloads import SAMPLE_TEXT, commit_all, edit_params, make_project, tiny_params
from flows.manual import PROJECT_ENV
from flows.pool import JOB_VARIABLES, PULL_STEP, SYNC_ENV, enter_project, synced
from steps.errors import UserError
from steps.servers import stop_process_group

BIN = Path(sys.executable).parent
POOL = "other-machine"
DATA = "data/raw/notes.jsonl"
RUN_TIMEOUT_S = 600  # the tiny model's whole flow takes about a minute on 2 busy cores


def run(cwd: Path, env: dict[str, str], *cmd: str | Path) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, f"{cmd}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done


def remote_files(remote: Path) -> set[str]:
    return {str(p.relative_to(remote)) for p in remote.rglob("*") if p.is_file()}


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


@pytest.fixture
def origin(tmp_path, tiny_model_dir, shared) -> tuple[Path, Path]:
    """The project where `llmpipe deploy` runs: its data tracked by DVC and pushed to a
    local-directory remote, everything committed. (project, remote)"""
    project = make_project(tmp_path / "origin", tiny_params(tiny_model_dir))
    notes = [f"Note {i}: {SAMPLE_TEXT[i % len(SAMPLE_TEXT)]}" for i in range(40)]
    (project / DATA).parent.mkdir(parents=True, exist_ok=True)
    (project / DATA).write_text("".join(json.dumps({"text": t}) + "\n" for t in notes))
    remote = tmp_path / "dvc-remote"
    run(project, shared, BIN / "dvc", "add", DATA)
    run(project, shared, BIN / "dvc", "remote", "add", "--default", "shared", remote)
    run(project, shared, BIN / "dvc", "push")
    edit_params(project / "params.yaml", {"prepare": {"data": DATA}})
    commit_all(project, "data under DVC, pushed to the shared remote")
    return project, remote


@pytest.fixture
def pool(origin, shared) -> str:
    """A process work pool, made as the README says (before a worker starts: `prefect worker
    start` would make a missing pool itself)."""
    made = run(origin[0], shared, BIN / "prefect", "work-pool", "create", POOL, "--type", "process")
    assert f"Created work pool {POOL!r}" in made.stdout, made.stdout  # the README walk expects it
    return POOL


@pytest.fixture
def worker(tmp_path, origin, shared, pool):
    """`prefect worker start --pool` in a git clone of the origin (no data, no DVC cache): the
    clone's code first on its Python path, as the clone's own editable install would put it.
    Yields (clone, log file); its process group is stopped at the end."""
    clone = tmp_path / "clone"
    run(tmp_path, shared, "git", "clone", "-q", origin[0], clone)
    assert not (clone / DATA).exists()
    env = {
        **shared,
        PROJECT_ENV: str(clone),
        "PYTHONPATH": str(clone),
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # poll often (default 10 s)
    }
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", POOL],
                                cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        yield clone, log
    finally:
        stop_process_group(proc, grace=30)


def lock_outs(project: Path, stage: str) -> list[dict]:
    return yaml.safe_load((project / "dvc.lock").read_text())["stages"][stage]["outs"]


@pytest.mark.integration
def test_a_worker_in_another_clone_runs_the_manual_deployment(origin, shared, worker):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    project, remote = origin
    clone, log = worker
    pushed_before = remote_files(remote)
    deployed = run(project, shared, BIN / "llmpipe", "deploy", "--pool", POOL).stdout
    assert f"on work pool '{POOL}'" in deployed

    with get_client(sync_client=True) as client:
        manual = client.read_deployment_by_name("finetune/manual")
        scheduled = client.read_deployment_by_name("finetune/retrain-on-new-data")
    for deployment in (manual, scheduled):
        assert deployment.work_pool_name == POOL
        assert deployment.pull_steps == [{PULL_STEP: {}}]
        assert deployment.job_variables == {"env": {SYNC_ENV: "1"}} == JOB_VARIABLES
    assert manual.entrypoint == "flows.manual.manual_finetune"

    started = time.monotonic()
    flow_run = run_deployment(
        "finetune/manual", parameters={"serve_check": False}, timeout=RUN_TIMEOUT_S
    )
    seconds = time.monotonic() - started
    assert flow_run.state.is_completed(), (
        f"{flow_run.state}\n" + log.read_text(errors="replace")[-6000:]
    )
    print(f"the manual deployment's run took {seconds:.0f} s on the worker")

    # it ran in the clone, on the data it pulled, and the origin is as it was
    assert (clone / DATA).read_bytes() == (project / DATA).read_bytes()
    assert json.loads((clone / "metrics/eval.json").read_text())["perplexity"] > 0
    assert not (project / "metrics/eval.json").exists()
    # the stage outputs went to the remote: the prepared data and the tuned model among them
    pushed = remote_files(remote) - pushed_before
    for stage, path in (("prepare", "data/prepared"), ("train", "models/tuned")):
        md5 = next(out["md5"] for out in lock_outs(clone, stage) if out["path"] == path)
        assert f"files/md5/{md5[:2]}/{md5[2:]}" in pushed, f"{path} was not pushed"
    in_sync = run(clone, shared, BIN / "dvc", "status", "--cloud").stdout
    assert "Cache and remote 'shared' are in sync" in in_sync, in_sync
    # the runner's `llmpipe deploy` would leave them on the pool, broken for its worker: refused
    refused = subprocess.run([str(BIN / "llmpipe"), "deploy"], cwd=project, env=shared,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"error: finetune/manual is on work pool '{POOL}' (llmpipe deploy --pool); keep it there "
        f"with `llmpipe deploy --pool {POOL}`, or delete it first to deploy it for a "
        "runner: `prefect deployment delete finetune/manual`"
    ], refused.stderr[-2000:]
    # registered in the shared tracking store
    versions = MlflowClient(shared["MLFLOW_TRACKING_URI"]).search_model_versions("name='llmpipe'")
    assert [int(v.version) for v in versions] == [1]


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
