"""The deployments on a Prefect work pool: a worker on another machine runs them in its clone.

    prefect work-pool create gpu --type process               # once, on the Prefect server
    llmpipe deploy --pool gpu                                 # in the project (PREFECT_API_URL)
    LLMPIPE_PROJECT_DIR=$PWD prefect worker start --pool gpu  # in the clone on the GPU machine

The two deployments of flows/deploy.py (`manual`, `retrain-on-new-data`), placed on the pool instead
of being served by `llmpipe up`'s runner. How a worker's flow run finds its project: a worker starts
each flow run in a process (or a container) of its own, in a working directory that is not the
project (a process worker makes a temporary one). The deployments' pull step,
`flows.pool.enter_project`, moves the flow run into the directory LLMPIPE_PROJECT_DIR names in the
worker's environment (its own clone; /opt/llmpipe in deploy/Dockerfile's image): the variable the
runner sets too, so the flows find their project as they do under `llmpipe up`. The code that runs
is the llmpipe the worker's Python imports (the clone's editable install).

Another machine has a workspace of its own. The deployments set LLMPIPE_DVC_SYNC=1 in their job
variables, and then, when the project has a default DVC remote, the flows `dvc pull` before the
stages (the data, and the outputs of earlier runs so that DVC skips what is up to date) and `dvc
push` the stage outputs after a run that succeeded. The model is registered at MLFLOW_TRACKING_URI
(the worker's environment, or the pool's job template, points it at the shared server). The runner's
deployments set no such variable: a single machine pulls and pushes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from steps.errors import UserError
from steps.params import PARAMS_FILE, Params

SYNC_ENV = "LLMPIPE_DVC_SYNC"
JOB_VARIABLES = {"env": {SYNC_ENV: "1"}}  # the pool deployments' (merged into the pool's env)
PULL_STEP = "flows.pool.enter_project"
DVC_RETRY_DELAYS = [10, 60]  # seconds: a remote over the network can blink


def check_pool(name: str) -> None:
    """UserError naming the pool and the command that creates it, when the server has none."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            raise UserError(
                f"work pool {name!r} not found on the Prefect server; create it: "
                f"`prefect work-pool create {name} --type process` (or --type docker / kubernetes "
                "with a template of deploy/)"
            ) from None


def check_not_on_a_pool() -> None:
    """UserError when one of the two deployments sits on a work pool: deploying it for a runner
    (`llmpipe deploy` without --pool) would update it but leave it on the pool (Prefect's update
    keeps the pool), without its pull step and job variables, where a worker's run of it fails."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from flows.deploy import MANUAL, SCHEDULED
    from flows.manual import manual_finetune

    with get_client(sync_client=True) as client:
        for name in (f"{manual_finetune.name}/{d}" for d in (MANUAL, SCHEDULED)):
            try:
                pool = client.read_deployment_by_name(name).work_pool_name
            except ObjectNotFound:
                continue
            if pool:
                raise UserError(
                    f"{name} is on work pool {pool!r} (llmpipe deploy --pool); keep it there "
                    f"with `llmpipe deploy --pool {pool}`, or delete it first to deploy it for a "
                    f"runner: `prefect deployment delete {name}`"
                )


class WorkerProject:
    """Where a pool deployment's code is: already on the worker, in its project (Prefect's
    RunnerStorage protocol, of which only the pull step is used)."""

    pull_interval = None

    def set_base_path(self, path: Path) -> None:
        """Nothing to download, so no place to put it."""

    @property
    def destination(self) -> Path:
        from flows.manual import PROJECT_ENV

        return Path(os.environ.get(PROJECT_ENV, "."))

    async def pull_code(self) -> None:
        """The code is the worker's installed llmpipe."""

    def to_pull_step(self) -> dict:
        return {PULL_STEP: {}}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WorkerProject)


def enter_project() -> dict[str, str]:
    """The pull step of a pool deployment, run by the flow run's process before it imports the
    flow: the worker's project (LLMPIPE_PROJECT_DIR) as `directory`, which Prefect changes into."""
    from flows.manual import PROJECT_ENV

    value = os.environ.get(PROJECT_ENV)
    if not value:
        raise UserError(
            f"{PROJECT_ENV} is not set on the worker; start it in the project's clone as "
            f"`{PROJECT_ENV}=$PWD prefect worker start --pool NAME`"
        )
    project = Path(value).resolve()
    if not (project / PARAMS_FILE).is_file():
        raise UserError(f"{PROJECT_ENV}={value}: no {PARAMS_FILE} there; give the project's clone")
    return {"directory": str(project)}


def deploy_to_pool(project: Path, params: Params, pool: str) -> list[str]:
    """Create or update the two deployments on work pool `pool`; return their ids."""
    from prefect.deployments.runner import EntrypointType

    from flows.deploy import build_deployments

    check_pool(pool)
    deployments = build_deployments(
        project,
        params,
        work_pool_name=pool,
        job_variables=JOB_VARIABLES,
        # `flows.manual.manual_finetune`, not a file path: found wherever llmpipe is installed
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    for deployment in deployments:
        deployment.storage = WorkerProject()
    return [str(deployment.apply()) for deployment in deployments]


def default_remote(project: Path) -> str | None:
    """The name of the project's default DVC remote (core.remote), or None."""
    from flows.data import dvc

    config = dict(
        line.split("=", 1) for line in dvc(project, "config", "--list").splitlines() if "=" in line
    )
    return config.get("core.remote") or None


@task(retries=2, retry_delay_seconds=DVC_RETRY_DELAYS, cache_policy=NO_CACHE)
def dvc_pull(project: str) -> None:
    """`dvc pull --allow-missing`: what the remote holds of the data and the stage outputs (the
    outputs of a stage that never ran anywhere are missing, and DVC runs that stage)."""
    from flows.data import dvc

    get_run_logger().info(dvc(Path(project), "pull", "--allow-missing").strip() or "up to date")


@task(retries=2, retry_delay_seconds=DVC_RETRY_DELAYS, cache_policy=NO_CACHE)
def dvc_push(project: str) -> None:
    """`dvc push`: the data and the stage outputs of this run, for the next machine."""
    from flows.data import dvc

    get_run_logger().info(dvc(Path(project), "push").strip() or "nothing to push")


def synced(project: Path, run: Callable[[], object]) -> object:
    """`run()` between a `dvc pull` and (when it returned a summary) a `dvc push`, on a pool
    deployment's run (LLMPIPE_DVC_SYNC=1) of a project with a default DVC remote; else `run()`."""
    if os.environ.get(SYNC_ENV) != "1":
        return run()
    remote = default_remote(project)
    if remote is None:
        get_run_logger().info("no default DVC remote: nothing pulled or pushed")
        return run()
    dvc_pull(str(project))
    result = run()
    if isinstance(result, dict) and "skipped" not in result:  # a State is a failed run
        dvc_push(str(project))
    return result
