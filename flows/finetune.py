"""The `finetune` flow: the stages of steps/stages.py in order, then register and smoke_serve.

    llmpipe run [-S section.key=value ...]      # or: python -m flows.finetune

corpus -> model_source -> base_model -> prepare -> train -> evaluate -> register -> smoke_serve.
Each is a Prefect task that runs one stage of the table in a subprocess (flows/runner.py): the DVC
stages through `dvc repro --single-item`, so DVC decides what is up to date (its cache is the
pipeline's cache); register and smoke_serve, which change MLflow rather than files, as their own
commands. Timeouts and retries come from the table. User errors fail at once; anything else is
retried with back-off.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.lock import workspace_lock
from flows.report import report_markdown
from flows.runner import UserInputError, run_stage
from flows.tracking import close_run, data_unchanged_since_champion, open_run, tag_stage_lineage
from steps.params import EMBEDDED_CORPUS, Params, apply_overrides
from steps.prepare import read_documents
from steps.registry import champion_version
from steps.stages import STAGE, Stage, dvc_stages
from steps.tracking import EXPERIMENT, tracking_uri

RETRY_DELAYS = [10, 60]  # seconds before the first and second retry


def not_user_error(task, task_run, state) -> bool:
    """Retry condition: a rejected input fails at once; a crash or kill is retried."""
    try:
        state.result()
    except UserInputError:
        return False
    except Exception:
        return True
    return True


# Shared by every task: back-off between tries, no retry of user errors, and no Prefect result
# caching (DVC decides what is up to date).
RETRY_POLICY = {
    "retry_delay_seconds": RETRY_DELAYS,
    "retry_condition_fn": not_user_error,
    "cache_policy": NO_CACHE,
}


@task(**RETRY_POLICY)
def stage_task(
    name: str, project: str, env: dict[str, str], extra_args: tuple[str, ...] = ()
) -> dict:
    """Run one stage of the table; DVC skips a DVC stage when nothing it depends on changed."""
    logger = get_run_logger()
    outcome = run_stage(STAGE[name], Path(project), env, logger.info, extra_args)
    how = "unchanged (DVC cache)" if outcome.skipped else "ran"
    logger.info("%s %s in %.1fs", name, how, outcome.seconds)
    return outcome.to_dict()


def run_task(
    stage: Stage, project: Path, env: dict[str, str], extra_args: tuple[str, ...] = ()
) -> dict:
    """`stage_task` with the stage's own name, timeout and retries from the table."""
    configured = stage_task.with_options(
        name=stage.name, timeout_seconds=stage.timeout_s, retries=stage.retries
    )
    return configured(stage.name, str(project), env, extra_args)


def check_inputs(project: Path, overrides: list[str], write: bool = True) -> Params:
    """Check params (with the -S edits) and the data file, then save the edits to params.yaml.

    Runs before anything is written, so a bad key or a bad data file leaves no trace.
    """
    params = apply_overrides(project / "params.yaml", overrides, write=False)
    data = Path(params.prepare.data)
    if params.prepare.data != EMBEDDED_CORPUS:  # the embedded corpus is made by the corpus stage
        read_documents(data if data.is_absolute() else project / data, params.prepare.text_field)
    reference = Path(params.evaluate.reference_data)
    read_documents(reference if reference.is_absolute() else project / reference)
    return apply_overrides(project / "params.yaml", overrides) if write else params


