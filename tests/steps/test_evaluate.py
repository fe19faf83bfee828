"""The evaluate step's pieces: prompts, greedy samples, the comparison, its plots, and the
`llmpipe perplexity` backend."""

from __future__ import annotations

import csv

import pytest

from steps.evaluate import compare
from steps.perplexity import score_file
from steps.plots import write_figure, write_perplexity_csv
from steps.samples import PROMPT_CHARS, complete_prompts, sample_prompts

pytestmark = pytest.mark.unit


def fake_scores(ppl: float, ref: float) -> dict:
    heldout = {"perplexity": ppl, "ci_low": ppl - 1, "ci_high": ppl + 1, "mean_perplexity": ppl + 2,
               "bits_per_byte": 1.0, "bits_per_byte_ci_high": 1.1, "tokens": 100,
               "perplexities": [ppl] * 4}  # fmt: skip
    measured = {"test_split_hash": "abc", "window": "64", "stride": "64"}
    return {"heldout": heldout, "reference": {"perplexity": ref, "tokens": 50}, "samples": [],
            "measured": measured}  # fmt: skip


def test_sample_prompts_cut_openings_at_a_word_boundary():
    long = "word " * 100
    prompts = sample_prompts([long, "short text", "third"], 2)
    assert len(prompts) == 2
    assert len(prompts[0]) <= PROMPT_CHARS and not prompts[0].endswith("wor")
    assert long.startswith(prompts[0])
    assert prompts[1] == "short text"
    assert sample_prompts(["a b"], 0) == []


def test_complete_prompts_is_greedy_and_deterministic(tiny_model):
    model, tok = tiny_model
    prompts = ["The for statement", "A function definition"]
    first = complete_prompts(model, tok, prompts, max_new_tokens=6)
    again = complete_prompts(model, tok, prompts, max_new_tokens=6)
    assert first == again and len(first) == 2
    ids = tok(prompts[0], return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
    assert first[0] == tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_compare_reports_improvement_and_forgetting():
    result = compare(fake_scores(20.0, 10.0), fake_scores(15.0, 12.0), "abc")
    assert result["improvement"] == pytest.approx(0.25)
    assert result["forgetting"] == pytest.approx(0.2)
    assert result["perplexity_ci_high"] == 16.0 and result["base_perplexity"] == 20.0
    assert result["test_split_hash"] == "abc" and result["documents"] == 4
    assert result["measured"]["stride"] == "64" and result["bits_per_byte_ci_high"] == 1.1


def test_plots_write_the_bars_and_a_png(tmp_path):
    loss = tmp_path / "loss.csv"
    loss.write_text("step,loss,learning_rate\n1,3.0,0\n2,2.5,1e-4\n")
    result = compare(fake_scores(20.0, 10.0), fake_scores(15.0, 12.0), "abc")
    write_perplexity_csv(result, tmp_path / "out" / "perplexity.csv")
    write_figure(result, loss, tmp_path / "out" / "evaluation.png")
    rows = list(csv.DictReader((tmp_path / "out" / "perplexity.csv").open()))
    assert [(r["model"], float(r["perplexity"])) for r in rows] == [
        ("base, held-out", 20.0), ("tuned, held-out", 15.0),
        ("base, reference", 10.0), ("tuned, reference", 12.0),
    ]  # fmt: skip
    assert (tmp_path / "out" / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "evaluation.png",
        "perplexity.csv",
    ]  # no temporary files left behind


def test_score_file_rejects_a_directory_without_a_model(tmp_path):
    from steps.errors import UserError
    from steps.params import EvaluateParams

    (tmp_path / "t.txt").write_text("hello there\n")
    with pytest.raises(UserError, match=r"no config\.json"):
        score_file(str(tmp_path), tmp_path / "t.txt", EvaluateParams(), tmp_path)


def test_score_file_scores_a_text_file(tmp_path, tiny_model_dir):
    from steps.params import EvaluateParams

    (tmp_path / "t.txt").write_text("The for statement iterates.\n\nA while loop repeats.\n")
    params = EvaluateParams(window=8, stride=4)
    out = score_file(str(tiny_model_dir), tmp_path / "t.txt", params, tmp_path)
    assert out["texts"] == 2 and out["tokens"] > 0
    assert out["ci_low"] <= out["perplexity"] <= out["ci_high"]
