"""Response perplexity of a chat model on held-out conversations: a local `evaluate` metric.

    metric = evaluate.load("steps/metrics/response_perplexity.py")
    metric.compute(predictions=[json.dumps(messages), ...], model=model, tokenizer=tokenizer,
                   window=512, batch_size=4)

A chat model is used by giving it a conversation and letting it answer, so it is scored the same
way: each held-out conversation is rendered with the model's own chat template (steps/chat.py) and
only the assistant's tokens (each turn's text and its end-of-turn token) are predicted, given
everything before them; system and user turns are context, never scored. A conversation longer than
`window` tokens is cut to its first `window` tokens (its scored tokens and bytes are counted after
the cut). Bits per byte divide the same NLL by the UTF-8 bytes of the scored assistant text, which
lets models with different tokenizers be compared. The interval is the corpus perplexity's
bootstrap over conversations (steps/metrics/corpus_perplexity.py).
"""

from __future__ import annotations

import json

import datasets
import evaluate

from steps.chat import IGNORE, render
from steps.metrics.corpus_perplexity import nll_sums, summarize

_DESCRIPTION = "Perplexity of the assistant's tokens of conversations, given their prompts."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list[str]): conversations, each a JSON list of {"role", "content"} turns.
    model: a transformers causal LM object. tokenizer: its tokenizer (with a chat template).
    window (int): the most tokens of a conversation scored (the rest is cut).
    batch_size (int): full windows per forward pass (shorter conversations pack more).
    precision (str): 'auto', 'fp32' or 'bf16', as corpus_perplexity's.
Returns: what corpus_perplexity returns (perplexity, ci_low, ci_high, bits_per_byte, ...), with
    tokens = scored assistant tokens, bytes = their UTF-8 bytes, and truncated = conversations cut.
"""


def score_conversations(
    model, tokenizer, conversations, window=512, batch_size=4, precision="auto"
) -> dict:
    jobs = []  # (conversation index, ids, positions predicting an assistant token)
    counts, text_bytes, truncated = [], [], 0
    for i, messages in enumerate(conversations):
        ids, labels = render(messages, tokenizer)
        if len(ids) > window:
            ids, labels, truncated = ids[:window], labels[:window], truncated + 1
        where = [p for p in range(len(ids) - 1) if labels[p + 1] != IGNORE]
        scored = [ids[p + 1] for p in where]
        counts.append(len(where))
        text_bytes.append(len(tokenizer.decode(scored, skip_special_tokens=True).encode("utf-8")))
        if where:
            jobs.append((i, ids, where))
    if not jobs:
        raise ValueError("no conversation has an assistant token to score")
    budget = batch_size * window
    nll = nll_sums(model, tokenizer, jobs, len(conversations), budget, precision)
    # an end-of-turn token alone has no bytes: count one so bits per byte stay finite
    result = summarize(nll, counts, [max(b, 1) for b in text_bytes])
    result["truncated"] = truncated
    return result


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ResponsePerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, model, tokenizer, window=512, batch_size=4, precision="auto"):
        conversations = [json.loads(p) for p in predictions]
        return score_conversations(model, tokenizer, conversations, window, batch_size, precision)
