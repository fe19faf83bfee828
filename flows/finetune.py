"""The `finetune` flow: the stages of steps/stages.py in order, then register, prove, promote.

    llmpipe run [-S section.key=value ...]      # or: python -m flows.finetune

corpus -> model_source -> base_model -> prepare -> train -> evaluate -> register -> smoke_serve
-> promote. The champion moves last, and only after the gate passed and the candidate served.
Each is a Prefect task that runs one stage of the table in a subprocess (flows/runner.py): the DVC
stages through `dvc repro --single-item`, so DVC decides what is up to date (its cache is the
pipeline's cache); register and smoke_serve, which change MLflow rather than files, as their own
commands. promote, a compare-and-set of one alias, runs in this process (the one task that loads
no model and starts nothing). Timeouts and retries come from the table. User errors fail at once;
anything else is retried with back-off.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run
from prefect.states import Failed, State

from flows.lock import workspace_lock
from flows.report import report_markdown
from flows.runner import UserInputError, run_stage
from flows.tracking import (
    close_run,
    data_unchanged_since_champion,
    log_reused_outputs,
    open_run,
    tag_stage_lineage,
)
from steps.chat import check_chat_template
from steps.errors import UserError
from steps.outputs import write_bytes
from steps.params import EMBEDDED_CHAT, EMBEDDED_DATA, EMBEDDED_MODEL, Params, apply_overrides
from steps.prepare import assign_splits, check_block_size
from steps.promote import promote
from steps.records import read_records, read_texts
from steps.registry import champion_version
from steps.stages import STAGE, Stage, dvc_stages
from steps.tracking import EXPERIMENT, RegistryUnavailable, check_registry, tracking_uri

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
    try:
        outcome = run_stage(STAGE[name], Path(project), env, logger.info, extra_args)
    except UserInputError as err:
        return user_error_state(err)  # one line in the log, no traceback, no retry
    how = "unchanged (DVC cache)" if outcome.skipped else "ran"
    logger.info("%s %s in %.1fs", name, how, outcome.seconds)
    return {**outcome.to_dict(), "attempt": task_run.run_count}


def run_task(
    stage: Stage, project: Path, env: dict[str, str], extra_args: tuple[str, ...] = ()
) -> dict:
    """`stage_task` with the stage's own name, timeout and retries from the table."""
    configured = stage_task.with_options(
        name=stage.name, timeout_seconds=stage.timeout_s, retries=stage.retries
    )
    started = time.perf_counter()
    outcome = configured(stage.name, str(project), env, extra_args)
    if isinstance(outcome, State):  # the task returned a user error as its Failed state
        outcome.result()  # raises the UserInputError it carries
        raise UserInputError(outcome.message)
    # attempts that failed before this one, and the back-off between them: lost work, not overhead
    lost = time.perf_counter() - started - outcome["seconds"] if outcome["attempt"] > 1 else 0.0
    outcome["retried_seconds"] = max(0.0, lost)
    return outcome


def user_error_state(err: Exception) -> State:
    """A user's mistake as a Failed state carrying it: Prefect logs its one line, not a traceback
    (and the retry condition sees a UserInputError, so it is not retried)."""
    error = err if isinstance(err, UserInputError) else UserInputError(str(err))
    return Failed(message=str(error), data=error)


def project_path(project: Path, path: str) -> Path:
    return Path(path) if Path(path).is_absolute() else project / path


def check_inputs(project: Path, overrides: list[str]) -> Params:
    """Check params with the -S edits (every key, and the checks across keys), the data and
    reference files, that the data splits into non-empty train and test sets; against a local
    base model: the block size, LoRA's target modules and, for chat data, its chat template; qlora
    without CUDA. Writes nothing: a mistake leaves no trace."""
    params = apply_overrides(project / "params.yaml", overrides, write=False)
    kind = "chat" if params.prepare.data == EMBEDDED_CHAT else "text"
    if params.prepare.data not in EMBEDDED_DATA:  # the embedded data sets are made by stages
        data = project_path(project, params.prepare.data)
        records = read_records(data, params.prepare)
        assign_splits(records, params.prepare, Path(params.prepare.data))
        kind = records.kind
    read_texts(project_path(project, params.evaluate.reference_data))
    check_model_source(project, params.base_model.source)
    source = project_path(project, params.base_model.source)
    local = (source / "config.json").is_file()
    if local:
        check_block_size(params.prepare.block_size, source / "config.json")
    if params.train.method != "full":
        from steps import lora  # imports torch: only when adapters are asked for

        lora.check_method(params.train)
        if local:
            lora.check_targets(source, params.train)
    if kind == "chat" and local:
        from transformers import AutoTokenizer

        check_chat_template(AutoTokenizer.from_pretrained(source), params.prepare.data)
    return params


