"""What the Prefect UI may start: the `manual` form, checked against an allow-list, and the
scheduled check. `llmpipe up` and `llmpipe deploy` deploy these two flows, never `finetune` itself.

`finetune` takes any project directory and any `section.key=value` edit of params.yaml, among them
base_model.trust_remote_code=true: one click in the UI must not be able to run code shipped with a
model, nor read files outside the project. So the deployments run these flows, which are named
`finetune` too (the UI groups the deployments under it) and run finetune's body in their own flow
run, on the project the runner fixed (LLMPIPE_PROJECT_DIR, which `python -m flows.deploy` sets to
its working directory), never on one a parameter names.

The manual form may set FORM_KEYS (every key of prepare, train and evaluate, and base_model.source);
the paths among them (PATH_KEYS) must lie inside the project, and a URL is refused. A refused form
ends as a Failed flow run whose message is one line naming the key, before anything is read or
changed. Everything else (base_model.trust_remote_code, register.*, serve.*, schedule.*) only the
project's params.yaml sets.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from prefect import flow

from flows.finetune import finetune, user_error_state
from flows.pool import synced
from flows.runner import UserInputError
from steps.errors import UserError
from steps.params import EMBEDDED_MODEL, PARAMS_FILE, load_params, parse_override

PROJECT_ENV = "LLMPIPE_PROJECT_DIR"  # set by the runner (`python -m flows.deploy`)
FORM_SECTIONS = ("prepare", "train", "evaluate")  # every key of these sections
FORM_KEYS = ("base_model.source", *(f"{section}.*" for section in FORM_SECTIONS))
PATH_KEYS = ("base_model.source", "prepare.data", "evaluate.reference_data")
REFUSED = "refused"  # every refusal's message starts with it


class NoTracebackForUserErrors(logging.Filter):
    """A deployment's run executes in Prefect's engine, which logs "Engine execution exited with
    unexpected exception" and a traceback whenever the run ends Failed, also when the flow returned
    a user error's Failed state on purpose (whose message already says it in one line). Drop that
    record for user errors only; any other failure keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, UserInputError | UserError)


# the engine imports this module (the deployments' entrypoint) before it runs the flow
logging.getLogger("prefect.flow_runs").addFilter(NoTracebackForUserErrors())


def runner_project() -> Path:
    """The project the runner serves (never a flow parameter)."""
    value = os.environ.get(PROJECT_ENV)
    if not value:
        raise UserError(
            f"{REFUSED}: {PROJECT_ENV} is not set; run this deployment with its runner: "
            "`python -m flows.deploy` in the project directory (llmpipe up starts one)"
        )
    return Path(value).resolve()


def inside(project: Path, path: str) -> bool:
    """Whether `path` (relative to the project, or absolute) names something inside the project,
    `..` resolved by its spelling (a symlink in the project is the owner's choice)."""
    return Path(os.path.normpath(project / path)).is_relative_to(project)


def check_path(project: Path, key: str, value: object) -> None:
    if not isinstance(value, str):
        return  # not a path at all: params validation names it
    if key == "base_model.source":
        if value == EMBEDDED_MODEL or value.startswith("models:/"):
            return
        what = f"a Hugging Face id, '{EMBEDDED_MODEL}' or a model directory inside the project"
    else:
        what = "a file inside the project, by its path relative to the project"
    if "://" in value:
        raise UserError(f"{REFUSED}: '{key}' must not be a URL (got {value!r}); give {what}")
    if not inside(project, value):
        raise UserError(f"{REFUSED}: '{key}' is outside the project (got {value!r}); give {what}")


def form_edits(project: Path, named: dict[str, object], overrides: list[str]) -> list[str]:
    """The form as `section.key=value` edits (named fields first, like finetune), each checked
    against the allow-list; a UserError naming the first key refused."""
    edits = [f"{key}={value}" for key, value in named.items() if value is not None]
    for text in [*edits, *overrides]:
        (section, name), value = parse_override(text)
        key = f"{section}.{name}"
        if section not in FORM_SECTIONS and key not in FORM_KEYS:
            raise UserError(
                f"{REFUSED}: the form cannot set '{key}' (it may set {', '.join(FORM_KEYS)}); "
                "change it in the project's params.yaml"
            )
        if key in PATH_KEYS:
            check_path(project, key, value)
    return [*edits, *overrides]


@flow(name="finetune", log_prints=True)
def manual_finetune(
    base_model: str | None = None,
    data: str | None = None,
    learning_rate: float | None = None,
    max_steps: int | None = None,
    overrides: list[str] | None = None,
    serve_check: bool = True,
    only_if_data_changed: bool = False,
    continue_from_champion: bool = False,
) -> dict:
    """Fine-tune on the project's params.yaml; the fields set here apply to this run only.

    Args:
        base_model: replaces base_model.source: a Hugging Face id, 'smollm2-gguf', or a model
            directory inside the project.
        data: replaces prepare.data: a .jsonl or .txt file inside the project (relative path).
        learning_rate: replaces train.learning_rate.
        max_steps: replaces train.max_steps.
        overrides: more `section.key=value` edits, of prepare.*, train.* and evaluate.* keys only
            (paths inside the project), e.g. train.batch_size=4.
        serve_check: serve a candidate that passed the gate before promoting it; without the check
            nothing is promoted.
        only_if_data_changed: finish at once when the data is what the champion was trained on.
        continue_from_champion: fine-tune the current champion instead of base_model.source.
    """
    named = {
        "base_model.source": base_model,
        "prepare.data": data,
        "train.learning_rate": learning_rate,
        "train.max_steps": max_steps,
    }
    try:
        project = runner_project()
        form_edits(project, named, list(overrides or []))
    except UserError as err:
        return user_error_state(err)  # one line in the log, no traceback
    return synced(  # on a work pool: dvc pull before, dvc push after (flows/pool.py)
        project,
        lambda: finetune.fn(
            project_dir=str(project),
            overrides=list(overrides or []),
            base_model=base_model,
            data=data,
            learning_rate=learning_rate,
            max_steps=max_steps,
            serve_check=serve_check,
            only_if_data_changed=only_if_data_changed,
            continue_from_champion=continue_from_champion,
        ),
    )


@flow(name="finetune", log_prints=True)
def retrain_on_new_data() -> dict:
    """Retrain when the data's DVC hash differs from the champion's, from the base model or (with
    schedule.continue_from_champion in params.yaml) from the champion; otherwise finish at once
    with "no new data". It takes no parameters: params.yaml decides everything."""
    try:
        project = runner_project()
        from_champion = load_params(project / PARAMS_FILE).schedule.continue_from_champion
    except UserError as err:
        return user_error_state(err)
    return synced(
        project,
        lambda: finetune.fn(
            project_dir=str(project),
            only_if_data_changed=True,
            continue_from_champion=from_champion,
        ),
    )
