"""`llmpipe sweep`: every combination tracked, workspace ends on the best, only it may promote."""

from __future__ import annotations

import pytest
import yaml

from benchmarks.workloads import make_project, tiny_params

pytestmark = pytest.mark.integration


def test_expand_grid_is_the_cartesian_product():
    from flows.sweep import expand_grid

    grid = expand_grid(["train.learning_rate=1e-3, 3e-3", "train.max_steps=4"])
    assert grid == [
        ["train.learning_rate=1e-3", "train.max_steps=4"],
        ["train.learning_rate=3e-3", "train.max_steps=4"],
    ]
    from steps.errors import UserError

    with pytest.raises(UserError, match="comma-separated"):
        expand_grid(["train.max_steps="])


def test_sweep_registers_every_run_and_promotes_only_the_best(
    tmp_path, monkeypatch, prefect_server, tiny_model_dir
):
    from mlflow import MlflowClient

    from flows.sweep import sweep

    project = make_project(tmp_path / "project", tiny_params(tiny_model_dir))
    uri = f"sqlite:///{project}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = sweep(project_dir=str(project), grid=["train.learning_rate=5e-3,1e-5"])

    assert [r["overrides"] for r in result["runs"]] == [
        ["train.learning_rate=5e-3"],
        ["train.learning_rate=1e-5"],
    ]
    best = min(result["runs"], key=lambda r: r["perplexity"])
    assert result["best"] == best and best["overrides"] == ["train.learning_rate=5e-3"]
    client = MlflowClient(uri)
    champion = client.get_model_version_by_alias("llmpipe", "champion")
    assert str(champion.version) == best["version"]  # the best, and no other, became champion
    assert {str(v.version) for v in client.search_model_versions("name='llmpipe'")} == {
        r["version"] for r in result["runs"]
    }  # the final run re-registered nothing
    final_stages = {s["name"]: s["skipped"] for s in result["final"]["stages"]}
    # the best run was not the last: DVC's run cache restored its model instead of retraining
    assert final_stages["train"] is True
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["train"]["learning_rate"] == 5e-3
    experiment = client.get_experiment_by_name("llmpipe").experiment_id
    tagged = client.search_runs([experiment], f"tags.sweep = '{result['sweep_id']}'")
    assert len(tagged) == 3
