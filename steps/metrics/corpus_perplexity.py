"""Corpus perplexity of a causal LM on texts: a local `evaluate` metric, loaded by path.

    metric = evaluate.load("steps/metrics/corpus_perplexity.py")
    metric.compute(predictions=texts, model=model_or_dir, tokenizer=None, window=512, stride=512)

Why not the Hub's `perplexity`: it cannot load offline, it reloads the model on every call, and it
averages per-text perplexities, which over-weights short texts. Here the headline number is the
corpus perplexity exp(sum of token NLLs / number of predicted tokens); the per-text mean is returned
too, for comparison with the Hub's definition.

Scoring: each text is tokenized without special tokens (the same for every model); its first token
is context only, every later token is predicted exactly once. Texts longer than `window` are scored
with a sliding window that advances by `stride`, so each predicted token sees up to
(window - stride) tokens of earlier context. Windows of all texts are sorted by length and batched
under a token budget (batch_size x window), so short windows share a batch and are never padded to
a long one's length; NLLs are accumulated in float64.
"""

from __future__ import annotations

import math

import datasets
import evaluate
import torch

from steps.precision import bf16_autocast

_DESCRIPTION = "Corpus perplexity exp(sum NLL / predicted tokens) with a sliding window."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list[str]): the texts to score.
    model: a transformers causal LM object, a model directory, or an MLflow `models:/` URI
        (a path or URI is loaded once per metric object and reused by later calls).
    tokenizer: the tokenizer (loaded from `model` when it is a path and this is None).
    window (int): tokens per forward pass. stride (int): tokens a window advances (<= window).
    batch_size (int): windows per forward pass.
    precision (str): 'auto' (bf16 autocast where the device multiplies bf16 natively: a CUDA GPU
        that supports it, a CPU with AVX512-BF16 or AMX; fp32 elsewhere), 'fp32' or 'bf16'.
Returns: perplexity, ci_low, ci_high (95% bootstrap over texts), mean_perplexity, perplexities,
    nll, tokens, bytes, bits_per_byte (and its interval: bits_per_byte_ci_low/high), skipped,
    text_nlls, text_tokens.
"""


def plan_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) per window; targets [first_target, end) tile 1..n-1 exactly."""
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be between 1 and window ({window}), got {stride}")
    spans, prev_end, begin = [], 1, 0
    while prev_end < n_tokens:
        end = min(begin + window, n_tokens)
        spans.append((begin, end, prev_end))
        # A window needs one token of context before its first target, hence the end - 1 cap
        # (it only binds when stride == window: non-overlapping chunks, each token scored once).
        prev_end, begin = end, min(begin + stride, end - 1)
    return spans


LM_HEAD_CHUNK = 1024  # positions per lm_head matmul: bounds the [chunk, vocab] float32 logits


def split_head(model):
    """(backbone, lm_head) when logits are exactly lm_head(last hidden state), else None.

    Scoring through them computes logits only for predicted positions, a chunk at a time, instead
    of a [batch, length, vocab] tensor (3 GB for 8 x 2048 tokens of a 49k vocabulary).
    """
    config = model.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    head = model.get_output_embeddings()
    backbone = getattr(model, "base_model", None)
    if head is None or backbone is None or backbone is model:
        return None
    return backbone, head


