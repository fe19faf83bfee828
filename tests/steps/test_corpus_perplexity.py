"""steps/metrics/corpus_perplexity.py: window plan, scoring against float64 references, evaluate."""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from benchmarks.workloads import REPO, SAMPLE_TEXT

try:
    from steps.metrics import corpus_perplexity as cp
except ImportError:  # steps/metrics may not be a package
    _spec = importlib.util.spec_from_file_location(
        "corpus_perplexity", REPO / "steps" / "metrics" / "corpus_perplexity.py"
    )
    cp = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(cp)

pytestmark = pytest.mark.unit

METRIC_PATH = Path(cp.__file__)

TEXTS = [
    *SAMPLE_TEXT,
    "Short text.",
    "Naïve café — the yield expression suspends a generator function; "
    "the import statement finds and loads a module.",
    "Classes are created by class definitions and instances by calling the class.",
]


# plan_windows ------------------------------------------------------------------------------------


def _check_plan(n, window, stride):
    spans = cp.plan_windows(n, window, stride)
    targets = [t for _, end, first in spans for t in range(first, end)]
    assert targets == list(range(1, n)), (n, window, stride)  # disjoint, in order, exact union
    for k, (begin, end, first) in enumerate(spans):
        assert 0 <= begin < end <= n, (n, window, stride, k)
        assert end - begin <= window, (n, window, stride, k)
        assert first < end, (n, window, stride, k)
        if k == 0:
            assert (begin, first) == (0, 1)
        else:
            assert first == spans[k - 1][1]
            assert begin > spans[k - 1][0]
            if stride < window:
                assert begin == spans[k - 1][0] + stride
    return spans


def test_plan_windows_tiles_targets_exactly_once():
    for n in range(1, 41):
        for window in range(2, 10):
            for stride in range(1, window + 1):
                _check_plan(n, window, stride)


def test_plan_windows_context_when_stride_below_window():
    for n in range(1, 41):
        for window in range(2, 10):
            for stride in range(1, window):
                for k, (begin, end, first) in enumerate(_check_plan(n, window, stride)):
                    for t in range(first, end):
                        assert begin <= t - 1, (n, window, stride, k, t)
                        if k > 0:
                            assert t - begin >= window - stride, (n, window, stride, k, t)


def test_plan_windows_every_target_has_context_when_stride_equals_window():
    for n in range(1, 41):
        for window in range(2, 10):
            for begin, end, first in cp.plan_windows(n, window, window):
                assert all(begin <= t - 1 for t in range(first, end)), (n, window, begin)


def test_plan_windows_examples():
    assert cp.plan_windows(1, 4, 2) == []
    assert cp.plan_windows(4, 4, 2) == [(0, 4, 1)]
    assert cp.plan_windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]


@pytest.mark.parametrize(("window", "stride"), [(4, 5), (4, 0), (2, -1)])
def test_plan_windows_rejects_bad_stride(window, stride):
    with pytest.raises(ValueError, match="stride must be between 1 and window"):
        cp.plan_windows(10, window, stride)


# float64 references ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scorer(tiny_model):
    """(model, tokenizer, ids per text, token_nll(ids, begin, end, targets) in float64)."""
    model, tok = tiny_model
    ref = copy.deepcopy(model).double().eval()

    def window_nll(ids: list[int], begin: int, end: int, targets: range) -> float:
        with torch.no_grad():
            logits = ref(input_ids=torch.tensor([ids[begin:end]])).logits[0]
        logprobs = torch.log_softmax(logits, dim=-1)
        total = 0.0
        for t in targets:
            assert begin <= t - 1 < t < end
            total -= logprobs[t - 1 - begin, ids[t]].item()
        return total

    ids = tok(TEXTS, add_special_tokens=False)["input_ids"]
    assert max(len(x) for x in ids) > 30 and min(len(x) for x in ids) >= 2
    return model, tok, ids, window_nll


def ref_full(ids, window_nll):
    return window_nll(ids, 0, len(ids), range(1, len(ids)))


def ref_sliding(ids, window_nll, window, stride):
    """The transformers perplexity guide: windows of `window` tokens advancing by `stride`; each
    window scores the tokens after the previous window's end."""
    n, total, prev_end = len(ids), 0.0, 1
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        total += window_nll(ids, begin, end, range(max(prev_end, begin + 1), end))
        prev_end = end
        if end == n:
            break
    return total


def ref_chunks(ids, window_nll, window):
    """Non-overlapping chunks of targets; each window is its chunk plus the one token before it."""
    total = 0.0
    for first in range(1, len(ids), window - 1):
        end = min(first + window - 1, len(ids))
        total += window_nll(ids, first - 1, end, range(first, end))
    return total


def assert_matches(result, ref_nlls, ids, rel):
    counts = [len(x) - 1 for x in ids]
    assert result["tokens"] == sum(counts)
    assert result["nll"] == pytest.approx(sum(ref_nlls), rel=rel)
    assert result["perplexity"] == pytest.approx(math.exp(sum(ref_nlls) / sum(counts)), rel=rel)
    expected = [math.exp(v / c) for v, c in zip(ref_nlls, counts, strict=True)]
    assert result["perplexities"] == pytest.approx(expected, rel=rel)
    assert result["mean_perplexity"] == pytest.approx(sum(expected) / len(expected), rel=rel)
    assert result["skipped"] == []


