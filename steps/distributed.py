"""The train stage on several processes: torchrun launches them, the Trainer shards the work.

    train: {nproc_per_node: 2}                       # params.yaml: 2 processes on this machine
    train: {nproc_per_node: 8, nnodes: 2, rdzv_endpoint: 10.0.0.1:29500}   # 2 machines x 8 GPUs

`python -m steps.train ...` (the DVC stage, unchanged) sees a world of more than one process and
re-runs itself under `python -m torch.distributed.run` (torchrun): `--standalone` on one machine (a
free loopback port for the rendezvous), c10d at `train.rdzv_endpoint` across machines, where every
machine runs the same stage. Each process is one rank: the Trainer (through accelerate) sees
torchrun's environment, joins the process group (NCCL on GPUs, gloo on CPUs) and wraps the model in
DDP, or FSDP (version 2) with `train.distributed: fsdp`; each rank draws its own micro-batches from
the same shuffled order, so a step of N processes x B blocks is the step one process would take with
N x B (batch_size and gradient_accumulation_steps are per process). Only rank 0 writes the stage's
outputs and its outcome record (steps/outcome.py); the launching process reads that record and
reports it as its own, so the flow sees one stage either way.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from steps.errors import UserError
from steps.outcome import OUTCOME_ENV, leave_for_the_flow, read_outcome
from steps.params import TrainParams

RANK_OUTCOME = "outcome-rank0.json"
LAUNCHER_ENV = "LLMPIPE_TRAIN_LAUNCHER_PID"  # the process that ran torchrun: the ranks' parent


def world_size(params: TrainParams) -> int:
    return params.nproc_per_node * params.nnodes


def launched() -> bool:
    """True inside a process torchrun started (it sets LOCAL_RANK and WORLD_SIZE)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def current_world() -> int:
    """Processes training together: WORLD_SIZE under torchrun, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1


def needs_launch(params: TrainParams) -> bool:
    return world_size(params) > 1 and not launched()


def check(params: TrainParams) -> None:
    """What cannot work, before any process starts."""
    gpus = torch.cuda.device_count()
    if gpus and params.nproc_per_node > gpus:
        raise UserError(
            f"params.yaml: 'train.nproc_per_node' is {params.nproc_per_node} but this machine "
            f"has {gpus} CUDA device(s); one process per GPU"
        )


def torchrun_arguments(params: TrainParams, argv: list[str]) -> list[str]:
    """torchrun's command line (less `torchrun`) that runs `python -m steps.train argv` as
    nproc_per_node ranks on this machine."""
    cmd = [f"--nproc-per-node={params.nproc_per_node}"]
    if params.nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += [
            f"--nnodes={params.nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={params.rdzv_endpoint}",
            f"--rdzv-id={params.rdzv_id}",
        ]
    return [*cmd, "-m", "steps.train", *argv]


def launch(params: TrainParams, argv: list[str]) -> dict[str, Any]:
    """Run the train stage as a torchrun job; return rank 0's facts (its outcome record), and hand
    on its requests for the flow's MLflow run. A user error in rank 0 is raised here as one.

    torchrun runs in this process (its `run()`, as its command line calls it), so the ranks are
    this process's children: each is killed when this process dies (enter_rank), however it dies,
    and a rank that finds another parent (this one gone before the rank could ask) exits."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = torchrun_arguments(params, argv)
    print(f"train: {world_size(params)} processes: torchrun {' '.join(args)}", flush=True)
    saved = {name: os.environ.get(name) for name in (OUTCOME_ENV, LAUNCHER_ENV, "OMP_NUM_THREADS")}
    with tempfile.TemporaryDirectory(prefix="llmpipe-ranks-") as tmp:
        rank_outcome = Path(tmp) / RANK_OUTCOME
        os.environ[OUTCOME_ENV] = str(rank_outcome)  # the ranks inherit this process's environment
        os.environ[LAUNCHER_ENV] = str(os.getpid())
        os.environ.setdefault("OMP_NUM_THREADS", str(rank_threads(params.nproc_per_node)))
        failure = None
        try:
            run(parse_args(args))
        except ChildFailedError as err:
            failure = "; ".join(f"rank {r}: {f.message}" for r, f in err.failures.items())
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        record = read_outcome(rank_outcome) or {}
    if record.get("status") == "user_error":
        raise UserError(record["message"])
    if failure or record.get("status") != "ran":
        why = record.get("message") or failure or "rank 0 left no outcome"
        raise RuntimeError(f"distributed training failed: {why}")
    if record.get("log"):
        leave_for_the_flow(record["log"])
    return record.get("facts", {})


def rank_threads(local_world: int) -> int:
    """CPU threads per rank: the cores shared out, at least one each."""
    return max(1, (os.cpu_count() or 1) // max(1, local_world))


def share_cpu_threads(local_world: int = 1) -> int:
    """Set this training process's CPU threads and return them: OMP_NUM_THREADS when set (by the
    user, for a shared machine or jobs side by side; torch read it at start), else the cores
    shared among the machine's `local_world` processes (torch's own default counts only physical
    cores)."""
    if not os.environ.get("OMP_NUM_THREADS", "").strip():
        torch.set_num_threads(rank_threads(local_world))
    return torch.get_num_threads()


def enter_rank() -> None:
    """In a process torchrun started: only rank 0 keeps the outcome record; the rank is killed
    when its launcher dies (torchrun starts each rank in a session of its own, out of reach of a
    signal to the stage's process group; SIGKILL, since a rank waiting in a collective for a rank
    already gone runs no Python signal handler); each rank takes its own GPU, or its share of the
    CPU threads."""
    if rank() != 0:
        os.environ.pop(OUTCOME_ENV, None)
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        launcher = os.environ.get(LAUNCHER_ENV)
        if launcher and os.getppid() != int(launcher):  # it died before the line above
            os._exit(1)
    if torch.cuda.is_available():  # before any weights load: a 4-bit base loads onto this GPU
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        share_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def is_main_process() -> bool:
    return rank() == 0
