"""How every model is scored: one loader and one perplexity call for candidate and champion alike.

The evaluate stage scores the base and the tuned model with these; the register step re-scores the
champion with exactly the same functions (same metric module, window, stride, batching, device and
precision), so the promotion gate compares numbers measured the same way.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from steps import precision
from steps.errors import UserError
from steps.params import EvaluateParams

METRIC_MODULE = Path(__file__).parent / "metrics" / "corpus_perplexity.py"
RESPONSE_METRIC_MODULE = Path(__file__).parent / "metrics" / "response_perplexity.py"


def load_metric(kind: str = "text"):
    """The local `evaluate` metric (loaded by path: the Hub's `perplexity` needs a network):
    corpus perplexity for text, response perplexity for chat."""
    import evaluate

    return evaluate.load(str(METRIC_MODULE if kind == "text" else RESPONSE_METRIC_MODULE))


@dataclass(frozen=True)
class Heldout:
    """The held-out test split: documents (kind text) or conversations (kind chat)."""

    kind: str
    items: list
    split_hash: str


def score_heldout(metric, model, tokenizer, heldout: Heldout, params: EvaluateParams) -> dict:
    """The held-out split scored the way the model is used: documents with a sliding window,
    conversations on their assistant tokens (metric = load_metric(heldout.kind))."""
    if heldout.kind == "text":
        return perplexity(metric, model, tokenizer, heldout.items, params)
    return metric.compute(
        predictions=[json.dumps(m, ensure_ascii=False) for m in heldout.items],
        model=model,
        tokenizer=tokenizer,
        window=params.window,
        batch_size=params.batch_size,
        precision=params.precision,
    )


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
        precision=params.precision,
    )


# What makes two perplexities comparable: the same texts, cut into the same windows, tokenized the
# same way, computed at the same precision on the same kind of device.
MEASUREMENT_KEYS = ("test_split_hash", "window", "stride", "tokenizer_hash", "precision", "device")


def tokenizer_hash(tokenizer) -> str:
    """A hash of how a tokenizer cuts text into ids (vocabulary, merges, normalisation, added
    tokens), not of incidental settings such as padding or truncation."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        keys = ("model", "normalizer", "pre_tokenizer", "added_tokens")
        text = json.dumps({k: spec.get(k) for k in keys}, sort_keys=True)
    else:  # a slow tokenizer: its vocabulary is what we can see
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def measurement(
    model, tokenizer, params: EvaluateParams, split_hash: str, kind: str = "text"
) -> dict[str, str]:
    """How a perplexity was measured (every key of MEASUREMENT_KEYS, as strings); responses of
    conversations are scored without a sliding window (stride 'responses')."""
    device = next(model.parameters()).device.type
    return {
        "test_split_hash": split_hash,
        "window": str(params.window),
        "stride": str(params.stride) if kind == "text" else "responses",
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "precision": precision.label(device, params.precision),
        "device": device,
    }


def differences(ours: dict[str, str], theirs: dict[str, str]) -> list[str]:
    """The measurement keys on which two records differ ('stride 512 vs 128'); empty = alike."""

    def short(value: str | None) -> str:
        return "unrecorded" if value is None else value[:12]

    return [
        f"{key} {short(theirs.get(key))} vs {short(ours.get(key))}"
        for key in MEASUREMENT_KEYS
        if theirs.get(key) != ours.get(key) or ours.get(key) is None
    ]


def heldout(prepared: Path) -> Heldout:
    """The held-out test split of a prepared data directory, its kind and its hash."""
    from datasets import load_from_disk

    if not (prepared / "test").is_dir():
        raise UserError(
            f"{prepared}/test: missing; run the prepare stage first (dvc repro prepare)"
        )
    stats = json.loads((prepared / "stats.json").read_text())
    test = load_from_disk(str(prepared / "test"))
    kind = stats.get("format", "text")
    items = list(test["text"] if kind == "text" else test["messages"])
    return Heldout(kind, items, stats["test_split_hash"])
