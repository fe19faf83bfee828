"""Fine-tuning of the base model on the packed training blocks, with the transformers Trainer.

    python -m steps.train --params params.yaml --base-model models/base --prepared data/prepared \
        --checkpoints checkpoints --out models/tuned --metrics metrics/train.json \
        --loss-curve metrics/train_loss.csv                          # the DVC stage `train`

bf16 autocast where the device multiplies bf16 natively (a CUDA GPU that supports it, a CPU with
AVX512-BF16 or AMX), fp32 elsewhere (`train.precision: auto`, steps/precision.py). One process by
default; with `train.nproc_per_node` (and `train.nnodes`) above 1 the stage re-runs itself under
torchrun, one rank per process, DDP or FSDP (steps/distributed.py). Checkpoints go to
<checkpoints>/train-<fingerprint>/, outside DVC's outs (DVC deletes outs before a stage runs), so a
retried or interrupted run with the same inputs resumes from the last one; they are deleted once the
model is saved. Inside a flow (MLFLOW_RUN_ID set) the loss curve is logged to the flow's MLflow run
by the Trainer's own MLflow callback. The Trainer is transformers' own with one change: its loss
runs the vocabulary projection only at positions that carry a label, a chunk at a time
(steps/supervised_loss.py), the stock loss to float rounding; and on a CPU, packed chat blocks
attend one conversation at a time (steps/packed_attention.py).

`train.method` picks what trains: every weight (full), LoRA adapters (lora) or LoRA adapters on a
4-bit base (qlora, CUDA only), through steps/lora.py. The out dir always holds a plain model; with
adapters it is the merged model, and the adapter alone is saved to <out>/adapter/.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from steps import distributed, lora
from steps.arguments import stage_arguments
from steps.chat import packed_batch
from steps.errors import UserError
from steps.outcome import run_step
from steps.outputs import atomic_dir, atomic_file, write_json
from steps.packed_attention import use_for_packed_blocks
from steps.params import TrainParams, load_params
from steps.precision import Precision, training_bf16
from steps.supervised_loss import supervised_trainer_class
from steps.tracking import inside_flow_run, log_to_flow_run


def use_bf16(precision: Precision) -> bool:
    """bf16 autocast for training on this machine's device (steps/precision.py)."""
    return training_bf16(precision)


def causal_lm_batch(features: list[dict]) -> dict[str, torch.Tensor]:
    """Blocks are full length, so no padding: the labels are the inputs (the model shifts them)."""
    ids = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)
    return {"input_ids": ids, "labels": ids.clone()}


def collator(dataset):
    """Text blocks train on every token; chat blocks (with labels and position ids) on the
    assistant's tokens, each conversation isolated from the others in its block (steps/chat.py)."""
    return packed_batch if "position_ids" in dataset.column_names else causal_lm_batch


def run_fingerprint(params: TrainParams, data_dir: Path, base_dir: Path) -> str:
    """Identifies the inputs of a training run (params, data, the base model's config and weights),
    so a checkpoint is resumed only by the same run: another model of the same shape starts over."""
    h = hashlib.sha256(params.model_dump_json().encode())
    for f in (data_dir / "stats.json", base_dir / "config.json"):
        h.update(f.read_bytes() if f.is_file() else b"")
    for weights in sorted(base_dir.glob("*.safetensors")):  # ~1 s per GB
        with weights.open("rb") as f:
            h.update(hashlib.file_digest(f, "md5").digest())
    return h.hexdigest()[:12]