def target_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] per row, in float32, returned as float64. Overwrites `logits`
    (a chunk of the head's output, used once): the log-sum-exp is computed in place, where
    torch.logsumexp allocates another [positions, vocab] tensor (~5% of the head's time here)."""
    logits = logits.float()
    picked = logits.gather(-1, targets[:, None]).squeeze(-1)
    top = logits.amax(-1, keepdim=True)
    lse = logits.sub_(top).exp_().sum(-1).log_() + top.squeeze(-1)
    return (lse - picked).double()


def window_nll(
    model, batch: list[list[int]], n_targets: list[int], pad_id: int, precision: str = "auto"
) -> list[float]:
    """Sum of NLL over the last n_targets tokens of each (right-padded) sequence in the batch."""
    pairs = zip(batch, n_targets, strict=True)
    positions = [range(len(seq) - 1 - n, len(seq) - 1) for seq, n in pairs]
    return positions_nll(model, batch, positions, pad_id, precision)


def positions_nll(
    model, batch: list[list[int]], positions, pad_id: int, precision: str = "auto"
) -> list[float]:
    """Sum of NLL of each (right-padded) sequence's tokens p + 1 for p in its `positions`."""
    device = next(model.parameters()).device
    width = max(len(ids) for ids in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    rows, cols = [], []  # (row, position) of each prediction; position p predicts token p + 1
    for row, (seq, where) in enumerate(zip(batch, positions, strict=True)):
        ids[row, : len(seq)] = torch.tensor(seq)
        rows += [row] * len(where)
        cols += where
    ids = ids.to(device)
    # No attention mask: the padding is on the right and attention is causal, so no position read
    # here sees a pad token, and positions count from 0 in every row either way. Without a mask the
    # attention runs its causal kernel (is_causal) instead of a materialised [batch, 1, n, n] mask.
    rows_t, cols_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
    targets = ids[rows_t, cols_t + 1]
    # The last column is only ever a target (position p predicts p + 1 <= width - 1): the model
    # runs on the others. A window of W + 1 tokens then costs a forward pass over W positions.
    ids = ids[:, :-1]
    parts = split_head(model)
    bf16 = bf16_autocast(device.type, precision)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        if parts is None:
            logits = model(input_ids=ids).logits[rows_t, cols_t]
            nll = target_nll(logits, targets)
        else:
            backbone, head = parts
            hidden = backbone(input_ids=ids).last_hidden_state[rows_t, cols_t]
            nll = torch.cat(
                [
                    target_nll(head(hidden[k : k + LM_HEAD_CHUNK]), targets[k : k + LM_HEAD_CHUNK])
                    for k in range(0, len(targets), LM_HEAD_CHUNK)
                ]
            )
    sums = torch.zeros(len(batch), dtype=torch.float64, device=device)
    sums.index_add_(0, rows_t, nll)
    return sums.tolist()


def nll_sums(
    model, tokenizer, jobs: list, n: int, budget: int, precision: str = "auto"
) -> list[float]:
    """Each of `n` items' sum of NLL over its jobs (item index, ids, positions predicting a
    target), scored length-sorted in batches under a token budget, in inference mode."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nll = [0.0] * n
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for chunk in token_budget_batches(sorted(jobs, key=lambda job: len(job[1])), budget):
            batch, where = [j[1] for j in chunk], [j[2] for j in chunk]
            sums = positions_nll(model, batch, where, pad_id, precision)
            for (i, _, _), s in zip(chunk, sums, strict=True):
                nll[i] += s
    model.train(was_training)
    return nll


def token_budget_batches(jobs: list, budget: int) -> list[list]:
    """Cut length-sorted jobs into batches whose padded size (count x longest) stays within budget
    and is at least half real tokens.

    `batch_size` full windows fit in a batch; shorter windows pack proportionally more, and a long
    window never drags a batch of short ones up to its length.
    """
    batches: list[list] = []
    real = 0
    for job in jobs:
        padded = (len(batches[-1]) + 1) * len(job[1]) if batches else 0
        if batches and padded <= budget and 2 * (real + len(job[1])) >= padded:
            batches[-1].append(job)
            real += len(job[1])
        else:
            batches.append([job])
            real = len(job[1])
    return batches


def score_texts(
    model, tokenizer, texts, window=512, stride=512, batch_size=4, precision="auto"
) -> dict:
    ids_per_text = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    jobs = []  # (text index, window ids, positions whose next token is a target)
    for i, ids in enumerate(ids_per_text):
        for begin, end, first in plan_windows(len(ids), window, stride):
            jobs.append((i, ids[begin:end], range(first - begin - 1, end - begin - 1)))
    budget = batch_size * window
    nll = nll_sums(model, tokenizer, jobs, len(ids_per_text), budget, precision)
    counts = [max(len(ids) - 1, 0) for ids in ids_per_text]
    if not any(counts):
        raise ValueError("no text has two or more tokens; nothing can be scored")
    return summarize(nll, counts, [len(text.encode("utf-8")) for text in texts])


def summarize(nll: list[float], counts: list[int], text_bytes: list[int]) -> dict:
    """Corpus perplexity, its bootstrap interval over texts, and bits per byte, from each text's
    NLL sum, predicted tokens and bytes (texts with no predicted token are skipped)."""
    scored = [i for i, c in enumerate(counts) if c > 0]
    total_nll = sum(nll[i] for i in scored)
    total_tokens = sum(counts[i] for i in scored)
    per_text = [math.exp(nll[i] / counts[i]) if counts[i] else None for i in range(len(counts))]
    low, high = bootstrap_interval([nll[i] for i in scored], [counts[i] for i in scored])
    # the same resampled documents (same seed) per byte: exp(nats/byte), then bits per byte
    bpb = bootstrap_interval([nll[i] for i in scored], [text_bytes[i] for i in scored])
    total_bytes = sum(text_bytes[i] for i in scored)
    return {
        "perplexity": math.exp(total_nll / total_tokens),
        "ci_low": low,
        "ci_high": high,
        "mean_perplexity": sum(per_text[i] for i in scored) / len(scored),
        "perplexities": per_text,
        "nll": total_nll,
        "tokens": total_tokens,
        "bytes": total_bytes,
        "bits_per_byte": total_nll / math.log(2) / total_bytes,
        "bits_per_byte_ci_low": math.log2(bpb[0]),
        "bits_per_byte_ci_high": math.log2(bpb[1]),
        "skipped": [i for i, c in enumerate(counts) if c == 0],
        "text_nlls": nll,
        "text_tokens": counts,
    }


def bootstrap_interval(
    nlls: list[float],
    tokens: list[int],
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap over documents of the corpus perplexity exp(sum NLL / sum tokens).

    Documents, not tokens, are resampled: tokens within a document are not independent, and a
    held-out split is a sample of documents. With one document the interval is that point.
    """
    import numpy as np

    nll, n = np.asarray(nlls, dtype=np.float64), np.asarray(tokens, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(nll), size=(samples, len(nll)))
    ppl = np.exp(nll[idx].sum(axis=1) / n[idx].sum(axis=1))
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(ppl, [tail, 100 - tail])
    return float(low), float(high)


def load_causal_lm(path: str, device: str | None = None):
    """A model directory (safetensors only) or an MLflow `models:/name@alias` URI, on `device`."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if path.startswith("models:/"):
        import mlflow

        parts = mlflow.transformers.load_model(path, return_type="components")
        return parts["model"].to(device), parts["tokenizer"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).to(device)
    return model, AutoTokenizer.from_pretrained(path)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CorpusPerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(
        self,
        predictions,
        model,
        tokenizer=None,
        window=512,
        stride=512,
        batch_size=4,
        precision="auto",
    ):
        if isinstance(model, str):
            cache = self.__dict__.setdefault("_loaded", {})
            if model not in cache:
                cache[model] = load_causal_lm(model)
            model, loaded_tokenizer = cache[model]
            tokenizer = tokenizer or loaded_tokenizer
        if tokenizer is None:
            raise ValueError("pass tokenizer= with a model object")
        return score_texts(model, tokenizer, predictions, window, stride, batch_size, precision)