def check_model_source(project: Path, source: str) -> None:
    """A base_model.source spelled as a path (absolute, ./, ../, ~, or deeper than org/name) must
    be a directory with a config.json; a Hugging Face id (name or org/name) is left to the stage."""
    if source == EMBEDDED_MODEL or source.startswith("models:/"):
        return
    local = project_path(project, source)
    looks_like_path = source.startswith(("/", ".", "~")) or source.count("/") > 1
    if local.exists() and not (local / "config.json").is_file():
        raise UserError(
            f"base_model.source: {source}: no config.json there; give a model directory, "
            "a Hugging Face id (org/name) or 'smollm2-gguf'"
        )
    if not local.exists() and looks_like_path:
        raise UserError(
            f"base_model.source: {source}: no such directory; give a model directory, "
            "a Hugging Face id (org/name) or 'smollm2-gguf'"
        )


@contextmanager
def edited_params(project: Path, edits: list[str], keep: bool) -> Iterator[None]:
    """params.yaml with `edits` for the length of a run (DVC must see them as params); put back as
    it was when the run fails, and also when it succeeds unless `keep`."""
    path = project / "params.yaml"
    before = path.read_bytes()
    apply_overrides(path, edits)
    kept = False
    try:
        yield
        kept = keep
    finally:
        if not kept and edits:
            write_bytes(path, before)


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
    keep_edits: bool = False,
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
        serve_check: serve a candidate that passed the gate with the MLflow scoring server and
            time `serve.smoke_requests` completions before promoting it; without the check
            nothing is promoted.
        only_if_data_changed: finish at once, running nothing, when the data's DVC hash equals the
            one the champion was trained on (what scheduled retraining uses).
        continue_from_champion: fine-tune the current champion (recorded in params.yaml as
            base_model.source=models:/NAME/VERSION) instead of base_model.source.
        promote: apply the promotion gate (a sweep registers its candidates with promote=False).
        run_tags: extra tags on the MLflow run (a sweep tags its runs with its id).
        workspace_timeout_s: how long to wait for another run in the same project to finish.
        keep_edits: keep the edits in params.yaml after a successful run (what `llmpipe run -S`
            does); otherwise they apply to this run only. A failed run always puts params.yaml
            back as it was.
    """
    try:
        return run_finetune(
            Path(project_dir).resolve(),
            list(overrides or []),
            {
                "base_model.source": base_model,
                "prepare.data": data,
                "train.learning_rate": learning_rate,
                "train.max_steps": max_steps,
            },
            serve_check,
            only_if_data_changed,
            continue_from_champion,
            promote,
            run_tags or {},
            workspace_timeout_s,
            keep_edits,
        )
    except (UserError, UserInputError) as err:
        return user_error_state(err)  # finetune() raises it to its caller; no traceback logged
    except RegistryUnavailable as err:  # a fault, not the user's input: one line all the same
        return Failed(message=str(err), data=err)


def run_finetune(
    project: Path,
    overrides: list[str],
    named: dict[str, object],
    serve_check: bool,
    only_if_data_changed: bool,
    continue_from_champion: bool,
    promote: bool,
    run_tags: dict[str, str],
    workspace_timeout_s: int,
    keep_edits: bool,
) -> dict:
    """The body of the finetune flow (see its docstring for the parameters)."""
    edits = [f"{k}={v}" for k, v in named.items() if v is not None] + overrides
    uri = tracking_uri(project)
    with workspace_lock(project, workspace_timeout_s, get_run_logger().info):
        params = check_inputs(project, edits)
        check_registry(uri)  # a locked or corrupt registry stops the run before any compute
        if only_if_data_changed:
            unchanged = data_unchanged_since_champion(uri, project, params)
            if unchanged:
                get_run_logger().info(unchanged)
                return {"skipped": unchanged}
        if continue_from_champion:
            champion = champion_version(uri, params.registry.model_name)
            if champion is not None:  # an explicit version, so DVC sees a changed param
                name = params.registry.model_name
                edits.append(f"base_model.source=models:/{name}/{champion.version}")
                params = check_inputs(project, edits)
        with edited_params(project, edits, keep=keep_edits):
            return run_pipeline(project, params, uri, serve_check, promote, run_tags)


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
            if summary["stages"][-1]["skipped"]:
                log_reused_outputs(uri, run_id, project, stage)
            if stage.lineage:
                summary["lineage"] |= tag_stage_lineage(uri, run_id, project, params, stage)
        metrics_file = project / STAGE["evaluate"].path("metrics")
        summary["metrics"] = json.loads(metrics_file.read_text())
        summary["register"] = task_facts(
            run_task(STAGE["register"], project, env, () if promote else ("--no-promote",))
        )
        summary["serve"], summary["promotion"] = prove_and_promote(
            project, env, summary["register"], serve_check
        )
        create_markdown_artifact(
            report_markdown(summary, project),
            key="finetune-report",
            description="data, base vs tuned metrics, promotion decision, links",
        )
        ok = True
    finally:
        close_run(uri, run_id, ok)
    return summary


def prove_and_promote(
    project: Path, env: dict[str, str], reg: dict, serve_check: bool
) -> tuple[dict, dict]:
    """Serve a candidate that passed the gate, then move `champion` to it (compare-and-set against
    the champion the gate saw). Any failure before the move leaves `champion` where it was."""
    reasons = list(reg["reasons"])
    if not reg["promote"]:
        return {"skipped": "the gate did not pass; nothing to prove"}, {
            "promoted": False,
            "reasons": reasons,
        }
    if not serve_check:
        reasons.append("not promoted without the serving check (--no-serve-check)")
        return {"skipped": "--no-serve-check"}, {"promoted": False, "reasons": reasons}
    candidate = f"models:/{reg['model_name']}/{reg['version']}"
    served = task_facts(run_task(STAGE["smoke_serve"], project, env, ("--model-uri", candidate)))
    reasons.append(served["verdict"])
    if not served["within_budget"]:
        return served, {"promoted": False, "reasons": reasons}
    moved = promote_task.with_options(
        timeout_seconds=STAGE["promote"].timeout_s, retries=STAGE["promote"].retries
    )(env["MLFLOW_TRACKING_URI"], reg["model_name"], reg["version"], reg["champion_before"])
    if moved["promoted"]:
        reg["aliases"] = sorted({*reg["aliases"], "champion"})
    promotion = {"promoted": moved["promoted"], "reasons": reasons + moved["reasons"]}
    return served, {**promotion, "seconds": moved["seconds"]}


@task(name="promote", **RETRY_POLICY)
def promote_task(uri: str, name: str, version: str, expected: str) -> dict:
    """steps/promote.py's compare-and-set, in the flow's process: a few calls to the registry,
    which this process already talks to (as its own command it spent ~2 s importing MLflow again);
    the same compare-and-set as `python -m steps.promote` and `llmpipe promote`."""
    started = time.perf_counter()
    moved = promote(uri, name, version, expected)
    get_run_logger().info("promote: " + "; ".join(moved["reasons"]))
    return {**moved, "seconds": time.perf_counter() - started}


def task_facts(outcome: dict) -> dict:
    """A task's facts (its report), with the seconds it took (and lost to failed attempts)."""
    return {
        **outcome["facts"],
        "seconds": outcome["seconds"],
        "retried_seconds": outcome["retried_seconds"],
    }


if __name__ == "__main__":
    print(json.dumps(finetune(), indent=2))
