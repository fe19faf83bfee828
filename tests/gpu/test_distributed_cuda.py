"""The train stage on every visible GPU (DDP over NCCL, FSDP2) against one GPU with the same
effective batch. Skipped with fewer than 2 CUDA devices (CI, laptops, a one-GPU machine)."""

from __future__ import annotations

import json

import pytest

from tests.steps.test_distributed import COMMON, copy_project, losses, train_stage

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more CUDA devices"),
]


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_every_gpu_follows_one_gpu_loss_curve(tmp_path, text_project, sharding):
    gpus = torch.cuda.device_count()
    common = {**COMMON, "precision": "fp32", "batch_size": 2}
    one = copy_project(text_project, tmp_path / "one")
    many = copy_project(text_project, tmp_path / "many")
    alone = train_stage(one, {**common, "gradient_accumulation_steps": gpus})
    assert alone.returncode == 0, alone.stderr[-3000:]
    ranks = train_stage(
        many,
        {**common, "gradient_accumulation_steps": 1, "nproc_per_node": gpus,
         "distributed": sharding},
    )  # fmt: skip
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    # NCCL sums in another order than one GPU's accumulation: looser than the CPU bound
    assert losses(many) == pytest.approx(losses(one), rel=1e-3)
    metrics = json.loads((many / "metrics/train.json").read_text())
    assert metrics["world_size"] == gpus
    single = json.loads((one / "metrics/train.json").read_text())
    speed = {m["world_size"]: m["tokens_seen"] / m["train_seconds"] for m in (single, metrics)}
    print(  # what the note reports (pytest -s): training tokens/s on 1 GPU and on all of them
        f"{sharding}: 1 GPU {speed[1]:.0f} tokens/s, {gpus} GPUs {speed[gpus]:.0f} tokens/s "
        f"({speed[gpus] / speed[1]:.2f}x)"
    )
