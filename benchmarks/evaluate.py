"""Evaluation speed of llmpipe's perplexity metric against a Hub-style baseline, side by side.

    python benchmarks/evaluate.py [--quick] [--model DIR] [--data DIR] [--texts N] [--max-length N]
                                  [--batch-size N] [--baseline-batch-size N] [--device cpu|cuda]

Both sides score the same texts, each cut beforehand to its first `--max-length` tokens (so every
text is one window and both sides predict exactly the same tokens, which is checked):
- the baseline follows the algorithm of the Hub's `perplexity` metric, written here from its
  description: load the model and tokenizer inside the call, tokenize every text at once padded to
  the longest, then loop over the texts in input order (one per forward pass by default), float32,
  `torch.no_grad()`; per-text perplexity exp(mean NLL of tokens 1..n-1) (the NLL is taken with the
  vocabulary on the last dimension: the Hub's dim-1 layout is ~1e-4 low in float32 on CPU);
- llmpipe: the model is loaded once beforehand (as steps.evaluate does), then the local `evaluate`
  metric steps/metrics/corpus_perplexity.py is timed through `evaluate`'s `compute` with
  window = stride = max length: windows sorted by length, batched with no padding beyond each batch,
  `torch.inference_mode()`, bf16 autocast on CUDA.
Texts: the held-out test split (`--data`/test, default data/prepared/test) when it exists, topped up
with a fixed sample of CPython's `pydoc_data.topics` (the embedded corpus) to `--texts`.
The model is `--model` (default models/base: `dvc repro base_model` or `make run` makes it).
Prints texts, tokens, seconds and tokens/s per side, the speedup with and without the baseline's
model load, the largest per-text perplexity difference, and ends with one JSON line. Exits non-zero
only when it cannot measure (no model, or the two sides did not score the same tokens).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

METRIC_PATH = REPO / "steps" / "metrics" / "corpus_perplexity.py"
FP32_TOLERANCE = 1e-4  # the goal for per-text perplexities
BF16_TOLERANCE = 2e-2  # llmpipe autocasts to bf16 on CUDA (~3 significant digits per logit)


class MeasureError(Exception):
    """The benchmark could not measure: reported as one line, exit status 1."""


# texts -------------------------------------------------------------------------------------------


def pydoc_topic_texts(n: int, seed: int = 0) -> list[str]:
    """A fixed sample of CPython's reference-manual topics (79 of them, 200 to 60k characters)."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    random.Random(seed).shuffle(names)
    return [topics[name] for name in names[:n]]


def load_texts(data_dir: Path | None, n: int) -> tuple[list[str], str]:
    """Held-out test texts first (when there are any), topped up with pydoc topics to n texts."""
    heldout: list[str] = []
    if data_dir is not None and (data_dir / "test").is_dir():
        from datasets import load_from_disk

        heldout = [t for t in load_from_disk(str(data_dir / "test"))["text"] if t.strip()][:n]
    seen = {t.strip() for t in heldout}
    topics = [t for t in pydoc_topic_texts(200) if t.strip() not in seen][: n - len(heldout)]
    parts = []
    if heldout:
        parts.append(f"{len(heldout)} held-out from {data_dir / 'test'}")
    if topics:
        parts.append(f"{len(topics)} pydoc topics")
    return heldout + topics, " + ".join(parts)


def cut_to_tokens(tokenizer: Any, texts: list[str], max_length: int) -> list[str]:
    """Each text cut to its first max_length tokens, as text that re-tokenizes to <= max_length.

    Decoding a prefix and tokenizing it again can merge differently at the cut, so the prefix is
    shortened until the round trip fits. Texts of fewer than two tokens (nothing to predict) go.
    """
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        k = min(len(ids), max_length)
        while k >= 2:
            cut = (
                text
                if k == len(ids)
                else tokenizer.decode(ids[:k], clean_up_tokenization_spaces=False)
            )
            if (
                len(tokenizer(cut, add_special_tokens=False, verbose=False)["input_ids"])
                <= max_length
            ):
                out.append(cut)
                break
            k -= 1
    return out


# the two sides -----------------------------------------------------------------------------------


