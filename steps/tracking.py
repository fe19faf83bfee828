"""Where MLflow lives, and logging from inside a stage into the flow's run.

A stage logs into the flow's MLflow run only when the flow handed it the run's id and tracking URI
(MLFLOW_RUN_ID, MLFLOW_TRACKING_URI), so `dvc repro` on its own never touches the tracking server.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from steps.outcome import leave_for_the_flow

EXPERIMENT = "llmpipe"
TRACKING_DB = "mlflow.db"  # at the project root; MLflow refuses the ./mlruns file store


def tracking_uri(project: Path) -> str:
    """MLFLOW_TRACKING_URI if set, else the project's sqlite file by absolute path."""
    return (
        os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{Path(project).resolve() / TRACKING_DB}"
    )


def registry_exists(uri: str) -> bool:
    """False for a sqlite tracking URI whose file does not exist yet (asking MLflow would create
    it); True otherwise (a server, or an existing file)."""
    prefix = "sqlite:///"
    return not uri.startswith(prefix) or Path(uri[len(prefix) :]).is_file()


class RegistryUnavailable(Exception):
    """The tracking store and registry cannot be read (a locked or corrupt database, a server that
    does not answer): a fault to report in one line, never to be taken for "no champion"."""


def registry_name(uri: str) -> str:
    """The registry as a user knows it: the sqlite file's path, else the tracking URI."""
    return uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else uri


def check_registry(uri: str) -> None:
    """Raise RegistryUnavailable unless the store at `uri` answers (a sqlite file that does not
    exist yet is fine: MLflow creates it on first write). A tracking server is first asked once
    for its /health: one that does not answer at all is said at once (MLflow's client retries a
    refused connection with back-off for ~4 minutes before it gives up)."""
    if not registry_exists(uri):
        return
    if uri.startswith(("http://", "https://")):
        server_answers(uri)
    try:
        from mlflow import MlflowClient

        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:
        text = str(err).strip()
        reason = text.splitlines()[0] if text else type(err).__name__
        raise RegistryUnavailable(
            f"{registry_name(uri)}: cannot read the model registry: {reason}"
        ) from None


def server_answers(uri: str) -> None:
    """RegistryUnavailable unless the tracking server at `uri` gives an HTTP answer (any status:
    one behind a login answers 401, and MLflow's client then says more)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=15):
            pass
    except urllib.error.HTTPError:
        pass
    except (urllib.error.URLError, OSError) as err:
        raise RegistryUnavailable(
            f"{uri}: the MLflow tracking server does not answer ({getattr(err, 'reason', err)}); "
            "start it, or fix MLFLOW_TRACKING_URI"
        ) from None


def flow_run() -> tuple[str, str] | None:
    """(tracking URI, run id) of the flow's MLflow run when this process runs inside a flow."""
    run_id, uri = os.environ.get("MLFLOW_RUN_ID"), os.environ.get("MLFLOW_TRACKING_URI")
    return (uri, run_id) if run_id and uri else None


def log_to_flow_run(
    metrics: dict[str, float] | None = None,
    params: dict[str, str] | None = None,
    artifacts: list[Path] | None = None,
    table: tuple[dict[str, list], str] | None = None,
) -> None:
    """Metrics, params, files and one table (column -> values, artifact name) into the flow run.

    Run by the flow's runner (LLMPIPE_OUTCOME set), the step leaves them in its outcome record and
    the flow's process logs them (flows/runner.py), where MLflow is loaded already: importing it
    costs a step ~1.5 s on 2 CPU cores. Run by hand inside a flow's run, it logs them itself."""
    run = flow_run()
    if run is None:
        return
    request = {
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        "params": {k: str(v) for k, v in (params or {}).items()},
        "artifacts": [str(Path(p).resolve()) for p in artifacts or []],
        "tables": [] if table is None else [{"data": table[0], "artifact_file": table[1]}],
    }
    if not leave_for_the_flow(request):
        log_request(*run, request)


def log_request(uri: str, run_id: str, request: dict) -> None:
    """What log_to_flow_run() was asked, into run `run_id`: metrics and params in one batch."""
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client, now = MlflowClient(uri), int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in request.get("metrics", {}).items()]
    params = [Param(k, v) for k, v in request.get("params", {}).items()]
    if metrics or params:
        client.log_batch(run_id, metrics=metrics, params=params)
    for path in request.get("artifacts", []):
        client.log_artifact(run_id, path)
    for table in request.get("tables", []):
        client.log_table(run_id, data=table["data"], artifact_file=table["artifact_file"])


@contextmanager
def inside_flow_run() -> Iterator[str | None]:
    """Make the flow's MLflow run this process's active run, for libraries that log through
    MLflow's fluent API (the Trainer's MLflow callback, mlflow.transformers.log_model); yields its
    id (None outside a flow: nothing is logged).

    The run is left RUNNING on exit: the flow, not a stage, ends it. (Resumed the usual way, through
    MLFLOW_RUN_ID, the Trainer's callback ends the flow's run when training ends, and then starts a
    stray new run for the metrics that come after.)
    """
    run = flow_run()
    if run is None:
        yield None
        return
    import mlflow

    uri, run_id = run
    saved = os.environ.pop("MLFLOW_RUN_ID")
    mlflow.set_tracking_uri(uri)
    mlflow.start_run(run_id=run_id)
    try:
        yield run_id
    finally:
        mlflow.end_run(status="RUNNING")
        os.environ["MLFLOW_RUN_ID"] = saved
