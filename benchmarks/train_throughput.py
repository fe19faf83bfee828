"""Training throughput of steps.train: fp32 (baseline) against the default precision, side by side.

    python benchmarks/train_throughput.py [--quick] [--steps N] [--block-size N] [--batch-size N]

Runs the real `steps.train.train()` twice on the same synthetic blocks and the same model: once with
`train.precision: fp32`, once with `auto` (bf16 mixed precision on a CUDA device that supports it,
fp32 elsewhere). The model is models/base when present, else SmolLM2-135M's architecture with random
weights (throughput does not depend on the weights). Prints tokens/s, model FLOPs utilisation on
CUDA (6 x parameters x tokens/s over the device's dense bf16 peak) and ends with one JSON line.
No goal is named for this ratio (on CPU both runs are fp32, so it is ~1 by construction): it is
printed, and the checks list is empty. Issue 10 replaces this with a comparison against a plain
PyTorch loop.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.workloads import random_model_dir  # noqa: E402  (after the path is set)

PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense, no sparsity


def build_model_dir(dest: Path, layers: int | None) -> tuple[Path, int]:
    """models/base if it exists (full runs), else a random model of SmolLM2-135M's shape."""
    base = REPO / "models" / "base"
    if base.is_dir() and layers is None:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(base)
        return base, sum(p.numel() for p in model.parameters())
    return random_model_dir(dest, layers)


def write_blocks(data_dir: Path, n_blocks: int, block_size: int, vocab: int) -> None:
    import numpy as np
    from datasets import Dataset

    rng = np.random.default_rng(0)
    blocks = rng.integers(3, vocab, size=(n_blocks, block_size)).tolist()
    Dataset.from_dict({"input_ids": blocks}).save_to_disk(str(data_dir / "train"), num_shards=1)
    Dataset.from_dict({"input_ids": []}).save_to_disk(str(data_dir / "validation"), num_shards=1)
    (data_dir / "stats.json").write_text(json.dumps({"synthetic": n_blocks}))


def run(precision: str, args, base: Path, data: Path, work: Path) -> float:
    from steps.params import TrainParams
    from steps.train import train

    params = TrainParams(
        max_steps=args.steps,
        batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=1e-4,
        warmup_ratio=0.0,
        save_steps=10**6,
        precision=precision,
    )
    out = work / f"out-{precision}"
    metrics = train(
        params, base, data, out / "model", out / "train.json", out / "loss.csv", out / "ckpt"
    )
    return metrics["tokens_seen"] / metrics["train_seconds"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps of a 4-layer model")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--block-size", type=int)
    parser.add_argument("--batch-size", type=int)
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    layers = 4 if args.quick else None
    args.steps = args.steps or (4 if args.quick else 30)
    args.block_size = args.block_size or (128 if args.quick else (2048 if cuda else 256))
    args.batch_size = args.batch_size or (2 if args.quick else (16 if cuda else 8))
    os.environ.pop("MLFLOW_RUN_ID", None)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base, n_params = build_model_dir(work / "base", layers)
        write_blocks(work / "data", args.steps * args.batch_size, args.block_size, 49152)
        results = {p: run(p, args, base, work / "data", work) for p in ("fp32", "auto")}
    device = torch.cuda.get_device_name() if cuda else "cpu"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in device), None)
    for precision, tps in results.items():
        mfu = f", MFU {6 * n_params * tps / peak:.1%}" if peak and precision == "auto" else ""
        print(f"{precision:>5}: {tps:,.0f} tokens/s{mfu}  ({n_params / 1e6:.0f}M params, {device})")
    print(f"default precision / fp32 tokens/s: {results['auto'] / results['fp32']:.3f}x")
    print(json.dumps({"benchmark": "train_throughput", "checks": []}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
