"""`llmpipe perplexity`: score any model directory or models:/ URI on any .txt or .jsonl file.

    llmpipe perplexity --model models/base --input notes.txt [--window 512 --stride 256] [--json]
                       [--precision auto|fp32|bf16]

The same scoring as the evaluate stage (steps/scoring.py), on the user's own file.
"""

from __future__ import annotations

from pathlib import Path

from steps.errors import UserError
from steps.params import EvaluateParams
from steps.precision import label
from steps.records import read_texts
from steps.scoring import load_metric, load_model, perplexity


def score_file(
    model: str, input_file: Path, params: EvaluateParams, project: Path, text_field: str = "text"
) -> dict:
    """Perplexity of `model` (a directory, or models:/ in `project`'s registry) on the documents
    of `input_file`."""
    if not model.startswith("models:/") and not (Path(model) / "config.json").is_file():
        raise UserError(
            f"--model {model}: no config.json there; give a model directory or models:/NAME@ALIAS"
        )
    texts = read_texts(input_file, text_field)
    if model.startswith("models:/"):
        import mlflow

        from steps.tracking import tracking_uri

        mlflow.set_tracking_uri(tracking_uri(project))
    loaded, tokenizer = load_model(model)
    try:
        result = perplexity(load_metric(), loaded, tokenizer, texts, params)
    except ValueError as err:  # e.g. every text shorter than two tokens
        raise UserError(f"{input_file}: {err}") from None
    computed = label(next(loaded.parameters()).device.type, params.precision)
    return {"model": model, "input": str(input_file), "texts": len(texts), **result} | {
        "precision": computed
    }