def hub_style_perplexities(
    model_path: str | Path,
    texts: list[str],
    batch_size: int = 1,
    max_length: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Per-text perplexities the way the Hub's `perplexity` metric computes them (the baseline).

    Loads the model inside the call, tokenizes all texts at once padded to the longest (no special
    tokens, so the tokens are llmpipe's), then runs the texts in input order, batch_size at a time,
    in float32 under torch.no_grad(); each text's perplexity is exp(mean NLL of its tokens 1..n-1)
    over the attention mask (the NLL taken with classes on the last dimension, see below).
    Returns perplexities, mean_perplexity, tokens (predicted per text), positions (token positions
    run, padding included) and load_seconds.
    """
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    model = AutoModelForCausalLM.from_pretrained(
        str(model_path), use_safetensors=True, dtype=torch.float32
    ).to(device)
    model.eval()
    load_seconds = time.perf_counter() - start

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # positions count from the first token, as in llmpipe
    encoded = tokenizer(
        list(texts),
        add_special_tokens=False,
        padding="longest",
        truncation=max_length is not None,
        max_length=max_length,
        return_attention_mask=True,
        return_tensors="pt",
    )
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    if bool((mask.sum(dim=1) < 2).any()):
        raise ValueError("every text needs two or more tokens to have something to predict")

    perplexities: list[float] = []
    tokens: list[int] = []
    with torch.no_grad():
        for begin in range(0, len(texts), batch_size):
            batch_ids = ids[begin : begin + batch_size].to(device)
            batch_mask = mask[begin : begin + batch_size].to(device)
            logits = model(input_ids=batch_ids, attention_mask=batch_mask).logits.float()
            # Classes on the last dimension: the Hub's code passes logits.transpose(1, 2), and
            # PyTorch's CPU log_softmax over a non-last dimension is off by ~1e-4 nats per token
            # in float32 (always low), which would bias this reference, not measure llmpipe.
            token_nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                batch_ids[:, 1:].reshape(-1),
                reduction="none",
            ).view(len(batch_ids), -1)
            target_mask = batch_mask[:, 1:].double()
            nll = (token_nll.double() * target_mask).sum(dim=1)
            count = target_mask.sum(dim=1)
            perplexities.extend(torch.exp(nll / count).tolist())
            tokens.extend(int(c) for c in count.tolist())
    return {
        "perplexities": perplexities,
        "mean_perplexity": sum(perplexities) / len(perplexities),
        "tokens": tokens,
        "positions": int(ids.numel()),
        "load_seconds": load_seconds,
    }


def load_llmpipe(model_path: str | Path, device: str) -> tuple[Any, Any, Any, float]:
    """The `evaluate` metric, and the model loaded once as steps.evaluate loads it (timed)."""
    import evaluate

    from steps.metrics.corpus_perplexity import load_causal_lm

    metric = evaluate.load(str(METRIC_PATH))
    start = time.perf_counter()
    model, tokenizer = load_causal_lm(str(model_path), device)
    return metric, model, tokenizer, time.perf_counter() - start


def llmpipe_perplexities(
    metric: Any, model: Any, tokenizer: Any, texts: list[str], max_length: int, batch_size: int
) -> dict[str, Any]:
    """llmpipe's metric through `evaluate`: one window per text (window = stride = max_length)."""
    return metric.compute(
        predictions=texts,
        model=model,
        tokenizer=tokenizer,
        window=max_length,
        stride=max_length,
        batch_size=batch_size,
    )


def max_relative_difference(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


# the run -----------------------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Both sides on the same texts; the numbers main() prints."""
    model_dir = Path(args.model)
    metric, model, tokenizer, llmpipe_load = load_llmpipe(model_dir, args.device)
    raw, source = load_texts(Path(args.data) if args.data else None, args.texts)
    texts = cut_to_tokens(tokenizer, raw, args.max_length)
    if not texts:
        raise MeasureError("no text with two or more tokens to score")

    # Untimed warm-up of the process (threads, kernels, evaluate's cache) so neither side pays it.
    llmpipe_perplexities(metric, model, tokenizer, texts[:2], args.max_length, args.batch_size)

    start = time.perf_counter()
    base = hub_style_perplexities(
        model_dir, texts, args.baseline_batch_size, args.max_length, args.device
    )
    base_seconds = time.perf_counter() - start

    start = time.perf_counter()
    ours = llmpipe_perplexities(metric, model, tokenizer, texts, args.max_length, args.batch_size)
    ours_seconds = time.perf_counter() - start

    if base["tokens"] != ours["text_tokens"]:
        pairs = zip(base["tokens"], ours["text_tokens"], strict=False)
        bad = [i for i, (b, o) in enumerate(pairs) if b != o] or ["counts differ"]
        raise MeasureError(
            f"the two sides did not score the same tokens (texts {bad[:5]}, "
            f"baseline {len(base['tokens'])} texts, {sum(base['tokens'])} tokens; "
            f"llmpipe {len(ours['text_tokens'])} texts, {sum(ours['text_tokens'])} tokens)"
        )
    if ours["skipped"]:
        raise MeasureError(f"llmpipe skipped texts {ours['skipped']}")
    return {
        "texts": texts,
        "source": source,
        "base": base,
        "base_seconds": base_seconds,
        "ours": ours,
        "ours_seconds": ours_seconds,
        "llmpipe_load": llmpipe_load,
        "max_rel_diff": max_relative_difference(ours["perplexities"], base["perplexities"]),
    }


def report(args: argparse.Namespace, r: dict[str, Any]) -> dict[str, Any]:
    """Print the human-readable lines; return the JSON line's object."""
    base, ours = r["base"], r["ours"]
    counts = ours["text_tokens"]
    tokens = sum(counts)
    scoring = r["base_seconds"] - base["load_seconds"]
    speedup = r["base_seconds"] / r["ours_seconds"]
    speedup_scoring = scoring / r["ours_seconds"]
    cuda = args.device.startswith("cuda")
    tolerance, goal = (BF16_TOLERANCE, "<=2e-2") if cuda else (FP32_TOLERANCE, "<=1e-4")
    print(
        f"texts: {len(r['texts'])} ({r['source']}), cut to {args.max_length} tokens; "
        f"{tokens:,} tokens predicted (per text min {min(counts)}, "
        f"median {statistics.median(counts):g}, max {max(counts)}); device {args.device}"
    )
    print(
        f"hub-style baseline: {r['base_seconds']:.2f} s = {base['load_seconds']:.2f} s model load "
        f"+ {scoring:.2f} s scoring (batch {args.baseline_batch_size}, every text padded to the "
        f"longest: {base['positions']:,} positions for {tokens:,} tokens); "
        f"{tokens / r['base_seconds']:,.0f} tokens/s ({tokens / scoring:,.0f} excluding the load)"
    )
    print(
        f"llmpipe: {r['ours_seconds']:.2f} s (evaluate compute, batch {args.batch_size}, "
        f"window = stride = {args.max_length}; model loaded once beforehand in "
        f"{r['llmpipe_load']:.2f} s, not timed); {tokens / r['ours_seconds']:,.0f} tokens/s"
    )
    print(
        f"speedup: {speedup:.2f}x including the baseline's model load, {speedup_scoring:.2f}x "
        f"excluding it (goal >=5)"
    )
    precision = "float32 on both sides"
    if cuda:
        precision = (
            "llmpipe autocasts to bf16 on CUDA, the baseline runs float32: checked against "
            f"{BF16_TOLERANCE:g} instead of the issue's {FP32_TOLERANCE:g} (which holds in float32)"
        )
    verdict = "within" if r["max_rel_diff"] <= tolerance else "OVER"
    print(
        f"per-text perplexity: max relative difference {r['max_rel_diff']:.2e} ({verdict} "
        f"{tolerance:g}; {precision}); mean per-text perplexity {ours['mean_perplexity']:.4f} "
        f"(llmpipe) vs {base['mean_perplexity']:.4f} (baseline); corpus perplexity "
        f"{ours['perplexity']:.4f}"
    )
    checks = [
        {"name": "evaluate_speedup_vs_hub_style", "ratio": round(speedup, 3), "goal": ">=5"},
        {
            "name": "per_text_perplexity_max_rel_diff",
            "ratio": float(f"{r['max_rel_diff']:.3e}"),
            "goal": goal,
        },
    ]
    return {"benchmark": "evaluate", "checks": checks}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="texts cut to 2048 tokens")
    parser.add_argument("--model", default=str(REPO / "models" / "base"), help="model directory")
    parser.add_argument(
        "--data", default=str(REPO / "data" / "prepared"), help="prepared data (its test split)"
    )
    parser.add_argument(
        "--texts",
        type=int,
        default=8,
        help="number of texts (default 8: the "
        "held-out split of the embedded corpus, topped up with topics if smaller)",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        help="tokens per text (quick 2048, else 8192: "
        "SmolLM2's context, so held-out documents are scored whole)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="llmpipe windows per pass")
    parser.add_argument(
        "--baseline-batch-size", type=int, default=1, help="baseline texts per pass"
    )
    parser.add_argument("--device", help="cuda when available, else cpu")
    args = parser.parse_args(argv)
    # The pipeline's real workload is the held-out documents as they are (92 to 8871 tokens): the
    # Hub algorithm pads every one to the longest; shorter caps (--max-length) shrink that waste.
    args.max_length = args.max_length or (2048 if args.quick else 8192)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.max_length < 2 or args.texts < 1 or args.batch_size < 1 or args.baseline_batch_size < 1:
        parser.error("--max-length must be >= 2; --texts and the batch sizes >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        print(
            f"error: no model at {model_dir}; make it with `dvc repro base_model` (or `make run`), "
            "or pass --model DIR",
            file=sys.stderr,
        )
        return 1
    try:
        result = measure(args)
    except MeasureError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report(args, result)))
    return 0


if __name__ == "__main__":
    # Run as a script, this file's folder comes first on sys.path, where `import evaluate` would
    # find this file instead of the `evaluate` library.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.exit(main())
