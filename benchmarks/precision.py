"""bf16 autocast against float32: training speed and quality, scoring speed and agreement.

    python benchmarks/precision.py [--quick] [--model DIR] [--steps N]

`precision: auto` (steps/precision.py) trains and scores under bf16 autocast where the device
multiplies bf16 natively (a CUDA GPU that supports it; a CPU with AVX512-BF16 or AMX) and in
float32 elsewhere. This measures what that choice buys and costs on this machine, side by side in
one invocation, the float32 run being the baseline:
- training: `python -m steps.train` (the DVC stage's own command, each run its own process) on the
  same prepared blocks of the embedded corpus (CPython's reference manual, prepared by
  steps.prepare with the default params), the default hyper-parameters, `train.precision: fp32`
  against `auto`. Tokens per second of the Trainer's training loop (the stage's `train_seconds`:
  model loading outside it, on both sides). Neither run writes a mid-run checkpoint
  (`save_steps` above the step count): the checkpoint's cost is the same file either way.
- quality: both tuned models' held-out loss (mean NLL per token of the test split, scored in
  float32 by steps.scoring, so only the training precision differs), compared as
  max(a/b, b/a); goal: within 1%.
- scoring: the base model's held-out perplexity through steps.scoring (the evaluate stage's
  call) in `evaluate.precision: fp32` against `auto`, the model loaded once beforehand for both:
  tokens per second, and the relative difference of the two perplexities (goal: within 0.5%).
On a machine where `auto` is float32 both sides run the same arithmetic: the speed checks then
fail (about 1.0x), which is the truth about such a machine. `--quick` trains 6 steps (the loss
check still holds there: both runs start from the same model and follow the same schedule).
Ends with one JSON line; exits 1 only when it could not measure.
"""

from __future__ import annotations

import argparse
import json
import math
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
    "train_tokens_per_s_auto_vs_fp32": ">=1.3",
    "heldout_loss_ratio": "<=1.01",
    "score_tokens_per_s_auto_vs_fp32": ">=1.3",
    "perplexity_relative_difference": "<=0.005",
}


def prepare_data(model_dir: Path, work: Path) -> Path:
    """The embedded corpus, prepared as the prepare stage prepares it (default params)."""
    from steps import corpus, prepare
    from steps.params import PrepareParams

    raw = work / "pydoc_topics.jsonl"
    corpus.run(raw)
    out = work / "prepared"
    prepare.run(PrepareParams(data=str(raw)), raw, model_dir, out, work / "data.json")
    return out


def train_run(precision: str, steps: int, model_dir: Path, data: Path, work: Path) -> dict:
    """`python -m steps.train` with the default params but these; its metrics."""
    import yaml

    from steps.environment import quiet_offline_env

    run = work / f"train-{precision}"
    run.mkdir()
    train = {"max_steps": steps, "precision": precision, "save_steps": steps + 1}
    (run / "params.yaml").write_text(yaml.safe_dump({"train": train}))
    cmd = [sys.executable, "-m", "steps.train", "--params", str(run / "params.yaml")]
    cmd += ["--base-model", str(model_dir), "--prepared", str(data)]
    cmd += ["--checkpoints", str(run / "ckpt"), "--out", str(run / "model")]
    cmd += ["--metrics", str(run / "train.json"), "--loss-curve", str(run / "loss.csv")]
    done = subprocess.run(cmd, cwd=REPO, env=quiet_offline_env(), capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        raise MeasureError(f"training in {precision} failed (exit {done.returncode}):\n{tail}")
    return {**json.loads((run / "train.json").read_text()), "model": run / "model"}


def score(model_dir: Path, data: Path, precision: str) -> dict:
    """The held-out split's perplexity through steps.scoring (model loaded before the timer)."""
    from steps.params import EvaluateParams
    from steps.scoring import heldout, load_metric, load_model, score_heldout

    held = heldout(data)
    metric = load_metric(held.kind)
    model, tokenizer = load_model(str(model_dir))
    params = EvaluateParams(precision=precision)
    score_heldout(metric, model, tokenizer, type(held)(held.kind, held.items[:1], ""), params)
    start = time.perf_counter()
    result = score_heldout(metric, model, tokenizer, held, params)
    return {**result, "seconds": time.perf_counter() - start}


def ratio_checks(train: dict, quality: dict, scored: dict) -> dict[str, float]:
    def rate(r: dict) -> float:
        return r["tokens_seen"] / r["train_seconds"]

    loss = {p: math.log(q["perplexity"]) for p, q in quality.items()}
    return {
        "train_tokens_per_s_auto_vs_fp32": rate(train["auto"]) / rate(train["fp32"]),
        "heldout_loss_ratio": max(loss["auto"] / loss["fp32"], loss["fp32"] / loss["auto"]),
        "score_tokens_per_s_auto_vs_fp32": scored["fp32"]["seconds"] / scored["auto"]["seconds"],
        "perplexity_relative_difference": abs(
            scored["auto"]["perplexity"] / scored["fp32"]["perplexity"] - 1
        ),
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    from benchmarks.train import resolve_model
    from steps import precision
    from steps.environment import quiet_offline_env

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 training steps instead of 40")
    parser.add_argument("--model", help="model directory (default: the embedded SmolLM2-135M)")
    parser.add_argument("--steps", type=int, help="training steps per run (40, quick 6)")
    args = parser.parse_args(argv)
    steps = args.steps or (6 if args.quick else 40)
    import os

    os.environ.update(quiet_offline_env())
    os.environ.pop("MLFLOW_RUN_ID", None)  # never log a benchmark into a flow's run
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model_dir = resolve_model(args.model)
        with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
            work = Path(tmp)
            data = prepare_data(model_dir, work)
            train = {p: train_run(p, steps, model_dir, data, work) for p in ("fp32", "auto")}
            quality = {p: score(train[p]["model"], data, "fp32") for p in train}
            scored = {p: score(model_dir, data, p) for p in ("fp32", "auto")}
    except MeasureError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    auto = precision.label(device)
    print(
        f"device {device}; `auto` here is {auto} (native bf16 on the CPU: "
        f"{precision.cpu_has_native_bf16()}); model {model_dir}; {torch.get_num_threads()} threads"
    )
    for p, r in train.items():
        print(
            f"train {p:>4}: {r['steps']} steps, {r['tokens_seen']:,} tokens in "
            f"{r['train_seconds']:.1f} s = {r['tokens_seen'] / r['train_seconds']:.1f} tokens/s; "
            f"train loss {r['train_loss']:.4f}; held-out perplexity (scored in fp32) "
            f"{quality[p]['perplexity']:.4f}"
        )
    for p, r in scored.items():
        print(
            f"score {p:>4}: base model, {r['tokens']:,} held-out tokens in {r['seconds']:.1f} s = "
            f"{r['tokens'] / r['seconds']:.1f} tokens/s; perplexity {r['perplexity']:.5f}"
        )
    ratios = ratio_checks(train, quality, scored)
    print_checks("precision", ratios, GOALS)
    return 0


if __name__ == "__main__":
    from benchmarks.workloads import run_benchmark

    run_benchmark(main)
