"""A train stage killed by SIGKILL inside a real flow run (the out-of-memory killer, a lost node) is
retried by Prefect, resumes from its last checkpoint, and ends where an uninterrupted run ends."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from benchmarks.workloads import make_project, tiny_params

pytestmark = pytest.mark.integration


def losses_in(curve: Path) -> dict[int, float]:
    with curve.open() as f:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(f)}


def losses(project: Path) -> dict[int, float]:
    return losses_in(project / "metrics" / "train_loss.csv")


def kill_train_after_first_checkpoint(project: Path, killed: list[int]) -> None:
    """Watch for a complete checkpoint, then SIGKILL the `steps.train` process of `project`."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not killed:
        if list((project / "checkpoints").glob("train-*/checkpoint-*/trainer_state.json")):
            for proc in psutil.process_iter(["cmdline", "cwd"]):
                cmdline = " ".join(proc.info["cmdline"] or [])
                if proc.info["cwd"] == str(project) and "-m steps.train" in cmdline:
                    os.kill(proc.pid, signal.SIGKILL)
                    killed.append(proc.pid)
                    return
        time.sleep(0.2)


def test_a_killed_train_stage_is_retried_and_resumes_exactly(
    tmp_path, tiny_model_dir, prefect_server
):
    from flows.cli import format_summary
    from flows.finetune import finetune

    params = tiny_params(tiny_model_dir, max_steps=12, save_steps=4, learning_rate=3e-3)
    killed_project = make_project(tmp_path / "killed", params)
    killed: list[int] = []
    watcher = threading.Thread(target=kill_train_after_first_checkpoint,
                               args=(killed_project, killed), daemon=True)  # fmt: skip
    watcher.start()
    started = time.monotonic()
    summary = finetune(project_dir=str(killed_project), serve_check=False)
    wall = time.monotonic() - started
    watcher.join(timeout=5)
    assert killed, "the train stage was never killed"

    train = next(s for s in summary["stages"] if s["name"] == "train")
    assert train["attempt"] == 2 and train["retried_seconds"] >= 10  # the first retry waits 10 s
    assert "failed attempts and their retries" in format_summary(summary, wall)

    # the uninterrupted run: the same train stage on the same prepared data and base model, from
    # no checkpoint, into files of its own (only this stage: the rest of a flow is not needed)
    clean = tmp_path / "clean"
    done = subprocess.run(
        [sys.executable, "-m", "steps.train", "--params", "params.yaml",
         "--base-model", "models/base", "--prepared", "data/prepared",
         "--checkpoints", str(clean / "checkpoints"), "--out", str(clean / "tuned"),
         "--metrics", str(clean / "train.json"), "--loss-curve", str(clean / "train_loss.csv")],
        cwd=killed_project, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    resumed, uninterrupted = losses(killed_project), losses_in(clean / "train_loss.csv")
    assert resumed.keys() == uninterrupted.keys() == set(range(1, 13))
    for step in range(1, 13):
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-5), step
