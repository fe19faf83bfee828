"""Training throughput of steps.train: fp32 (baseline) against the default precision, side by side.

    python benchmarks/train_throughput.py [--quick] [--steps N] [--block-size N] [--batch-size N]

Runs the real `steps.train.train()` twice on the same synthetic blocks and the same model: once with
`train.precision: fp32`, once with `auto` (bf16 mixed precision on a CUDA device that supports it,
fp32 elsewhere). The model is models/base when present, else SmolLM2-135M's architecture with random
weights (throughput does not depend on the weights). Prints tokens/s, model FLOPs utilisation on CUDA
(6 x parameters x tokens/s over the device's dense bf16 peak) and ends with one JSON line.
Issue 2 names no speed goal, so the check reports the ratio with no goal to meet.
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

# SmolLM2-135M's shape, from the GGUF's config (steps.base_model writes the same to models/base).
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense, no sparsity


def build_model_dir(dest: Path, layers: int | None) -> tuple[Path, int]:
    """models/base if it exists (full runs), else a random model of SmolLM2-135M's shape."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    base = REPO / "models" / "base"
    if base.is_dir() and layers is None:
        model = LlamaForCausalLM.from_pretrained(base)
        return base, sum(p.numel() for p in model.parameters())
    torch.manual_seed(0)
    cfg = dict(SMOLLM2_135M, num_hidden_layers=layers or SMOLLM2_135M["num_hidden_layers"])
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.save_pretrained(dest, safe_serialization=True)
    placeholder_tokenizer().save_pretrained(
        dest
    )  # train() saves one with the model; ids are synthetic
    return dest, sum(p.numel() for p in model.parameters())


def placeholder_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
    )


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
        learning_rate=1e-4,
        warmup_ratio=0.0,
        save_steps=10**6,
        precision=precision,
    )
    metrics = train(params, base, data, work / f"out-{precision}")
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
        os.chdir(work)  # train() writes metrics/ and checkpoints/ relative to the cwd
        base, n_params = build_model_dir(work / "base", layers)
        write_blocks(work / "data", args.steps * args.batch_size, args.block_size, 49152)
        results = {p: run(p, args, base, work / "data", work) for p in ("fp32", "auto")}
    device = torch.cuda.get_device_name() if cuda else "cpu"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in device), None)
    for precision, tps in results.items():
        mfu = f", MFU {6 * n_params * tps / peak:.1%}" if peak and precision == "auto" else ""
        print(f"{precision:>5}: {tps:,.0f} tokens/s{mfu}  ({n_params / 1e6:.0f}M params, {device})")
    ratio = results["auto"] / results["fp32"]
    check = {
        "name": "train_tokens_per_s_default_over_fp32",
        "ratio": round(ratio, 3),
        "goal": "none named in issue 2 (reported)",
    }
    print(json.dumps({"benchmark": "train_throughput", "checks": [check]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
