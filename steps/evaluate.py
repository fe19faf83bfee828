"""Perplexity of the base and the fine-tuned model on the same held-out documents, and more.

    python -m steps.evaluate --params params.yaml --base-model models/base \\
        --tuned-model models/tuned \\
        --prepared data/prepared --reference data/reference/general_english.jsonl \\
        --loss-curve metrics/train_loss.csv --metrics metrics/eval.json \\
        --samples metrics/samples.json --figure metrics/evaluation.png \\
        --perplexity-plot metrics/perplexity.csv                     # the DVC stage `evaluate`

Each model is loaded once and, with the same tokenization, window and stride (steps/scoring.py),
scored on
- the held-out test split: corpus perplexity, its 95% bootstrap interval over documents,
  bits per byte;
- a reference set of general text outside the training domain (`evaluate.reference_data`): the
  forgetting guard, i.e. how much worse the tuned model got at ordinary language;
then both complete the same prompts cut from held-out documents (greedy), side by side.
Writes the metrics (a DVC metric), the perplexity bars (a DVC plot), the samples and one figure, and
logs them to the flow's MLflow run when there is one.
"""

from __future__ import annotations

from pathlib import Path

from steps.arguments import stage_arguments
from steps.chat import check_chat_template
from steps.outcome import run_step
from steps.outputs import write_json
from steps.params import EvaluateParams, load_params
from steps.plots import write_figure, write_perplexity_csv
from steps.records import read_texts
from steps.samples import answer_chats, chat_prompts, complete_prompts, sample_prompts
from steps.scoring import (
    Heldout,
    heldout,
    load_metric,
    load_model,
    measurement,
    perplexity,
    score_heldout,
)
from steps.tracking import log_to_flow_run


def evaluate_model(model_dir: Path, held: Heldout, reference, prompts, params) -> dict:
    """Load a model once; score held-out and reference texts and answer the prompts with it."""
    model, tokenizer = load_model(str(model_dir))
    if held.kind == "chat":
        check_chat_template(tokenizer, str(model_dir))
        samples = answer_chats(model, tokenizer, prompts, params.sample_tokens)
    else:
        samples = complete_prompts(model, tokenizer, prompts, params.sample_tokens)
    return {
        "measured": measurement(model, tokenizer, params, held.split_hash, held.kind),
        "heldout": score_heldout(load_metric(held.kind), model, tokenizer, held, params),
        "reference": perplexity(load_metric(), model, tokenizer, reference, params),
        "samples": samples,
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
        "bits_per_byte_ci_high": t["bits_per_byte_ci_high"],
        "base_bits_per_byte": b["bits_per_byte"],
        "tokens": t["tokens"],
        "documents": len(t["perplexities"]),
        "test_split_hash": split_hash,
        "reference_perplexity": rt["perplexity"],
        "base_reference_perplexity": rb["perplexity"],
        "forgetting": rt["perplexity"] / rb["perplexity"] - 1,
        "reference_tokens": rt["tokens"],
        # how these numbers were measured: a champion's stored value is reused only when all match
        "measured": tuned["measured"],
    }


def run(params: EvaluateParams, args) -> dict:
    """Score base and tuned; write metrics, samples, plots; log them to the flow's run."""
    reference = read_texts(args.reference)
    held = heldout(args.prepared)
    split_hash = held.split_hash
    if held.kind == "chat":
        prompts = chat_prompts(held.items, params.samples)
        shown = [p[-1]["content"] for p in prompts]
    else:
        prompts = shown = sample_prompts(held.items, params.samples)
    base = evaluate_model(args.base_model, held, reference, prompts, params)
    print(f"evaluate: base {held.kind} perplexity {base['heldout']['perplexity']:.3f}")
    tuned = evaluate_model(args.tuned_model, held, reference, prompts, params)
    print(f"evaluate: tuned {held.kind} perplexity {tuned['heldout']['perplexity']:.3f}")
    result = compare(base, tuned, split_hash)
    result["scored"] = "responses" if held.kind == "chat" else "documents"
    samples = {"prompt": shown, "base": base["samples"], "tuned": tuned["samples"]}
    write_json(args.metrics, result)
    write_json(args.samples, samples)
    write_perplexity_csv(result, args.perplexity_plot)
    write_figure(result, args.loss_curve, args.figure)
    log_to_flow_run(
        metrics={k: v for k, v in result.items() if isinstance(v, int | float)},
        params={"test_split_hash": split_hash},
        artifacts=[args.figure, args.metrics],
        table=(samples, "samples.json"),
    )
    print(
        f"evaluate: held-out {result['base_perplexity']:.3f} -> {result['perplexity']:.3f}, "
        f"reference {result['base_reference_perplexity']:.3f} -> "
        f"{result['reference_perplexity']:.3f} (forgetting {result['forgetting']:+.1%})"
    )
    return result


def main() -> dict:
    args = stage_arguments()
    return run(load_params(args.params).evaluate, args)


if __name__ == "__main__":
    run_step(main)
