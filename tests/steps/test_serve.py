"""steps/serve.py: the completion client against a real HTTP server."""

from __future__ import annotations

import pytest

from steps.serve import complete

pytestmark = pytest.mark.unit


CHOICES = {"choices": [{"text": "hi", "index": 0}, {"text": "other"}]}


@pytest.mark.parametrize(
    "answer", [CHOICES, [CHOICES], {"predictions": [CHOICES]}], ids=["dict", "list", "predictions"]
)
def test_complete_against_a_real_server(completion_server, answer):
    url, state = completion_server
    state["answer"] = answer
    assert complete(url, "In Python, the for statement", max_tokens=7) == "hi"
    assert state["requests"] == [
        {
            "path": "/invocations",
            "type": "application/json",
            "body": {"prompt": "In Python, the for statement", "max_tokens": 7},
        }
    ]


def test_percentile_is_nearest_rank():
    from steps.serve import percentile

    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 0.5) == 3.0
    assert percentile(values, 0.95) == 5.0  # ceil(0.95 * 5) = 5th of 5
    assert percentile(values, 0.2) == 1.0
    assert percentile([7.0], 0.95) == 7.0


def test_the_latency_budget_holds_back_a_slow_candidate():
    from steps.serve import within_budget

    report = {"requests": 5, "p50_ms": 80.0, "p95_ms": 120.4}
    assert within_budget(report, None) == (True, "served 5 completions, p95 120 ms (no budget)")
    assert within_budget(report, 150) == (True, "served 5 completions, p95 120 ms <= 150")
    ok, why = within_budget(report, 100)
    assert not ok and why == "too slow: p95 120 ms > serve.max_p95_ms 100"