def test_no_sliding_equals_float64_reference(scorer):
    model, tok, ids, window_nll = scorer
    result = cp.score_texts(
        model, tok, TEXTS, window=512, stride=512, batch_size=3, precision="fp32"
    )
    assert_matches(result, [ref_full(x, window_nll) for x in ids], ids, rel=1e-6)


@pytest.mark.parametrize(("window", "stride"), [(16, 4), (16, 15), (7, 2), (24, 12)])
def test_sliding_window_equals_float64_reference(scorer, window, stride):
    model, tok, ids, window_nll = scorer
    result = cp.score_texts(
        model, tok, TEXTS, window=window, stride=stride, batch_size=4, precision="fp32"
    )
    expected = [ref_sliding(x, window_nll, window, stride) for x in ids]
    assert_matches(result, expected, ids, rel=1e-6)


def test_stride_equal_window_equals_nonoverlapping_chunks(scorer):
    model, tok, ids, window_nll = scorer
    result = cp.score_texts(model, tok, TEXTS, window=12, stride=12, batch_size=4, precision="fp32")
    assert_matches(result, [ref_chunks(x, window_nll, 12) for x in ids], ids, rel=1e-6)


def test_references_agree_without_sliding(scorer):
    _, _, ids, window_nll = scorer
    x = ids[0]
    full = ref_full(x, window_nll)
    assert ref_sliding(x, window_nll, len(x), 3) == pytest.approx(full, rel=1e-12)
    assert ref_chunks(x, window_nll, len(x)) == pytest.approx(full, rel=1e-12)


@pytest.mark.parametrize(("window", "stride"), [(512, 512), (16, 5)])
def test_batch_size_does_not_change_results(scorer, window, stride):
    model, tok, _, _ = scorer
    runs = [cp.score_texts(model, tok, TEXTS, window, stride, batch_size=b) for b in (1, 2, 7)]
    for other in runs[1:]:
        # float32 forward passes over differently padded batches agree to ~1e-7, not bitwise
        assert other["nll"] == pytest.approx(runs[0]["nll"], rel=1e-6)
        assert other["perplexities"] == pytest.approx(runs[0]["perplexities"], rel=1e-6)
        assert other["tokens"] == runs[0]["tokens"]


def test_tokens_and_bits_per_byte(scorer):
    model, tok, ids, _ = scorer
    result = cp.score_texts(model, tok, TEXTS, window=16, stride=8, batch_size=4)
    assert result["tokens"] == sum(len(x) - 1 for x in ids)
    total_bytes = sum(len(t.encode("utf-8")) for t in TEXTS)
    assert total_bytes > sum(len(t) for t in TEXTS)  # the non-ASCII text counts in bytes
    assert result["bytes"] == total_bytes
    assert result["bits_per_byte"] == pytest.approx(
        result["nll"] / math.log(2) / total_bytes, rel=1e-12
    )
    assert result["perplexity"] == pytest.approx(
        math.exp(result["nll"] / result["tokens"]), rel=1e-12
    )


def test_too_short_texts_are_skipped(scorer):
    model, tok, ids, window_nll = scorer
    texts = ["", TEXTS[0], "x", TEXTS[1]]
    assert [len(x) for x in tok(texts, add_special_tokens=False)["input_ids"]][::2] == [0, 1]
    result = cp.score_texts(model, tok, texts, window=512, stride=512, precision="fp32")
    assert result["skipped"] == [0, 2]
    assert result["perplexities"][0] is None
    assert result["perplexities"][2] is None
    nlls = [ref_full(ids[0], window_nll), ref_full(ids[1], window_nll)]
    counts = [len(ids[0]) - 1, len(ids[1]) - 1]
    assert result["tokens"] == sum(counts)
    assert result["bytes"] == len(TEXTS[0].encode()) + len(TEXTS[1].encode())
    assert result["perplexity"] == pytest.approx(math.exp(sum(nlls) / sum(counts)), rel=1e-6)
    assert result["perplexities"][1] == pytest.approx(math.exp(nlls[0] / counts[0]), rel=1e-6)


def test_bf16_autocast_scores_within_half_a_percent_of_fp32(tiny_model):
    """precision='bf16' scores under bf16 autocast (different rounding, so not equal) and stays
    within 0.5% of float32; 'auto' is one of the two, as steps/precision.py decides."""
    from steps.precision import bf16_autocast

    model, tok = tiny_model
    fp32 = cp.score_texts(model, tok, TEXTS, window=16, stride=8, precision="fp32")
    bf16 = cp.score_texts(model, tok, TEXTS, window=16, stride=8, precision="bf16")
    auto = cp.score_texts(model, tok, TEXTS, window=16, stride=8)
    assert bf16["nll"] != fp32["nll"]
    assert bf16["perplexity"] == pytest.approx(fp32["perplexity"], rel=5e-3)
    assert auto["nll"] == (bf16 if bf16_autocast("cpu") else fp32)["nll"]


