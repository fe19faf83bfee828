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
    "register": {"model_name": "llmpipe", "version": "3", "new_version": False,
                 "aliases": ["challenger", "champion"], "promote": False,
                 "reasons": ["version 3 is already the champion"], "seconds": 20.0},
    "serve": {"model_uri": "models:/llmpipe@champion", "prompt": "p", "completion": " done ",
              "seconds": 10.0},
    "tracking_uri": "sqlite:///mlflow.db",
    "serve_port": 5123,
}  # fmt: skip


def test_summary_reports_orchestration_share_perplexity_and_registry():
    text = format_summary(SUMMARY, 450.0)
    assert "orchestration 15 s = 3.3%" in text  # 450 - (405 + 20 + 10)
    assert "prepare cached · train 400s" in text
    assert "base 13.700 -> tuned 9.600 (-29.9%)" in text
    assert "version 3 (already registered; nothing new)" in text
    assert "not promoted: version 3 is already the champion" in text
    assert "'p' -> 'done'" in text
    assert "champion on http://127.0.0.1:5123" in text  # serve.port, not a hard-coded port


def test_skipped_run_summary_is_one_line():
    assert format_summary({"skipped": "no new data: x"}, 1.0) == "llmpipe run: no new data: x"
