"""benchmarks/evaluate.py on the tiny model: llmpipe, lm_eval and the Hub-style baseline agree,
score the same tokens, and report."""

from __future__ import annotations

import importlib
import json

import pytest

from benchmarks.workloads import SAMPLE_TEXT, load_benchmark

pytestmark = pytest.mark.unit

bench = load_benchmark("evaluate")
rp = importlib.import_module("benchmarks.rolling_perplexity")

TEXTS = [*SAMPLE_TEXT, "Short text.", "Naïve café — a generator suspends at each yield; " * 6]


def test_cut_to_tokens_fits_max_length(tiny_model):
    _, tokenizer = tiny_model
    cut = bench.cut_to_tokens(tokenizer, [*TEXTS, "a"], 12)
    assert len(cut) == len(TEXTS)  # the one-token text is dropped
    for original, text in zip(TEXTS, cut, strict=True):
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        assert 2 <= n <= 12
        assert original.startswith(text[:5])


def test_baseline_matches_llmpipe_per_text(tiny_model_dir):
    metric, model, tokenizer, _ = bench.load_llmpipe(tiny_model_dir, "cpu")
    texts = bench.cut_to_tokens(tokenizer, TEXTS, 24)
    base = bench.hub_style_perplexities(tiny_model_dir, texts, batch_size=3, max_length=24)
    ours = bench.llmpipe_perplexities(metric, model, tokenizer, texts, 24, batch_size=4)
    assert base["tokens"] == ours["text_tokens"]
    assert base["positions"] == len(texts) * max(base["tokens"]) + len(texts)
    assert bench.max_relative_difference(ours["perplexities"], base["perplexities"]) < 1e-5


def test_main_prints_checks(tiny_model_dir, tmp_path, capsys):
    argv = ["--model", str(tiny_model_dir), "--data", str(tmp_path), "--texts", "5"]
    assert bench.main([*argv, "--max-length", "32", "--window", "16", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["benchmark"] == "evaluate"
    assert set(result) == {"benchmark", "checks"}
    goals = {c["name"]: c["goal"] for c in result["checks"]}
    assert goals == {
        "tokens_per_s_vs_lm_eval_varied": ">=1.5",
        "tokens_per_s_vs_lm_eval_equal": ">=1.0",
        "nll_max_relative_difference": "<=1e-4",
        "evaluate_speedup_vs_hub_style": ">=5",
        "per_text_perplexity_max_rel_diff": "<=1e-4",
    }
    ratios = {c["name"]: c["ratio"] for c in result["checks"]}
    assert all(isinstance(r, float) and r > 0 for r in ratios.values())
    assert ratios["nll_max_relative_difference"] < 1e-5
    assert ratios["per_text_perplexity_max_rel_diff"] < 1e-5
    assert any(line.startswith("  speedup:") for line in out)


def test_main_without_model_fails_with_a_hint(tmp_path, capsys):
    assert bench.main(["--model", str(tmp_path / "none"), "--device", "cpu"]) == 1
    assert "dvc repro base_model" in capsys.readouterr().err


# llmpipe vs lm-evaluation-harness -----------------------------------------------------------------

WINDOW = 16  # lm_eval's max_length: the longer texts below span several windows of the tiny model
LONG = [" ".join(SAMPLE_TEXT[:k]) for k in range(1, 6)]  # 14 to 81 tokens


@pytest.fixture(scope="module")
def rolling(tiny_model):
    """(metric, model, tokenizer, lm) with lm_eval's HFLM around the same preloaded tiny model."""
    import evaluate

    model, tokenizer = tiny_model
    metric = evaluate.load(str(bench.METRIC_PATH))
    return metric, model, tokenizer, rp.lm_eval_scorer(model, tokenizer, WINDOW, batch_size=3)


def test_whole_windows_and_equal_length_sets(tiny_model):
    _, tokenizer = tiny_model
    varied = rp.whole_windows(tokenizer, [*LONG, "a"], WINDOW, max_tokens=60)
    counts = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in varied]
    assert counts == [14, 16, 32, 48, 48]  # <= one window whole, longer ones cut to k windows
    equal = rp.equal_length(tokenizer, LONG, 2 * WINDOW, count=2)
    assert [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in equal] == [32, 32]


def test_llmpipe_matches_lm_eval_per_text(rolling):
    metric, model, tokenizer, lm = rolling
    texts = rp.whole_windows(tokenizer, LONG, WINDOW, max_tokens=200)
    counts = rp.check_alignment(lm, tokenizer, texts)
    theirs = rp.lm_eval_rolling(lm, texts)
    ours = rp.llmpipe_rolling(metric, model, tokenizer, lm, texts, batch_size=3)
    assert ours["text_tokens"] == counts  # every token predicted, the first one from the prefix
    assert max(counts) >= 5 * WINDOW  # several windows: the rolling part is exercised
    assert bench.max_relative_difference(ours["text_nlls"], theirs["nlls"]) <= 1e-4
    # lm_eval batches windows in request order: the 14-token one is padded to 16 in its batch
    assert theirs["positions"] == sum(counts) + 2


def test_alignment_is_needed(rolling):
    """Each step of the alignment matters: without the prefix token (lm_eval's first-token term
    left out, and no prefix in llmpipe's contexts), or with a partial last window, the per-text
    NLLs disagree by far more than the tolerance."""
    metric, model, tokenizer, lm = rolling
    texts = rp.whole_windows(tokenizer, LONG, WINDOW, max_tokens=200)
    theirs = rp.lm_eval_rolling(lm, texts)["nlls"]
    no_prefix = metric.compute(
        predictions=texts, model=model, tokenizer=tokenizer, window=WINDOW + 1, stride=WINDOW
    )
    assert bench.max_relative_difference(no_prefix["text_nlls"], theirs) > 1e-2

    uncut = LONG[1:]  # 27 to 81 tokens: each ends with a partial window
    with pytest.raises(ValueError, match="whole number of windows"):
        rp.check_alignment(lm, tokenizer, uncut)
    theirs = rp.lm_eval_rolling(lm, uncut)["nlls"]
    ours = rp.llmpipe_rolling(metric, model, tokenizer, lm, uncut, batch_size=3)["text_nlls"]
    assert bench.max_relative_difference(ours, theirs) > 1e-4
