"""Deployments of the finetune flow, and the local stack that serves them.

    llmpipe deploy     # create/update the deployments on the Prefect server at PREFECT_API_URL
    llmpipe deploy --pool NAME   # the same on a work pool, for a worker (flows/pool.py)
    llmpipe up         # Prefect server + UI (:4200), the deployments' runner, MLflow UI (:5000)

Two deployments of the flows in flows/manual.py (both named `finetune`, and both run finetune's
body on the project the runner serves), each limited to one run at a time:
- `manual`: what a person starts from the Prefect UI's Run button, with a typed form (base model,
  data, learning rate, steps, and edits of allow-listed params keys);
- `retrain-on-new-data`: on the cron schedule from params.yaml (`schedule.cron`), it runs with
  only_if_data_changed=True, so it finishes at once with "no new data" unless the data changed;
  it takes no parameters (schedule.continue_from_champion is read from params.yaml when it runs).
Neither takes a project directory or free params edits: the runner fixes the project.
"""

from __future__ import annotations

import os
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


def build_deployments(project: Path, params: Params, **placement: object) -> list:
    """The deployments; their runs use the project the runner serves (see serve_deployments), so
    `project` only matters there. `placement`: more arguments of `to_deployment` (a work pool's,
    from flows/pool.py)."""
    from flows.manual import manual_finetune, retrain_on_new_data

    check_schedule(params)
    manual = manual_finetune.to_deployment(
        name=MANUAL,
        concurrency_limit=1,
        description="Fine-tune on params.yaml; the form's fields (base_model.source, prepare.*, "
        "train.*, evaluate.*) override it for this run.",
        tags=["llmpipe"],
        **placement,
    )
    scheduled = retrain_on_new_data.to_deployment(
        name=SCHEDULED,
        cron=params.schedule.cron,
        paused=params.schedule.paused,
        concurrency_limit=1,
        description="Retrain when the data's DVC hash differs from the champion's.",
        tags=["llmpipe"],
        **placement,
    )
    return [manual, scheduled]


def apply_deployments(project: Path, params: Params) -> list[str]:
    """Register the deployments on the configured server; return their ids."""
    return [str(d.apply()) for d in build_deployments(project, params)]


def serve_deployments(project: Path, params: Params) -> None:
    """Register the deployments and execute their runs (in child processes, which inherit
    PROJECT_ENV) until interrupted."""
    from prefect import serve

    from flows.manual import PROJECT_ENV

    os.environ[PROJECT_ENV] = str(project.resolve())
    serve(*build_deployments(project, params), print_starting_message=True)


if __name__ == "__main__":  # `python -m flows.deploy`: the runner process of `llmpipe up`
    from steps.params import load_params

    serve_deployments(Path.cwd(), load_params())