def last_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint whose trainer_state.json (written last) says it reached its step;
    newer, incomplete ones (a stage killed while saving) are removed, so neither the resume nor the
    Trainer's rotation of old checkpoints can pick them."""
    if not ckpt_dir.is_dir():
        return None
    found = [p for p in ckpt_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    for ckpt in sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        state = ckpt / "trainer_state.json"
        try:
            complete = json.loads(state.read_text())["global_step"] == int(ckpt.name.split("-")[-1])
        except (OSError, ValueError, KeyError):
            complete = False
        if complete:
            return ckpt
        print(f"train: {ckpt} is incomplete (killed while saving?); removing it")
        shutil.rmtree(ckpt, ignore_errors=True)
    return None


def training_arguments(params: TrainParams, output_dir: Path):
    from transformers import TrainingArguments

    report_to = ["mlflow"] if os.environ.get("MLFLOW_RUN_ID") else "none"
    bf16 = use_bf16(params.precision)
    several = distributed.current_world() > 1
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=params.max_steps,
        learning_rate=params.learning_rate,
        per_device_train_batch_size=params.batch_size,
        per_device_eval_batch_size=params.batch_size,
        gradient_accumulation_steps=params.gradient_accumulation_steps,
        warmup_steps=params.warmup_ratio,  # < 1 is read as a share of max_steps
        weight_decay=params.weight_decay,
        lr_scheduler_type=params.lr_scheduler,
        bf16=bf16,
        # the Trainer's condition for CPU bf16, and for gloo between CPU processes
        use_cpu=(bf16 or several) and not torch.cuda.is_available(),
        # every trainable weight gets a gradient in every step: DDP need not search for unused ones
        ddp_find_unused_parameters=False if several else None,
        **fsdp_arguments(params, several),
        seed=params.seed,
        data_seed=params.seed,
        logging_steps=max(1, params.max_steps // 50),  # ~50 points on the loss curve
        save_strategy="steps",
        save_steps=params.save_steps,
        save_total_limit=1,
        eval_strategy="no",  # one validation pass at the end; mid-run evals cost CPU minutes
        prediction_loss_only=True,  # that pass wants the loss, not every position's logits kept
        report_to=report_to,
        disable_tqdm=True,  # log lines read better than progress bars in Prefect and DVC logs
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


def fsdp_arguments(params: TrainParams, several: bool) -> dict:
    """FSDP (version 2) through the Trainer and accelerate: each decoder layer a unit of its own,
    its parameters gathered for its forward and backward and resharded after them."""
    if not (several and params.distributed == "fsdp"):
        return {}
    return {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": True}}


def make_trainer(model, args, train_set, callbacks: list | None = None, collate=None):
    """The Trainer of the train stage: transformers' own, with its loss computed over supervised
    tokens only (steps/supervised_loss.py); `collate` defaults to collator(train_set). On a CPU,
    packed chat blocks attend one conversation at a time (steps/packed_attention.py)."""
    if "position_ids" in train_set.column_names and args.device.type == "cpu":
        use_for_packed_blocks(model)
    return supervised_trainer_class()(
        model=model,
        args=args,
        train_dataset=train_set,
        data_collator=collate or collator(train_set),
        callbacks=callbacks,
    )


def train(
    params: TrainParams,
    base_dir: Path,
    data_dir: Path,
    out_dir: Path,
    metrics_file: Path,
    loss_curve: Path,
    checkpoints: Path,
    callbacks: list | None = None,
) -> dict:
    """Fine-tune `base_dir` on `data_dir`; write the model, its metrics and its loss curve.
    `callbacks`: extra TrainerCallbacks (a benchmark's clock, say)."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer
    from transformers.integrations import MLflowCallback

    check_inputs(params, base_dir, data_dir)
    train_set = load_from_disk(str(data_dir / "train"))
    validation = load_from_disk(str(data_dir / "validation"))
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = trainable_model(params, base_dir)
    ckpt_dir = checkpoints / f"train-{run_fingerprint(params, data_dir, base_dir)}"
    resume = last_complete_checkpoint(ckpt_dir)
    done = finished_state(resume, params.max_steps)
    if done is not None:  # killed after the last step was saved: resuming would train one more
        print(f"train: {resume} holds all {params.max_steps} steps; not training again")
        model = finished_model(params, model, resume)
    elif resume:
        print(f"train: resuming from {resume}")
    trainer = make_trainer(model, training_arguments(params, ckpt_dir), train_set, callbacks)
    started = time.perf_counter()
    if done is None:
        with inside_flow_run():  # the Trainer's MLflow callback logs the loss curve into the run
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        train_loss, steps = result.training_loss, result.global_step
    else:
        trainer.state.log_history = done["log_history"]
        logged = [row["loss"] for row in done["log_history"] if "loss" in row]
        train_loss, steps = sum(logged) / max(len(logged), 1), done["global_step"]
    seconds = time.perf_counter() - started
    trainer.remove_callback(MLflowCallback)  # it would open a stray run for the evaluation
    trainable, total = lora.parameter_counts(model)
    world = distributed.current_world()
    metrics = {
        "method": params.method,
        "world_size": world,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "train_loss": train_loss,
        "steps": steps,
        "train_seconds": seconds,
        "tokens_seen": steps
        * params.batch_size
        * params.gradient_accumulation_steps
        * world
        * len(train_set[0]["input_ids"]),
    }
    if len(validation):  # every rank scores its share
        metrics["eval_loss"] = trainer.evaluate(eval_dataset=validation)["eval_loss"]
    if not distributed.is_main_process():
        return metrics
    if "eval_loss" in metrics:
        log_to_flow_run(metrics={"eval_loss": metrics["eval_loss"]})
    with atomic_dir(out_dir) as tmp:
        save_model(trainer, params, base_dir, tmp)
        tokenizer.save_pretrained(tmp)
    write_loss_curve(trainer.state.log_history, loss_curve)
    write_json(metrics_file, metrics)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return metrics


def check_inputs(params: TrainParams, base_dir: Path, data_dir: Path) -> None:
    """What would fail later, in one line, before any data or weights are read."""
    lora.check_method(params)
    lora.check_targets(base_dir, params)
    if not (data_dir / "train").is_dir():
        raise UserError(
            f"{data_dir}/train: missing; run the prepare stage first (dvc repro prepare)"
        )


def trainable_model(params: TrainParams, base_dir: Path):
    """What the Trainer trains: the base itself (full) or the base wrapped with LoRA adapters."""
    if params.method == "full":
        return lora.load_base(base_dir)
    model = lora.wrap(lora.load_base(base_dir, four_bit=params.method == "qlora"), params)
    if params.method == "lora" and use_bf16(params.precision):
        lora.frozen_bases_to_bf16(model)  # autocast would cast them every pass
    return model


def finished_model(params: TrainParams, model, checkpoint: Path):
    """The weights a finished checkpoint holds: the whole model, or its adapter loaded onto the
    base inside `model` (the peft model trainable_model built)."""
    if params.method == "full":
        return lora.load_base(checkpoint)
    lora.load_checkpoint_adapter(model, checkpoint)
    return model


def save_model(trainer, params: TrainParams, base_dir: Path, dest: Path) -> None:
    """The trained model as a plain transformers model in `dest`; with adapters, the adapter
    alone in dest/adapter and, beside it, the base with the adapter merged in."""
    if params.method == "full":
        trainer.save_model(str(dest))
        return
    lora.save_adapter(trainer.model, dest / "adapter")
    lora.merge(base_dir, dest / "adapter").save_pretrained(dest)


def finished_state(checkpoint: Path | None, max_steps: int) -> dict | None:
    """The trainer state of a checkpoint that already holds every step (None otherwise). The
    Trainer, resumed from such a checkpoint, would take one step more than max_steps."""
    if checkpoint is None:
        return None
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state if state["global_step"] >= max_steps else None


def write_loss_curve(history: list[dict], path: Path) -> None:
    with atomic_file(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "learning_rate"])
        for row in history:
            if "loss" in row:
                w.writerow([row["step"], row["loss"], row.get("learning_rate", "")])


def main() -> dict:
    args = stage_arguments()
    params = load_params(args.params).train
    if distributed.needs_launch(params):
        distributed.check(params)
        check_inputs(params, args.base_model, args.prepared)  # before any process starts
        return distributed.launch(params, sys.argv[1:])
    if distributed.launched():
        distributed.enter_rank()
    else:
        distributed.share_cpu_threads()
    metrics = train(
        params,
        args.base_model,
        args.prepared,
        args.out,
        args.metrics,
        args.loss_curve,
        args.checkpoints,
    )
    if distributed.is_main_process():
        print("train: " + json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    run_step(main)
