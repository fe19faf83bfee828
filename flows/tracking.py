"""One MLflow run per flow run: opened before the first stage, tagged as stages finish, closed with
the flow's outcome; and the check that scheduled retraining uses to skip unchanged data."""

from __future__ import annotations

import time
from pathlib import Path

from steps.lineage import file_md5, git_sha, stage_lineage
from steps.params import Params
from steps.registry import champion_version
from steps.stages import Stage
from steps.tracking import EXPERIMENT


def flat_params(params: Params) -> dict[str, str]:
    return {
        f"{section}.{key}": str(value)
        for section, values in params.model_dump(by_alias=True).items()
        for key, value in values.items()
    }


def artifact_location(uri: str, project: Path) -> str | None:
    """Where a new experiment keeps its artifacts: the project's mlartifacts/ for a local store
    (sqlite, a file path); for a tracking server, None: the server decides (with proxied
    artifacts, `mlflow-artifacts:/...`), so another machine reading the registry finds them."""
    local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
    return (project / "mlartifacts").as_uri() if local else None


def open_run(
    uri: str, project: Path, params: Params, flow_run_name: str, extra_tags: dict[str, str]
) -> tuple[str, str]:
    """Create the flow run's MLflow run; return (run id, experiment id)."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        experiment_id = client.create_experiment(
            EXPERIMENT, artifact_location=artifact_location(uri, project)
        )
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(
        experiment_id,
        run_name=flow_run_name,
        tags={
            "git_sha": git_sha(project),
            "base_model": params.base_model.source,
            "data_path": params.prepare.data,
            **extra_tags,
        },
    )
    # in batches (MLflow takes 100 params a request): one request per param was ~49 of them, each
    # ~0.2 s against a tracking server behind MLflow's basic-auth (which checks the password's
    # hash on every request): ~10 s of each run on the team's servers
    logged = [Param(key, value) for key, value in flat_params(params).items()]
    for start in range(0, len(logged), 100):
        client.log_batch(run.info.run_id, params=logged[start : start + 100])
    return run.info.run_id, experiment_id


def tag_stage_lineage(
    uri: str, run_id: str, project: Path, params: Params, stage: Stage
) -> dict[str, str]:
    """Once `stage` has run, dvc.lock holds the hashes it declares as lineage (data, models)."""
    from mlflow import MlflowClient
    from mlflow.entities import RunTag

    tags = stage_lineage(project, params.model_dump(by_alias=True), [stage])
    if tags:  # one request, not one a tag (see open_run)
        MlflowClient(uri).log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    return tags


def log_reused_outputs(uri: str, run_id: str, project: Path, stage: Stage) -> list[str]:
    """When DVC reused a stage's outputs, put their metrics on this run anyway (numbers of its
    metrics files, their curves per step, the files as artifacts), so a cached re-run's MLflow
    run shows the metrics of the model it re-confirmed. Returns the files logged."""
    import csv
    import json

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client, logged, now = MlflowClient(uri), [], int(time.time() * 1000)
    for out in stage.outputs.values():
        path = project / out.path
        if out.kind == "outs" or not path.is_file():
            continue
        metrics: list[Metric] = []
        if out.kind == "metrics":
            values = json.loads(path.read_text())
            metrics = [Metric(k, float(v), now, 0) for k, v in values.items() if numeric(v)]
        elif out.plot.get("x") == "step":
            y = out.plot["y"]
            with path.open() as f:
                metrics = [
                    Metric(y, float(row[y]), now, int(row["step"])) for row in csv.DictReader(f)
                ]
        for start in range(0, len(metrics), 500):
            client.log_batch(run_id, metrics=metrics[start : start + 500])
        client.log_artifact(run_id, str(path))
        logged.append(out.path)
    if logged:
        client.set_tag(run_id, f"reused.{stage.name}", "outputs reused from the DVC cache")
    return logged


def numeric(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def close_run(uri: str, run_id: str, ok: bool) -> None:
    from mlflow import MlflowClient

    MlflowClient(uri).set_terminated(run_id, "FINISHED" if ok else "FAILED")


def data_unchanged_since_champion(uri: str, project: Path, params: Params) -> str | None:
    """'no new data ...' when the data's md5 equals the champion's data_hash tag, else None."""
    data = Path(params.prepare.data)
    data = data if data.is_absolute() else project / data
    if not data.is_file():
        return None  # the embedded corpus before its first export: nothing to compare
    champion = champion_version(uri, params.registry.model_name)
    if champion is None:
        return None
    current = file_md5(data)
    if champion.tags.get("data_hash") != current:
        return None
    return (
        f"no new data: {params.prepare.data} (md5 {current}) is what champion version "
        f"{champion.version} was trained on; nothing to retrain"
    )
