"""Perplexity of the base and the fine-tuned model on the same held-out documents, and more.

    python -m steps.evaluate          # reads models/base, models/tuned, data/prepared/test

Each model is loaded once and, with the same tokenization, window and stride (the local `evaluate`
metric steps/metrics/corpus_perplexity.py), scored on
- the held-out test split: corpus perplexity, its 95% bootstrap interval over documents, bits per byte;
- a reference set of general text outside the training domain (`evaluate.reference_data`): the
  forgetting guard, i.e. how much worse the tuned model got at ordinary language;
then both complete the same prompts cut from held-out documents (greedy), side by side.
Writes metrics/eval.json (a DVC metric), metrics/perplexity.csv (a DVC plot), metrics/samples.json and
metrics/evaluation.png, and logs them to the flow's MLflow run when there is one.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from steps.errors import UserError, run_main
from steps.outputs import write_json
from steps.params import EvaluateParams, load_params
from steps.paths import (
    BASE_MODEL_DIR,
    EVAL_METRICS,
    FIGURE,
    LOSS_CURVE,
    PERPLEXITY_PLOT,
    PREPARED_DIR,
    SAMPLES,
    TUNED_MODEL_DIR,
)
from steps.tracking import log_table_to_flow_run, log_to_flow_run

METRIC_MODULE = Path(__file__).parent / "metrics" / "corpus_perplexity.py"
PROMPT_CHARS = 160  # characters of a held-out document's opening used as a generation prompt


def load_metric():
    import evaluate

    return evaluate.load(str(METRIC_MODULE))


def heldout_texts(data_dir: Path) -> tuple[list[str], str]:
    from datasets import load_from_disk

    if not (data_dir / "test").is_dir():
        raise UserError(
            f"{data_dir}/test: missing; run the prepare stage first (dvc repro prepare)"
        )
    stats = json.loads((data_dir / "stats.json").read_text())
    return list(load_from_disk(str(data_dir / "test"))["text"]), stats["test_split_hash"]


def score_model(metric, model, texts: list[str], params: EvaluateParams, tokenizer=None) -> dict:
    """Score a model object (with its tokenizer), a directory or a models:/ URI on texts."""
    return metric.compute(
        predictions=texts,
        model=model if tokenizer is not None else str(model),
        tokenizer=tokenizer,
        window=params.window,
        stride=params.stride,
        batch_size=params.batch_size,
    )


def sample_prompts(texts: list[str], n: int) -> list[str]:
    """The openings of the first n held-out documents, cut at a word boundary."""
    prompts = []
    for text in texts[:n]:
        head = text[:PROMPT_CHARS]
        prompts.append(head.rsplit(" ", 1)[0] if len(text) > PROMPT_CHARS and " " in head else head)
    return prompts


def complete_prompts(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy completions, one prompt at a time (no padding, so no padding side to get wrong)."""
    import torch

    device = next(model.parameters()).device
    outputs = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
            new = model.generate(
                **ids,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )[0, ids["input_ids"].shape[1] :]
            outputs.append(tokenizer.decode(new, skip_special_tokens=True))
    return outputs


def evaluate_model(metric, model_dir: Path, texts, reference, prompts, params) -> dict:
    """Load a model once; score held-out and reference texts and complete the prompts with it."""
    from steps.metrics.corpus_perplexity import load_causal_lm

    model, tokenizer = load_causal_lm(str(model_dir))
    return {
        "heldout": score_model(metric, model, texts, params, tokenizer),
        "reference": score_model(metric, model, reference, params, tokenizer),
        "samples": complete_prompts(model, tokenizer, prompts, params.sample_tokens),
    }


def compare(base: dict, tuned: dict, split_hash: str) -> dict:
    b, t = base["heldout"], tuned["heldout"]
    rb, rt = base["reference"], tuned["reference"]
    return {
        "perplexity": t["perplexity"],
        "perplexity_ci_low": t["ci_low"],
        "perplexity_ci_high": t["ci_high"],
        "base_perplexity": b["perplexity"],
        "base_perplexity_ci_low": b["ci_low"],
        "base_perplexity_ci_high": b["ci_high"],
        "improvement": 1 - t["perplexity"] / b["perplexity"],
        "mean_perplexity": t["mean_perplexity"],
        "base_mean_perplexity": b["mean_perplexity"],
        "bits_per_byte": t["bits_per_byte"],
        "base_bits_per_byte": b["bits_per_byte"],
        "tokens": t["tokens"],
        "documents": len(t["perplexities"]),
        "test_split_hash": split_hash,
        "reference_perplexity": rt["perplexity"],
        "base_reference_perplexity": rb["perplexity"],
        "forgetting": rt["perplexity"] / rb["perplexity"] - 1,
        "reference_tokens": rt["tokens"],
    }


