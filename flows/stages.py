"""Run one pipeline stage as a subprocess, stream its output, and classify how it failed.

Each stage runs in its own process (`dvc repro --single-item <stage>` or `python -m steps.<name>`),
so its memory (a GPU's too) is freed when it ends and a hung stage can be killed with its children.
A step that exits 2 failed on the user's input (steps.errors); anything else is worth a retry.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from steps.errors import USER_ERROR_EXIT


class UserInputError(Exception):
    """The stage rejected the user's data or params: retrying cannot help."""


class StageFailed(Exception):
    """The stage failed for another reason (killed, out of memory, lost connection): retry it."""


@dataclass(frozen=True)
class StageOutcome:
    name: str
    skipped: bool  # DVC found deps, params and outs unchanged and ran nothing
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def venv_bin() -> Path:
    return Path(sys.executable).parent


def stage_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment of a stage: this interpreter first on PATH, so `python` in dvc.yaml is ours."""
    env = {**os.environ, **extra}
    env["PATH"] = f"{venv_bin()}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Progress bars redraw with \r and become one log line per frame; the steps print progress lines.
    env.setdefault("TQDM_DISABLE", "1")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return env


def dvc_executable() -> str:
    local = venv_bin() / "dvc"
    return str(local) if local.exists() else (shutil.which("dvc") or "dvc")


def run_logged(cmd: list[str], cwd: Path, env: dict[str, str], log: Callable[[str], None]):
    """Run cmd, passing each output line to `log`; kill its process group if we are interrupted."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    tail: deque[str] = deque(maxlen=40)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            log(line)
        return proc.wait(), list(tail)
    finally:
        if proc.poll() is None:  # timeout or Ctrl-C: take the whole stage down with us
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def user_error_line(lines: list[str]) -> str | None:
    """The one-line message of a step that exited with USER_ERROR_EXIT, if that is what happened."""
    failed_as_user = any(re.search(rf"exited with {USER_ERROR_EXIT}\b", line) for line in lines)
    messages = [line[len("error: ") :] for line in lines if line.startswith("error: ")]
    return messages[-1] if messages and failed_as_user else None


def run_dvc_stage(stage: str, project: Path, env: dict[str, str], log: Callable[[str], None]):
    started = time.perf_counter()
    cmd = [dvc_executable(), "repro", "--single-item", stage]
    code, lines = run_logged(cmd, project, stage_env(env), log)
    if code != 0:
        message = user_error_line(lines)
        if message:
            raise UserInputError(message)
        raise StageFailed(f"stage {stage!r} failed (exit {code}): " + " | ".join(lines[-3:]))
    # "didn't change, skipping"; or restored from DVC's run cache: "is cached - skipping run"
    skipped = any(
        re.search(r"didn't change, skipping|is cached - skipping", line) for line in lines
    )
    return StageOutcome(stage, skipped, time.perf_counter() - started)


def run_step_module(
    module: str, args: list[str], project: Path, env: dict[str, str], log: Callable[[str], None]
) -> float:
    """`python -m steps.<module> args` for the tasks that change MLflow rather than files."""
    started = time.perf_counter()
    code, lines = run_logged([sys.executable, "-m", module, *args], project, stage_env(env), log)
    if code == USER_ERROR_EXIT:
        raise UserInputError(user_error_line([*lines, "exited with 2"]) or lines[-1])
    if code != 0:
        raise StageFailed(f"{module} failed (exit {code}): " + " | ".join(lines[-3:]))
    return time.perf_counter() - started
