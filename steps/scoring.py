"""How every model is scored: one loader and one perplexity call for candidate and champion alike.

The evaluate stage scores the base and the tuned model with these; the register step re-scores the
champion with exactly the same functions (same metric module, window, stride, batching, device and
precision), so the promotion gate compares numbers measured the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

from steps.errors import UserError
from steps.params import EvaluateParams

METRIC_MODULE = Path(__file__).parent / "metrics" / "corpus_perplexity.py"


def load_metric():
    """The local `evaluate` metric (loaded by path: the Hub's `perplexity` needs a network)."""
    import evaluate

    return evaluate.load(str(METRIC_MODULE))


def load_model(source: str):
    """(model, tokenizer) from a model directory or an MLflow models:/ URI, on the best device."""
    from steps.metrics.corpus_perplexity import load_causal_lm

    return load_causal_lm(source)


def perplexity(metric, model, tokenizer, texts: list[str], params: EvaluateParams) -> dict:
    """Corpus perplexity (with interval, per-text values and bits per byte) of a loaded model."""
    return metric.compute(
        predictions=texts,
        model=model,
        tokenizer=tokenizer,
        window=params.window,
        stride=params.stride,
        batch_size=params.batch_size,
    )


def heldout_texts(prepared: Path) -> tuple[list[str], str]:
    """The held-out test documents of a prepared data directory, and the split's hash."""
    from datasets import load_from_disk

    if not (prepared / "test").is_dir():
        raise UserError(
            f"{prepared}/test: missing; run the prepare stage first (dvc repro prepare)"
        )
    stats = json.loads((prepared / "stats.json").read_text())
    return list(load_from_disk(str(prepared / "test"))["text"]), stats["test_split_hash"]
