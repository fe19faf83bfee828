"""Perplexity of the base and the fine-tuned model on the same held-out documents.

    python -m steps.evaluate          # reads models/base, models/tuned, data/prepared/test

Both models are scored by the local `evaluate` metric steps/metrics/corpus_perplexity.py with the same
tokenization, window and stride. Writes metrics/eval.json (a DVC metric) and logs it to the flow's
MLflow run when there is one.
"""

from __future__ import annotations

import json
from pathlib import Path

from steps.errors import UserError, run_main
from steps.outputs import write_json
from steps.params import EvaluateParams, load_params
from steps.tracking import log_to_flow_run

BASE_MODEL_DIR = Path("models/base")
TUNED_MODEL_DIR = Path("models/tuned")
DATA_DIR = Path("data/prepared")
METRICS_FILE = Path("metrics/eval.json")
METRIC_MODULE = Path(__file__).parent / "metrics" / "corpus_perplexity.py"


def load_metric():
    import evaluate

    return evaluate.load(str(METRIC_MODULE))


def test_texts(data_dir: Path) -> tuple[list[str], str]:
    from datasets import load_from_disk

    if not (data_dir / "test").is_dir():
        raise UserError(
            f"{data_dir}/test: missing; run the prepare stage first (dvc repro prepare)"
        )
    stats = json.loads((data_dir / "stats.json").read_text())
    return list(load_from_disk(str(data_dir / "test"))["text"]), stats["test_split_hash"]


def score_model(metric, model_dir: Path, texts: list[str], params: EvaluateParams) -> dict:
    """Score one model directory; the metric loads it once for all texts."""
    return metric.compute(
        predictions=texts,
        model=str(model_dir),
        window=params.window,
        stride=params.stride,
        batch_size=params.batch_size,
    )


def compare(base: dict, tuned: dict, split_hash: str) -> dict:
    return {
        "perplexity": tuned["perplexity"],
        "base_perplexity": base["perplexity"],
        "improvement": 1 - tuned["perplexity"] / base["perplexity"],
        "mean_perplexity": tuned["mean_perplexity"],
        "base_mean_perplexity": base["mean_perplexity"],
        "bits_per_byte": tuned["bits_per_byte"],
        "base_bits_per_byte": base["bits_per_byte"],
        "tokens": tuned["tokens"],
        "documents": len(tuned["perplexities"]),
        "test_split_hash": split_hash,
    }


def main() -> None:
    params = load_params().evaluate
    if params.stride > params.window:
        raise UserError(
            f"evaluate.stride ({params.stride}) must not exceed window ({params.window})"
        )
    texts, split_hash = test_texts(DATA_DIR)
    metric = load_metric()
    base = score_model(metric, BASE_MODEL_DIR, texts, params)
    print(f"evaluate: base perplexity {base['perplexity']:.3f} on {base['tokens']} tokens")
    tuned = score_model(metric, TUNED_MODEL_DIR, texts, params)
    print(f"evaluate: tuned perplexity {tuned['perplexity']:.3f}")
    result = compare(base, tuned, split_hash)
    write_json(METRICS_FILE, result)
    log_to_flow_run(
        metrics={k: v for k, v in result.items() if isinstance(v, int | float)},
        params={"test_split_hash": split_hash},
    )


if __name__ == "__main__":
    run_main(main)
