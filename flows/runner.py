"""Run one stage of the table as a subprocess, stream its output, and read its outcome record.

A DVC stage runs as `dvc repro --single-item <stage>` (DVC decides whether it is up to date), a task
without a DVC stage as its own command; either way in its own process group, so its memory (a GPU's
too) is freed when it ends and a hung stage is killed with its children. What happened is read from
the outcome record the step writes (steps/outcome.py), never from its console: no record from a DVC
stage means DVC ran nothing (cached); a record with status "user_error" is the user's mistake (not
retried); any other failure is worth a retry.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from steps.environment import quiet_offline_env
from steps.executables import interpreter_bin, with_interpreter_on_path
from steps.outcome import OUTCOME_ENV, read_outcome
from steps.servers import stop_process_group
from steps.stages import Stage, command
from steps.tracking import log_request


class UserInputError(Exception):
    """The stage rejected the user's data or params: retrying cannot help."""


class StageFailed(Exception):
    """The stage failed for another reason (killed, out of memory, lost connection): retry it."""


@dataclass(frozen=True)
class StageOutcome:
    name: str
    skipped: bool  # DVC found deps, params and outs unchanged and ran nothing
    seconds: float  # the task's wall time: DVC's checks and the step together
    step_seconds: float = 0.0  # inside the step's main() (0 when skipped)
    # the step's process from its creation to its outcome record (its interpreter's start and
    # imports too); for a DVC stage, seconds - process_seconds is DVC's own time (0 when skipped)
    process_seconds: float = 0.0
    # this process logging into the flow's MLflow run what the step left for it (inside `seconds`,
    # after the step's process ended: MLflow's time, not DVC's)
    log_seconds: float = 0.0
    facts: dict = field(default_factory=dict)  # what the step returned (counts, metrics, ...)

    def to_dict(self) -> dict:
        return asdict(self)


def stage_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment of a stage: quiet and offline, this interpreter first on PATH (so `python`
    in dvc.yaml is ours), plus `extra`; without the Prefect UI's login (a stage never calls
    Prefect, and the code it runs, a model's included, has no business with it)."""
    from flows.stack import SECRET_VARS

    env = {**quiet_offline_env(), **extra}
    for name in SECRET_VARS:
        env.pop(name, None)
    return with_interpreter_on_path(env)


def dvc_executable() -> str:
    local = interpreter_bin() / "dvc"
    return str(local) if local.exists() else (shutil.which("dvc") or "dvc")


STOP_GRACE_S = 10  # after SIGTERM, how long a stage may take to stop what it started


def run_logged(cmd: list[str], cwd: Path, env: dict[str, str], log: Callable[[str], None]):
    """Run cmd, passing each output line to `log`; stop its process group if we are interrupted
    (a signal, a task timeout): SIGTERM first, so a step can stop the servers it started, then
    SIGKILL after STOP_GRACE_S."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)  # fmt: skip
    tail: deque[str] = deque(maxlen=40)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            log(line)
        return proc.wait(), list(tail)
    finally:
        if proc.poll() is None:  # timeout or a signal: take the whole stage down with us
            stop_process_group(proc, grace=STOP_GRACE_S)


def stage_command(stage: Stage, extra_args: tuple[str, ...] = ()) -> list[str]:
    if stage.dvc:
        return [dvc_executable(), "repro", "--single-item", stage.name]
    return [sys.executable, *command(stage)[1:], *extra_args]


def run_stage(
    stage: Stage,
    project: Path,
    env: dict[str, str],
    log: Callable[[str], None],
    extra_args: tuple[str, ...] = (),
) -> StageOutcome:
    """Run `stage` in `project`; its outcome, or UserInputError / StageFailed."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"llmpipe-{stage.name}-") as tmp:
        outcome_file = Path(tmp) / "outcome.json"
        run_env = stage_env({**env, OUTCOME_ENV: str(outcome_file)})
        code, tail = run_logged(stage_command(stage, extra_args), project, run_env, log)
        record = read_outcome(outcome_file)
    seconds = time.perf_counter() - started
    if record is not None and record["status"] == "user_error":
        raise UserInputError(record["message"])
    if code != 0 or (record is None and not stage.dvc):
        why = record["message"] if record and "message" in record else " | ".join(tail[-3:])
        raise StageFailed(f"stage {stage.name!r} failed (exit {code}): {why}")
    if record is None:
        return StageOutcome(stage.name, skipped=True, seconds=seconds)
    log_seconds = 0.0
    if record.get("log"):  # what the step asked to log into the flow's run: the run it saw
        logging = time.perf_counter()
        log_request(run_env["MLFLOW_TRACKING_URI"], run_env["MLFLOW_RUN_ID"], record["log"])
        log_seconds = time.perf_counter() - logging
        seconds += log_seconds  # the logging is the task's too
    return StageOutcome(
        stage.name,
        False,
        seconds,
        record["seconds"],
        process_seconds=record.get("process_seconds", 0.0),
        log_seconds=log_seconds,
        facts=record.get("facts", {}),
    )
