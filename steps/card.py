"""A model version's card: what it is, what it was trained on, how good, how measured, and why the
gate decided what it did. Stored as the version's description in the MLflow registry (shown on the
version's page), rendered here from the version's tags and the evaluate metrics.

    model_card(tags, metrics, decision_reasons, passed)  ->  markdown text
"""

from __future__ import annotations

import json


def model_card(tags: dict[str, str], metrics: dict, reasons: list[str], passed: bool) -> str:
    params = json.loads(tags.get("params", "{}"))
    train, prepare = params.get("train", {}), params.get("prepare", {})
    m = metrics
    measured = m["measured"]
    lines = [
        f"Fine-tuned from `{tags.get('base_model', '?')}` "
        f"(weights md5 `{tags.get('base_model_hash', '?')}`) on `{tags.get('data_path', '?')}` "
        f"(md5 `{tags.get('data_hash', '?')}`).",
        "",
        "**Training**: "
        + ", ".join(
            f"{k} {train[k]}"
            for k in ("max_steps", "learning_rate", "batch_size", "precision", "seed")
            if k in train
        )
        + f"; block size {prepare.get('block_size', '?')} tokens.",
        "",
        f"**Held-out perplexity** {m['perplexity']:.3f} "
        f"(95% interval {m['perplexity_ci_low']:.3f}-{m['perplexity_ci_high']:.3f}) "
        f"against the base model's {m['base_perplexity']:.3f}, on {m['documents']} documents, "
        f"{m['tokens']} tokens; {m['bits_per_byte']:.4f} bits per byte "
        f"(base {m['base_bits_per_byte']:.4f}).",
        f"**General reference text** perplexity {m['base_reference_perplexity']:.3f} -> "
        f"{m['reference_perplexity']:.3f} ({m['forgetting']:+.1%}).",
        "",
        f"**How measured**: test split `{measured['test_split_hash'][:12]}`, window "
        f"{measured['window']}, stride {measured['stride']}, tokenizer "
        f"`{measured['tokenizer_hash']}`, {measured['precision']} on {measured['device']}.",
        "",
        f"**Gate**: {'passed' if passed else 'not passed'}: " + "; ".join(reasons) + ".",
        "",
        f"**Lineage**: git `{tags.get('git_sha', '?')[:12]}`, MLflow run "
        f"`{tags.get('mlflow_run_id', '?')}`, Prefect flow run "
        f"`{tags.get('prefect_flow_run_id') or '-'}`, model md5 `{tags.get('model_hash', '?')}`.",
    ]
    return "\n".join(lines)
