"""Per-text NLL of llmpipe's metric and of lm-evaluation-harness, aligned to the same tokens.

    from benchmarks.rolling_perplexity import lm_eval_scorer, aligned_texts, ...
    (used by `python benchmarks/evaluate.py`, which prints the comparison)

lm_eval's perplexity tasks call `HFLM.loglikelihood_rolling` with one `Instance` per document
(request type "loglikelihood_rolling", arguments `(text,)`). For a text of n tokens and
`max_length` W it predicts all n tokens, the first one from a prefix token (the tokenizer's BOS,
else EOS), in disjoint windows: the first window is [prefix] + tokens[:W-1] predicting
tokens[:W]; each later one predicts the next W tokens from the one token before them, except the
last partial window, which is right-aligned to W inputs (its targets get up to W - 1 extra tokens
of context).

llmpipe's metric treats a text's first token as context only and starts each window where the
previous one ended. The two are made to score exactly the same tokens with the same contexts by:
1. prefix: llmpipe scores the text with lm_eval's prefix token in front (its string prepended, and
   the ids checked to be [prefix] + lm_eval's ids), so the prefix is llmpipe's context-only first
   token and every token of the text is predicted, the first one from the prefix, as in lm_eval.
   (Subtracting a separately computed first-token term would not align the others: lm_eval's
   contexts all start with the prefix token, and that changes every later logit.)
2. windows: llmpipe's window = W + 1 tokens (W inputs and one more target) and stride = W: the
   windows are then lm_eval's, each later one with exactly one token of context.
3. last window: a text longer than W is cut to a whole number of windows (k x W tokens), so no
   window is partial and lm_eval's right-alignment never applies.
"""

from __future__ import annotations

import time
from typing import Any


def lm_eval_scorer(model: Any, tokenizer: Any, window: int, batch_size: int) -> Any:
    """lm_eval's HFLM around the preloaded model (as lm_eval's users pass a model object):
    max_length = window, a fixed batch size; bf16 autocast on CUDA, as llmpipe's metric does."""
    import torch
    from lm_eval.models.huggingface import HFLM

    cuda = next(model.parameters()).device.type == "cuda"
    return HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        max_length=window,
        mixed_precision_dtype=torch.bfloat16 if cuda else None,
    )


def lm_eval_rolling(lm: Any, texts: list[str]) -> dict[str, Any]:
    """Per-text NLL from `loglikelihood_rolling`, requests built as lm_eval's PerplexityTask
    builds them; returns nlls, seconds (building the requests and scoring) and positions run."""
    from lm_eval.api.instance import Instance

    start = time.perf_counter()
    requests = [
        Instance(
            request_type="loglikelihood_rolling",
            doc={"text": text},
            arguments=(text,),
            idx=0,
            metadata=("llmpipe_heldout", i, 1),
        )
        for i, text in enumerate(texts)
    ]
    loglikelihoods = lm.loglikelihood_rolling(requests)
    seconds = time.perf_counter() - start
    return {
        "nlls": [-ll for ll in loglikelihoods],
        "seconds": seconds,
        "positions": lm_eval_positions(lm, texts),
    }


def lm_eval_positions(lm: Any, texts: list[str]) -> int:
    """Token positions lm_eval runs, padding included: its windows in request order, `batch_size`
    per forward pass, each pass right-padded to its longest window."""
    from lm_eval import utils

    lengths = []
    for text in texts:
        windows = utils.get_rolling_token_windows(
            token_list=lm.tok_encode(text),
            prefix_token=lm.prefix_token_id,
            max_seq_len=lm.max_length,
            context_len=1,
        )
        for context, targets in map(utils.make_disjoint_window, windows):
            lengths.append(min(len(context) + len(targets) - 1, lm.max_length))
    size = lm.batch_size
    return sum(
        max(lengths[i : i + size]) * len(lengths[i : i + size])
        for i in range(0, len(lengths), size)
    )


def llmpipe_rolling(
    metric: Any, model: Any, tokenizer: Any, lm: Any, texts: list[str], batch_size: int
) -> dict[str, Any]:
    """llmpipe's metric through `evaluate`'s compute, as steps.evaluate calls it, on the prefixed
    texts with window = lm_eval's max_length + 1 and stride = max_length (see the module doc)."""
    prefix = tokenizer.decode([lm.prefix_token_id])
    start = time.perf_counter()
    result = metric.compute(
        predictions=[prefix + text for text in texts],
        model=model,
        tokenizer=tokenizer,
        window=lm.max_length + 1,
        stride=lm.max_length,
        batch_size=batch_size,
        precision="fp32",  # lm_eval's HFLM scores in the model's float32
    )
    return {**result, "seconds": time.perf_counter() - start}


def check_alignment(lm: Any, tokenizer: Any, texts: list[str]) -> list[int]:
    """Each text's lm_eval token count, after checking that llmpipe's ids of the prefixed text
    are [prefix] + lm_eval's ids and that no text has a partial last window. Raises ValueError."""
    prefix_id, window = lm.prefix_token_id, lm.max_length
    prefix = tokenizer.decode([prefix_id])
    counts = []
    for i, text in enumerate(texts):
        theirs = lm.tok_encode(text)
        ours = tokenizer(prefix + text, add_special_tokens=False, verbose=False)["input_ids"]
        if ours != [prefix_id, *theirs]:
            raise ValueError(f"text {i}: llmpipe's ids are not [prefix] + lm_eval's ids")
        if len(theirs) > window and len(theirs) % window:
            raise ValueError(f"text {i}: {len(theirs)} tokens, not a whole number of windows")
        counts.append(len(theirs))
    return counts


def text_of(tokenizer: Any, ids: list[int]) -> str | None:
    """The text of `ids`, when it tokenizes back to exactly `ids` (a cut can merge differently)."""
    text = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    again = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return text if again == ids else None


def whole_windows(tokenizer: Any, texts: list[str], window: int, max_tokens: int) -> list[str]:
    """The varied-length set: each text cut to its first max_tokens tokens and, when longer than
    one window, down to a whole number of windows (texts under two tokens dropped)."""
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][:max_tokens]
        k = len(ids) if len(ids) <= window else len(ids) // window * window
        while k >= 2:
            cut = text_of(tokenizer, ids[:k])
            if cut is not None:
                out.append(cut)
                break
            k = k - window if k > window else k - 1
    return out


def equal_length(tokenizer: Any, texts: list[str], n_tokens: int, count: int) -> list[str]:
    """The equal-length set: up to `count` of the texts that have n_tokens tokens or more, each
    cut to exactly n_tokens."""
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        cut = text_of(tokenizer, ids[:n_tokens]) if len(ids) >= n_tokens else None
        if cut is not None:
            out.append(cut)
        if len(out) == count:
            break
    return out
