"""MLflow logging from inside a stage: into the flow's run when MLFLOW_RUN_ID is set, else nowhere.

`dvc repro` on its own therefore never touches the tracking server; `llmpipe run` opens one MLflow run
per flow run and hands its id to every stage through the environment.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
EXPERIMENT = "llmpipe"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


def flow_run_id() -> str | None:
    return os.environ.get("MLFLOW_RUN_ID") or None


def log_to_flow_run(
    metrics: dict[str, float] | None = None,
    params: dict[str, str] | None = None,
    artifacts: list[Path] | None = None,
) -> None:
    run_id = flow_run_id()
    if run_id is None:
        return
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri())
    for key, value in (metrics or {}).items():
        client.log_metric(run_id, key, float(value))
    for key, value in (params or {}).items():
        client.log_param(run_id, key, value)
    for path in artifacts or []:
        client.log_artifact(run_id, str(path))


def log_table_to_flow_run(data: dict[str, list], artifact_file: str) -> None:
    """A table (column -> values) in the flow's run, shown side by side in MLflow's UI."""
    run_id = flow_run_id()
    if run_id is None:
        return
    from mlflow import MlflowClient

    MlflowClient(tracking_uri()).log_table(run_id, data=data, artifact_file=artifact_file)
