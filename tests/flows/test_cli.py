"""The end-of-run summary a user reads."""

from __future__ import annotations

import pytest

from flows.cli import format_summary

pytestmark = pytest.mark.unit

SUMMARY = {
    "stages": [{"name": "prepare", "skipped": True, "seconds": 5.0},
               {"name": "train", "skipped": False, "seconds": 400.0}],
    "metrics": {"perplexity": 9.6, "base_perplexity": 13.7, "documents": 8, "tokens": 10650,
                "perplexity_ci_low": 8.0, "perplexity_ci_high": 9.9,
                "base_reference_perplexity": 22.7, "reference_perplexity": 25.6,
                "forgetting": 0.129},
    "register": {"model_name": "llmpipe", "version": "4", "new_version": True,
                 "aliases": ["challenger", "champion"], "promote": True,
                 "reasons": ["beats the base model"], "seconds": 20.0},
    "serve": {"model_uri": "models:/llmpipe/4", "prompt": "p", "completion": " done ",
              "p50_ms": 812.4, "p95_ms": 1203.0, "requests": 5, "seconds": 10.0},
    "promotion": {"promoted": True, "seconds": 3.0,
                  "reasons": ["beats the base model", "served 5 completions",
                              "champion moved from 3 to version 4"]},
    "tracking_uri": "sqlite:///mlflow.db",
    "serve_port": 5123,
}  # fmt: skip


def test_summary_reports_time_between_stages_perplexity_and_registry():
    text = format_summary(SUMMARY, 450.0)
    # 450 - (405 + 20 + 10 + 3); not called orchestration: DVC and MLflow work inside the stages
    assert "(12 s = 2.7% between the stages; the rest inside them" in text
    assert "prepare cached · train 400s" in text
    assert "base 13.700 -> tuned 9.600 (-29.9%)" in text
    assert "version 4 (new) aliases: challenger, champion" in text
    assert (
        "promoted to champion: beats the base model; served 5 completions; champion moved" in text
    )
    assert "'p' -> 'done' (p50 812 ms, p95 1203 ms over 5 requests)" in text
    assert "champion on http://127.0.0.1:5123" in text  # serve.port, not a hard-coded port


def test_skipped_run_summary_is_one_line():
    assert format_summary({"skipped": "no new data: x"}, 1.0) == "llmpipe run: no new data: x"
