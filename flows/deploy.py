"""Deployments of the finetune flow, and the local stack that serves them.

    llmpipe deploy     # create/update the deployments on the Prefect server at PREFECT_API_URL
    llmpipe up         # Prefect server + UI (:4200), the deployments' runner, MLflow UI (:5000)

Two deployments of `finetune`, both limited to one run at a time:
- `manual`: what a person starts from the Prefect UI's Run button, with the flow's typed parameter
  form (base model, data, learning rate, steps, ...);
- `retrain-on-new-data`: on the cron schedule from params.yaml (`schedule.cron`), it runs with
  only_if_data_changed=True, so it finishes at once with "no new data" unless the data changed.
"""

from __future__ import annotations

from pathlib import Path

from steps.errors import UserError
from steps.params import Params

MANUAL, SCHEDULED = "manual", "retrain-on-new-data"


def check_schedule(params: Params) -> None:
    """schedule.cron must be a cron string Prefect accepts (checked with Prefect's own schema)."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=params.schedule.cron)
    except ValidationError as err:
        why = err.errors()[0]["msg"].removeprefix("Value error, ")
        raise UserError(
            f"params.yaml: 'schedule.cron': {why}; give five fields, minute hour day month "
            "weekday (UTC), e.g. '0 3 * * *'"
        ) from None


def build_deployments(project: Path, params: Params) -> list:
    from flows.finetune import finetune

    check_schedule(params)
    manual = finetune.to_deployment(
        name=MANUAL,
        parameters={"project_dir": str(project)},
        concurrency_limit=1,
        description="Fine-tune on params.yaml; the form's fields override it for this run.",
        tags=["llmpipe"],
    )
    scheduled = finetune.to_deployment(
        name=SCHEDULED,
        cron=params.schedule.cron,
        paused=params.schedule.paused,
        parameters={
            "project_dir": str(project),
            "only_if_data_changed": True,
            "continue_from_champion": params.schedule.continue_from_champion,
        },
        concurrency_limit=1,
        description="Retrain when the data's DVC hash differs from the champion's.",
        tags=["llmpipe"],
    )
    return [manual, scheduled]


def apply_deployments(project: Path, params: Params) -> list[str]:
    """Register the deployments on the configured server; return their ids."""
    return [str(d.apply()) for d in build_deployments(project, params)]


def serve_deployments(project: Path, params: Params) -> None:
    """Register the deployments and execute their runs in this process until interrupted."""
    from prefect import serve

    serve(*build_deployments(project, params), print_starting_message=True)


if __name__ == "__main__":  # `python -m flows.deploy`: the runner process of `llmpipe up`
    from steps.params import load_params

    serve_deployments(Path.cwd(), load_params())