@flow(name="finetune", log_prints=True)
def finetune(
    project_dir: str = ".",
    overrides: list[str] | None = None,
    base_model: str | None = None,
    data: str | None = None,
    learning_rate: float | None = None,
    max_steps: int | None = None,
    serve_check: bool = True,
    only_if_data_changed: bool = False,
    continue_from_champion: bool = False,
    promote: bool = True,
    run_tags: dict[str, str] | None = None,
    workspace_timeout_s: int = 6 * 3600,
) -> dict:
    """Export the corpus, fine-tune, evaluate, register and smoke-serve; params.yaml holds every
    other knob.

    Args:
        project_dir: directory holding params.yaml and dvc.yaml.
        overrides: extra `section.key=value` edits of params.yaml (as `llmpipe run -S`).
        base_model: replaces base_model.source (a HF id, a local dir, or 'smollm2-gguf').
        data: replaces prepare.data (a .jsonl or .txt file).
        learning_rate: replaces train.learning_rate.
        max_steps: replaces train.max_steps.
        serve_check: start the MLflow scoring server on the champion and request one completion.
        only_if_data_changed: finish at once, running nothing, when the data's DVC hash equals the
            one the champion was trained on (what scheduled retraining uses).
        continue_from_champion: fine-tune the current champion (recorded in params.yaml as
            base_model.source=models:/NAME/VERSION) instead of base_model.source.
        promote: apply the promotion gate (a sweep registers its candidates with promote=False).
        run_tags: extra tags on the MLflow run (a sweep tags its runs with its id).
        workspace_timeout_s: how long to wait for another run in the same project to finish.
    """
    project = Path(project_dir).resolve()
    named = {
        "base_model.source": base_model,
        "prepare.data": data,
        "train.learning_rate": learning_rate,
        "train.max_steps": max_steps,
    }
    edits = [f"{k}={v}" for k, v in named.items() if v is not None] + list(overrides or [])
    uri = tracking_uri(project)
    with workspace_lock(project, workspace_timeout_s, get_run_logger().info):
        if continue_from_champion:
            name = check_inputs(project, edits, write=False).registry.model_name
            champion = champion_version(uri, name)
            if champion is not None:  # an explicit version, so DVC sees a changed param
                edits.append(f"base_model.source=models:/{name}/{champion.version}")
        params = check_inputs(project, edits)
        if only_if_data_changed:
            unchanged = data_unchanged_since_champion(uri, project, params)
            if unchanged:
                get_run_logger().info(unchanged)
                return {"skipped": unchanged}
        return run_pipeline(project, params, uri, serve_check, promote, run_tags or {})


def run_pipeline(
    project: Path,
    params: Params,
    uri: str,
    serve_check: bool,
    promote: bool = True,
    run_tags: dict[str, str] | None = None,
) -> dict:
    """The DVC stages, register, report and smoke-serve, inside one MLflow run."""
    run_id, experiment_id = open_run(
        uri, project, params, flow_run.get_name() or "finetune", run_tags or {}
    )
    env = {
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_RUN_ID": run_id,
        "MLFLOW_EXPERIMENT_NAME": EXPERIMENT,
        "LLMPIPE_FLOW_RUN_ID": str(flow_run.get_id() or ""),
    }
    summary: dict = {
        "mlflow_run_id": run_id,
        "experiment_id": experiment_id,
        "tracking_uri": uri,
        "serve_port": params.serve.port,
        "stages": [],
        "lineage": {},
    }
    ok = False
    try:
        for stage in dvc_stages():
            summary["stages"].append(run_task(stage, project, env))
            if stage.lineage:
                summary["lineage"] |= tag_stage_lineage(uri, run_id, project, params, stage)
        metrics_file = project / STAGE["evaluate"].path("metrics")
        summary["metrics"] = json.loads(metrics_file.read_text())
        flags = () if promote else ("--no-promote",)
        summary["register"] = task_facts(run_task(STAGE["register"], project, env, flags))
        create_markdown_artifact(
            report_markdown(summary, project),
            key="finetune-report",
            description="data, base vs tuned metrics, promotion decision, links",
        )
        if serve_check:
            summary["serve"] = task_facts(run_task(STAGE["smoke_serve"], project, env))
        ok = True
    finally:
        close_run(uri, run_id, ok)
    return summary


def task_facts(outcome: dict) -> dict:
    """A task's facts (its report), with the seconds it took."""
    return {**outcome["facts"], "seconds": outcome["seconds"]}


if __name__ == "__main__":
    print(json.dumps(finetune(), indent=2))
