"""Training speed: steps.train against a plain PyTorch loop, and what its checkpoints cost.

    python benchmarks/loop.py [--quick] [--model DIR] [--steps N] [--save-steps N]

Side by side on this machine, each arm in its own process, model loading outside both timers:
the same model (default: the embedded SmolLM2-135M-Instruct), the same blocks (the embedded
corpus prepared by steps.prepare with the default params: 256-token text blocks), the default
hyper-parameters of params.yaml's train section (2 blocks per forward pass, 4 accumulated per
step, AdamW at 3e-4 with cosine decay after a 10% warm-up, no weight decay, gradients clipped at
norm 1.0 as the Trainer clips them), the same precision (`train.precision: auto`: bf16 autocast
where the device multiplies bf16 natively, float32 elsewhere), fused AdamW (the Trainer's default
optimizer here, `torch.optim.AdamW(fused=True)` in the loop), and checkpoints every `save_steps`
steps (default 20, params.yaml's) holding what a resume needs: weights, optimizer, scheduler.
- llmpipe: steps.train.train(), the train stage's own function, as `dvc repro` runs it; timed:
  its Trainer's training loop (the stage's `train_seconds`), checkpoint saves included. A
  callback also times each save: from the end of the step to the Trainer's `on_save`.
- plain loop: a DataLoader over the same blocks (shuffled, seed 42), `model(input_ids=...,
  labels=...).loss` (transformers' stock causal-LM loss, as such a loop is written), backward,
  clip, step, scheduler, zero_grad; `torch.save` of the model, optimizer and scheduler state
  every `save_steps` steps (the previous one deleted, like the Trainer's save_total_limit=1).
Checks:
- train_tokens_per_s_vs_plain_loop: llmpipe tokens/s over the loop's (goal >= 0.95);
- checkpoint_share_at_default_interval: the share of llmpipe's training time its saves take when
  saving every 20 steps of a 40-step run (params.yaml's defaults), from the measured seconds per
  save and per step (goal <= 0.10). The full run (40 steps, saves at 20 and 40) measures that
  directly; `--quick` (8 steps, saves at 4 and 8) projects it from the same two figures.
Ends with one JSON line; exits 1 only when it could not measure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.workloads import MeasureError, print_checks  # noqa: E402  (after the path)

GOALS = {
    "train_tokens_per_s_vs_plain_loop": ">=0.95",
    "checkpoint_share_at_default_interval": "<=0.1",
}


def save_clock(saves: list[float]):
    """A TrainerCallback that appends the seconds of each checkpoint save to `saves`."""
    from transformers import TrainerCallback

    class SaveClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            self.step_end = time.perf_counter()

        def on_save(self, args, state, control, **kwargs):
            saves.append(time.perf_counter() - self.step_end)

    return SaveClock()


def llmpipe_arm(spec: dict) -> dict:
    from benchmarks.workloads import train_in
    from steps.params import TrainParams

    saves: list[float] = []
    params = TrainParams(max_steps=spec["steps"], save_steps=spec["save_steps"])
    model, data = Path(spec["model"]), Path(spec["data"])
    metrics = train_in(Path(spec["work"]), params, model, data, [save_clock(saves)])
    return {
        "seconds": metrics["train_seconds"],
        "tokens": metrics["tokens_seen"],
        "steps": metrics["steps"],
        "saves": saves,
        "train_loss": metrics["train_loss"],
    }


def plain_loop_arm(spec: dict) -> dict:
    import torch
    from datasets import load_from_disk
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

    from steps.params import TrainParams
    from steps.precision import training_bf16

    p = TrainParams()  # the defaults llmpipe's arm trains with
    torch.manual_seed(p.seed)
    work, steps, every = Path(spec["work"]), spec["steps"], spec["save_steps"]
    blocks = load_from_disk(str(Path(spec["data"]) / "train")).with_format("torch")
    model = AutoModelForCausalLM.from_pretrained(spec["model"], use_safetensors=True)
    model.train()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    bf16 = training_bf16(p.precision)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=p.learning_rate, weight_decay=p.weight_decay, fused=True
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(p.warmup_ratio * steps), steps)
    loader = DataLoader(
        blocks,
        batch_size=p.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(p.seed),
        drop_last=True,
    )
    batches = iter(loader)
    saves, losses, tokens = [], [], 0
    start = time.perf_counter()
    for step in range(1, steps + 1):
        for _ in range(p.gradient_accumulation_steps):
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            ids = batch["input_ids"].to(device, torch.long)  # stored as int32
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=ids, labels=ids).loss / p.gradient_accumulation_steps
            loss.backward()
            tokens += ids.numel()
            losses.append(float(loss) * p.gradient_accumulation_steps)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % every == 0:
            saved = time.perf_counter()
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
            }
            torch.save(state, work / f"checkpoint-{step}.pt")
            if step > every:
                (work / f"checkpoint-{step - every}.pt").unlink()
            saves.append(time.perf_counter() - saved)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "tokens": tokens,
        "steps": steps,
        "saves": saves,
        "train_loss": sum(losses) / len(losses),
    }


def child(arm: str, spec: dict) -> dict:
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))  # as steps.train's main() sets it
    result = llmpipe_arm(spec) if arm == "llmpipe" else plain_loop_arm(spec)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def run_arm(arm: str, spec: dict, work: Path) -> dict:
    from steps.environment import quiet_offline_env

    work.mkdir(parents=True)
    (work / "spec.json").write_text(json.dumps({**spec, "work": str(work)}))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--arm", arm]
    cmd += ["--spec", str(work / "spec.json"), "--result", str(work / "result.json")]
    env = quiet_offline_env()
    env.pop("MLFLOW_RUN_ID", None)  # never log a benchmark into a flow's run
    print(f"training the {arm} arm ...", flush=True)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not (work / "result.json").is_file():
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
        raise MeasureError(f"the {arm} arm failed (exit {done.returncode}):\n{tail}")
    return json.loads((work / "result.json").read_text())


def checkpoint_share(r: dict, steps: int, save_steps: int) -> float:
    """Share of a `steps`-step run's training time that saving every `save_steps` steps takes,
    from the arm's measured seconds per save and per step (without saves)."""
    per_save = sum(r["saves"]) / len(r["saves"])
    per_step = (r["seconds"] - sum(r["saves"])) / r["steps"]
    saving = (steps // save_steps) * per_save
    return saving / (steps * per_step + saving)


def main(argv: list[str] | None = None) -> int:
    import torch

    from benchmarks.precision import prepare_data
    from benchmarks.train import resolve_model
    from steps import precision
    from steps.environment import quiet_offline_env
    from steps.params import TrainParams

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 steps, a save every 4")
    parser.add_argument("--model", help="model directory (default: the embedded SmolLM2-135M)")
    parser.add_argument("--steps", type=int, help="optimizer steps per arm (40, quick 8)")
    parser.add_argument("--save-steps", type=int, help="steps between saves (20, quick 4)")
    parser.add_argument("--arm", choices=("llmpipe", "plain-loop"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.arm:
        result = child(args.arm, json.loads(args.spec.read_text()))
        args.result.write_text(json.dumps(result))
        return 0
    default = TrainParams()
    steps = args.steps or (8 if args.quick else default.max_steps)
    save_steps = args.save_steps or (4 if args.quick else default.save_steps)
    if steps < save_steps:
        parser.error(f"--steps ({steps}) must be at least --save-steps ({save_steps})")
    os.environ.update(quiet_offline_env())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model_dir = resolve_model(args.model)
        with tempfile.TemporaryDirectory(prefix="bench-loop-") as tmp:
            work = Path(tmp)
            data = prepare_data(model_dir, work)
            spec = {"model": str(model_dir), "data": str(data), "steps": steps}
            spec["save_steps"] = save_steps
            results = {arm: run_arm(arm, spec, work / arm) for arm in ("llmpipe", "plain-loop")}
            shutil.rmtree(work / "plain-loop", ignore_errors=True)
    except MeasureError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"device {device}, {precision.label(device)} (train.precision auto); model {model_dir}; "
        f"{torch.get_num_threads()} threads; {steps} steps of {default.batch_size} x "
        f"{default.gradient_accumulation_steps} blocks of 256, a checkpoint every {save_steps}"
    )
    for arm, r in results.items():
        saves = ", ".join(f"{s:.1f}" for s in r["saves"])
        print(
            f"{arm}: {r['tokens']:,} tokens in {r['seconds']:.1f} s = "
            f"{r['tokens'] / r['seconds']:.1f} tokens/s, saves included ({saves} s); "
            f"train loss {r['train_loss']:.4f}; peak RSS {r['peak_rss_gib']:.2f} GiB; "
            f"checkpoints at the default interval: "
            f"{checkpoint_share(r, default.max_steps, default.save_steps):.1%} of training"
        )
    ours, loop = results["llmpipe"], results["plain-loop"]
    ratios = {
        "train_tokens_per_s_vs_plain_loop": (ours["tokens"] / ours["seconds"])
        / (loop["tokens"] / loop["seconds"]),
        "checkpoint_share_at_default_interval": checkpoint_share(
            ours, default.max_steps, default.save_steps
        ),
    }
    print_checks("loop", ratios, GOALS)
    return 0


if __name__ == "__main__":
    from benchmarks.workloads import run_benchmark

    run_benchmark(main)
