"""Promotion after proof: a candidate that passes the gate but misses the latency budget, or was not
served, stays challenger; the champion never moves before the candidate has served."""

from __future__ import annotations

import pytest

from steps.registry import alias_version, champion_version

pytestmark = pytest.mark.integration


def test_a_candidate_over_the_latency_budget_is_not_promoted(project, prefect_server):
    """The golden project's model, as a candidate with no champion yet (its stages all cached):
    it passes the gate against the base model, then misses a latency budget no model can meet."""
    from mlflow import MlflowClient

    from flows.finetune import finetune

    uri = f"sqlite:///{project}/mlflow.db"
    MlflowClient(uri).delete_registered_model_alias("llmpipe", "champion")
    budget = ["serve.max_p95_ms=0.001", "serve.smoke_requests=2"]  # no model answers in 1 us
    summary = finetune(project_dir=str(project), overrides=budget)
    assert [s["name"] for s in summary["stages"] if not s["skipped"]] == ["model_source"]
    assert summary["register"]["promote"] is True  # the gate passed (first model vs the base)
    assert summary["promotion"]["promoted"] is False
    assert summary["promotion"]["reasons"][-1].startswith("too slow: p95 ")
    assert champion_version(uri, "llmpipe") is None
    challenger = alias_version(MlflowClient(uri), "llmpipe", "challenger")
    assert str(challenger.version) == summary["register"]["version"]
    assert (
        # at least one request per prompt: the built-in one and 3 held-out ones
        float(challenger.tags["serve_p95_ms"]) > 0.001 and challenger.tags["serve_requests"] == "4"
    )

    unchecked = finetune(project_dir=str(project), overrides=budget, serve_check=False)
    assert unchecked["promotion"] == {
        "promoted": False,
        "reasons": [*unchecked["register"]["reasons"],
                    "not promoted without the serving check (--no-serve-check)"],
    }  # fmt: skip
    assert champion_version(uri, "llmpipe") is None
