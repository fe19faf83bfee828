"""steps/distributed.py: the train stage as 2 CPU processes under torchrun (DDP and FSDP2 over
gloo) against 1 process with the same effective batch; the launcher's command and outcome."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from steps.errors import UserError
from steps.params import TrainParams

REPO = Path(__file__).resolve().parents[2]

# Two ranks each draw their micro-batch of the step from the same shuffled order that one process
# draws its two accumulated micro-batches from, and DDP averages the two gradients as accumulation
# does: the same step, computed in another order of float sums. Measured over 12 steps of the tiny
# model (DDP, full and LoRA; FSDP2, full): the curves agree to 2e-7 relative, the validation loss
# to 1e-7; the bound leaves room for other CPUs' kernels.
LOSS_RTOL = 1e-4


def train_stage(
    project: Path, train: dict, outcome: Path | None = None
) -> subprocess.CompletedProcess:
    """`python -m steps.train` as dvc.yaml runs it, in `project`, with train: params `train`."""
    (project / "params.yaml").write_text(yaml.safe_dump({"train": train}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("LLMPIPE_OUTCOME", None)
    if outcome:
        env["LLMPIPE_OUTCOME"] = str(outcome)
    cmd = [
        sys.executable, "-m", "steps.train", "--params", "params.yaml",
        "--base-model", "base", "--prepared", "prepared", "--checkpoints", "ckpt",
        "--out", "tuned", "--metrics", "metrics/train.json", "--loss-curve", "metrics/loss.csv",
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=600)


def losses(project: Path) -> list[float]:
    with (project / "metrics" / "loss.csv").open() as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def copy_project(src: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in ("base", "prepared"):
        (dest / name).symlink_to((src / name).resolve())
    return dest


COMMON = {
    "max_steps": 12,
    "learning_rate": 3e-3,
    "warmup_ratio": 0.0,
    "save_steps": 5,
    "precision": "fp32",
    "batch_size": 2,
}


@pytest.mark.integration
@pytest.mark.parametrize(
    ("method", "sharding"), [("full", "ddp"), ("lora", "ddp"), ("full", "fsdp")]
)
def test_two_cpu_processes_follow_one_process_loss_curve(tmp_path, text_project, method, sharding):
    one = copy_project(text_project, tmp_path / "one")
    two = copy_project(text_project, tmp_path / "two")
    alone = train_stage(one, {**COMMON, "method": method, "gradient_accumulation_steps": 2})
    assert alone.returncode == 0, alone.stderr[-3000:]
    outcome = tmp_path / "outcome.json"
    ddp = train_stage(
        two,
        {
            **COMMON,
            "method": method,
            "gradient_accumulation_steps": 1,
            "nproc_per_node": 2,
            "distributed": sharding,
        },
        outcome,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "torchrun --nproc-per-node=2 --standalone" in ddp.stdout

    assert len(losses(two)) == len(losses(one)) == 12
    assert losses(two) == pytest.approx(losses(one), rel=LOSS_RTOL)
    assert losses(two)[-1] < losses(two)[0]
    m1 = json.loads((one / "metrics/train.json").read_text())
    m2 = json.loads((two / "metrics/train.json").read_text())
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    assert m2["tokens_seen"] == m1["tokens_seen"] == 12 * 2 * 2 * 32  # steps x 2 x 2 micro x block
    assert m2["eval_loss"] == pytest.approx(m1["eval_loss"], rel=LOSS_RTOL)
    # rank 0 alone wrote the outputs; the launcher reports its record as the stage's own
    assert (two / "tuned" / "model.safetensors").is_file()
    assert not list((two / "ckpt").glob("train-*"))
    record = json.loads(outcome.read_text())
    assert record["status"] == "ran"
    assert record["facts"]["world_size"] == 2
    assert record["facts"]["eval_loss"] == pytest.approx(m2["eval_loss"])
    assert ddp.stdout.count("train: {") == 1  # one metrics line, from rank 0


@pytest.mark.integration
def test_a_user_error_in_the_ranks_is_one_line_exit_2(tmp_path, text_project):
    project = copy_project(text_project, tmp_path / "p")
    (project / "prepared").unlink()
    (project / "prepared").mkdir()  # no train split
    outcome = tmp_path / "outcome.json"
    done = train_stage(project, {**COMMON, "nproc_per_node": 2}, outcome)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: prepared/train: missing")
    assert "torchrun" not in done.stdout  # found before any process started
    assert json.loads(outcome.read_text())["status"] == "user_error"
    assert not (project / "tuned").exists()


@pytest.mark.unit
def test_torchrun_command_one_machine_and_several():
    from steps.distributed import torchrun_arguments

    one = torchrun_arguments(TrainParams(nproc_per_node=4), ["--params", "p.yaml"])
    assert one == ["--nproc-per-node=4", "--standalone", "-m", "steps.train", "--params", "p.yaml"]
    params = TrainParams(nproc_per_node=8, nnodes=2, rdzv_endpoint="10.1.2.3:29500", rdzv_id="r7")
    many = torchrun_arguments(params, [])
    assert "--standalone" not in many
    assert {"--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=10.1.2.3:29500"} <= set(many)
    assert "--rdzv-id=r7" in many


@pytest.mark.unit
@pytest.mark.parametrize("endpoint", ["", "host", "host:", ":29500", "host:http", "host:70000"])
def test_several_machines_need_a_rendezvous_endpoint(endpoint):
    from steps.params import parse_params

    with pytest.raises(UserError, match=r"train\.rdzv_endpoint must be host:port"):
        parse_params({"train": {"nnodes": 2, "rdzv_endpoint": endpoint}})


def ranks_of(launcher_pid: int) -> list[int]:
    """Live processes whose command line runs steps.train under the launcher (its ranks)."""
    import psutil

    try:
        children = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p.pid for p in children if "steps.train" in " ".join(p.cmdline())]


@pytest.mark.integration
@pytest.mark.parametrize("kill", ["group-sigterm", "launcher-sigkill"])
def test_stopping_the_stage_stops_every_rank(tmp_path, text_project, kill):
    """The flow stops a stage with SIGTERM to its process group (then SIGKILL): torchrun starts
    each rank in a session of its own, out of that group's reach, so a rank must die with the
    stage's process (torchrun runs inside it) rather than train on as an orphan."""
    import signal
    import time

    import psutil

    project = copy_project(text_project, tmp_path / "p")
    (project / "params.yaml").write_text(
        yaml.safe_dump({"train": {**COMMON, "max_steps": 100000, "nproc_per_node": 2}})
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("LLMPIPE_OUTCOME", None)
    cmd = [
        sys.executable, "-m", "steps.train", "--params", "params.yaml",
        "--base-model", "base", "--prepared", "prepared", "--checkpoints", "ckpt",
        "--out", "tuned", "--metrics", "metrics/train.json", "--loss-curve", "metrics/loss.csv",
    ]  # fmt: skip
    stage = subprocess.Popen(
        cmd, cwd=project, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while len(ranks := ranks_of(stage.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(ranks) == 2, "the 2 ranks did not start"
        time.sleep(3)  # some way into their start (an earlier kill is covered by the parent check)
        if kill == "group-sigterm":
            os.killpg(stage.pid, signal.SIGTERM)
        else:  # the worst case: the launcher dies without a word to the ranks
            os.kill(stage.pid, signal.SIGKILL)
        stage.wait(timeout=60)
        deadline = time.monotonic() + 30
        while any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in ranks):
            assert time.monotonic() < deadline, "a rank outlived the stopped stage"
            time.sleep(0.2)
    finally:
        for pid in ranks_of(stage.pid):
            os.kill(pid, signal.SIGKILL)
        if stage.poll() is None:
            os.killpg(stage.pid, signal.SIGKILL)
    assert not (project / "tuned").exists()
