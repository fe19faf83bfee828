"""benchmarks/evaluate.py on the tiny model: both sides agree, score the same tokens, and report."""

from __future__ import annotations

import importlib.util
import json

import pytest

from benchmarks.workloads import REPO, SAMPLE_TEXT

pytestmark = pytest.mark.unit

_spec = importlib.util.spec_from_file_location(
    "benchmark_evaluate", REPO / "benchmarks" / "evaluate.py"
)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

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
    assert bench.main([*argv, "--max-length", "32", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["benchmark"] == "evaluate"
    checks = {c["name"]: c for c in result["checks"]}
    assert checks["evaluate_speedup_vs_hub_style"]["goal"] == ">=5"
    assert checks["evaluate_speedup_vs_hub_style"]["ratio"] > 0
    assert checks["per_text_perplexity_max_rel_diff"]["ratio"] < 1e-5
    assert any(line.startswith("speedup:") for line in out)


def test_main_without_model_fails_with_a_hint(tmp_path, capsys):
    assert bench.main(["--model", str(tmp_path / "none"), "--device", "cpu"]) == 1
    assert "dvc repro base_model" in capsys.readouterr().err