def write_plots(result: dict) -> None:
    """Perplexity bars for `dvc plots show`, and one PNG (loss curve + bars) for MLflow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        ("base, held-out", result["base_perplexity"]),
        ("tuned, held-out", result["perplexity"]),
        ("base, reference", result["base_reference_perplexity"]),
        ("tuned, reference", result["reference_perplexity"]),
    ]
    with PERPLEXITY_PLOT.open("w", newline="") as f:
        csv.writer(f).writerows([("model", "perplexity"), *rows])
    fig, (loss_ax, bar_ax) = plt.subplots(1, 2, figsize=(11, 4))
    if LOSS_CURVE.is_file():
        curve = list(csv.DictReader(LOSS_CURVE.open()))
        loss_ax.plot([int(r["step"]) for r in curve], [float(r["loss"]) for r in curve])
    loss_ax.set(title="training loss", xlabel="step", ylabel="cross-entropy (nats/token)")
    bar_ax.barh([r[0] for r in rows], [r[1] for r in rows], color=["#999", "#1f77b4"] * 2)
    bar_ax.set(title="perplexity (lower is better)", xlabel="perplexity")
    bar_ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(FIGURE, dpi=100)
    plt.close(fig)


def main() -> None:
    params = load_params().evaluate
    if params.stride > params.window:
        raise UserError(
            f"evaluate.stride ({params.stride}) must not exceed window ({params.window})"
        )
    from steps.prepare import read_documents

    reference = read_documents(params.reference_data)
    texts, split_hash = heldout_texts(PREPARED_DIR)
    prompts = sample_prompts(texts, params.samples)
    metric = load_metric()
    base = evaluate_model(metric, BASE_MODEL_DIR, texts, reference, prompts, params)
    print(f"evaluate: base perplexity {base['heldout']['perplexity']:.3f}")
    tuned = evaluate_model(metric, TUNED_MODEL_DIR, texts, reference, prompts, params)
    print(f"evaluate: tuned perplexity {tuned['heldout']['perplexity']:.3f}")
    result = compare(base, tuned, split_hash)
    write_json(EVAL_METRICS, result)
    samples = {"prompt": prompts, "base": base["samples"], "tuned": tuned["samples"]}
    write_json(SAMPLES, samples)
    write_plots(result)
    log_to_flow_run(
        metrics={k: v for k, v in result.items() if isinstance(v, int | float)},
        params={"test_split_hash": split_hash},
        artifacts=[FIGURE, EVAL_METRICS],
    )
    log_table_to_flow_run(samples, "samples.json")
    print(
        f"evaluate: held-out {result['base_perplexity']:.3f} -> {result['perplexity']:.3f}, "
        f"reference {result['base_reference_perplexity']:.3f} -> "
        f"{result['reference_perplexity']:.3f} (forgetting {result['forgetting']:+.1%})"
    )


def score_file(
    model: str, input_file: Path, params: EvaluateParams, text_field: str = "text"
) -> dict:
    """`llmpipe perplexity`: score a model directory or models:/ URI on a .txt or .jsonl file."""
    from steps.prepare import read_documents

    if not model.startswith("models:/") and not (Path(model) / "config.json").is_file():
        raise UserError(
            f"--model {model}: no config.json there; give a model directory or models:/NAME@ALIAS"
        )
    if params.stride > params.window:
        raise UserError(f"--stride ({params.stride}) must not exceed --window ({params.window})")
    texts = read_documents(input_file, text_field)
    if model.startswith("models:/"):
        import mlflow

        from steps.tracking import tracking_uri

        mlflow.set_tracking_uri(tracking_uri())
    try:
        result = score_model(load_metric(), model, texts, params)
    except ValueError as err:  # e.g. every text shorter than two tokens
        raise UserError(f"{input_file}: {err}") from None
    return {"model": model, "input": str(input_file), "texts": len(texts), **result}


if __name__ == "__main__":
    run_main(main)