def test_all_too_short_raises(tiny_model):
    model, tok = tiny_model
    with pytest.raises(ValueError, match="no text has two or more tokens"):
        cp.score_texts(model, tok, ["", "x"], window=8, stride=8)


@pytest.mark.parametrize("training", [True, False])
def test_training_flag_is_restored(tiny_model, training):
    model, tok = tiny_model
    model.train(training)
    try:
        cp.score_texts(model, tok, TEXTS[:2], window=8, stride=4)
        assert model.training is training
        assert all(m.training is training for m in model.modules())
    finally:
        model.eval()


# the evaluate-library path ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def metric():
    import evaluate

    return evaluate.load(str(METRIC_PATH))


def test_evaluate_load_with_model_object(metric, tiny_model):
    model, tok = tiny_model
    direct = cp.score_texts(model, tok, TEXTS, window=16, stride=8, batch_size=4)
    via = metric.compute(predictions=TEXTS, model=model, tokenizer=tok, window=16, stride=8)
    assert via["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-9)
    assert via["tokens"] == direct["tokens"]
    assert via["perplexities"] == pytest.approx(direct["perplexities"], rel=1e-9)


def test_evaluate_load_with_model_path(metric, tiny_model, tiny_model_dir):
    model, tok = tiny_model
    direct = cp.score_texts(model, tok, TEXTS, window=16, stride=8, batch_size=4)
    via = metric.compute(predictions=TEXTS, model=str(tiny_model_dir), window=16, stride=8)
    assert via["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-6)
    assert via["tokens"] == direct["tokens"]


def test_evaluate_model_object_needs_tokenizer(metric, tiny_model):
    with pytest.raises(ValueError, match="pass tokenizer="):
        metric.compute(predictions=TEXTS[:1], model=tiny_model[0])


def test_bootstrap_interval_brackets_the_corpus_perplexity_and_is_reproducible():
    import math

    nlls = [30.0, 55.0, 12.0, 80.0, 41.0, 23.0]
    tokens = [10, 20, 6, 25, 15, 9]
    point = math.exp(sum(nlls) / sum(tokens))
    low, high = cp.bootstrap_interval(nlls, tokens, samples=2000, seed=1)
    assert low < point < high
    assert (low, high) == cp.bootstrap_interval(nlls, tokens, samples=2000, seed=1)
    narrow = cp.bootstrap_interval(nlls * 20, tokens * 20, samples=2000, seed=1)
    assert high - low > narrow[1] - narrow[0]  # more documents, tighter interval


def test_bootstrap_interval_of_one_document_is_its_perplexity():
    import math

    low, high = cp.bootstrap_interval([20.0], [10])
    assert low == pytest.approx(math.exp(2.0)) and high == pytest.approx(math.exp(2.0))


def test_score_texts_reports_an_interval_around_the_point(tiny_model):
    model, tok = tiny_model
    texts = [
        f"Sentence number {i} about the while statement and loops." * (1 + i % 3) for i in range(8)
    ]
    out = cp.score_texts(model, tok, texts, window=32, stride=16, batch_size=4)
    assert out["ci_low"] <= out["perplexity"] <= out["ci_high"]
    assert sum(out["text_tokens"]) == out["tokens"]
    assert sum(out["text_nlls"]) == pytest.approx(out["nll"])


def test_token_budget_batches_pack_short_windows_and_isolate_long_ones():
    jobs = [(i, [0] * n, n - 1) for i, n in enumerate([10, 10, 12, 30, 100, 100, 400])]
    batches = cp.token_budget_batches(jobs, budget=400)
    assert [[len(j[1]) for j in b] for b in batches] == [[10, 10, 12, 30], [100, 100], [400]]
    for batch in batches:
        padded = len(batch) * max(len(j[1]) for j in batch)
        assert padded <= 400 or len(batch) == 1
        assert 2 * sum(len(j[1]) for j in batch) >= padded
    assert sorted(j[0] for b in batches for j in b) == list(range(len(jobs)))


def test_chunked_head_path_equals_full_logits_path(tiny_model, monkeypatch):
    model, tok = tiny_model
    assert cp.split_head(model) is not None  # a Llama: backbone + lm_head
    texts = [t * 3 for t in SAMPLE_TEXT]
    monkeypatch.setattr(cp, "LM_HEAD_CHUNK", 7)  # many chunks, uneven tail
    chunked = cp.score_texts(model, tok, texts, window=24, stride=16, batch_size=3)
    monkeypatch.setattr(cp, "split_head", lambda m: None)
    full = cp.score_texts(model, tok, texts, window=24, stride=16, batch_size=3)
    assert chunked["perplexity"] == pytest.approx(full["perplexity"], rel=1e-6)
    assert chunked["perplexities"] == pytest.approx(full["perplexities"], rel=1e-6)
