"""Promotion after proof: a candidate that passes the gate but misses the latency budget, or was not
served, stays challenger; the champion never moves before the candidate has served."""

from __future__ import annotations

import pytest

from benchmarks.workloads import make_project, tiny_params
from steps.registry import alias_version, champion_version

pytestmark = pytest.mark.integration


def test_a_candidate_over_the_latency_budget_is_not_promoted(
    tmp_path, tiny_model_dir, prefect_server
):
    from mlflow import MlflowClient

    from flows.finetune import finetune

    params = tiny_params(tiny_model_dir, learning_rate=3e-3)
    params["serve"] = {"max_p95_ms": 0.001, "smoke_requests": 2}  # no model answers in 1 us
    project = make_project(tmp_path / "project", params)
    summary = finetune(project_dir=str(project))
    uri = f"sqlite:///{project}/mlflow.db"
    assert summary["register"]["promote"] is True  # the gate passed (first model vs the base)
    assert summary["promotion"]["promoted"] is False
    assert summary["promotion"]["reasons"][-1].startswith("too slow: p95 ")
    assert champion_version(uri, "llmpipe") is None
    challenger = alias_version(MlflowClient(uri), "llmpipe", "challenger")
    assert str(challenger.version) == summary["register"]["version"]
    assert (
        float(challenger.tags["serve_p95_ms"]) > 0.001 and challenger.tags["serve_requests"] == "2"
    )

    unchecked = finetune(project_dir=str(project), serve_check=False)  # cached: same candidate
    assert unchecked["promotion"] == {
        "promoted": False,
        "reasons": [*unchecked["register"]["reasons"],
                    "not promoted without the serving check (--no-serve-check)"],
    }  # fmt: skip
    assert champion_version(uri, "llmpipe") is None
