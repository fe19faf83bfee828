"""The embedded default, for real: SmolLM2-135M-Instruct (GGUF -> safetensors) on CPython's reference
manual, a few training steps through the whole flow, then the held-out perplexity must drop."""

from __future__ import annotations

import json

import pytest

from tests.conftest import make_project

pytestmark = pytest.mark.e2e


def test_default_pipeline_lowers_heldout_perplexity(tmp_path, monkeypatch, prefect_server):
    from mlflow import MlflowClient

    from flows.finetune import finetune

    project = make_project(tmp_path / "project", {"train": {"max_steps": 4, "save_steps": 2}})
    uri = f"sqlite:///{project}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    summary = finetune(project_dir=str(project))

    metrics = json.loads((project / "metrics/eval.json").read_text())
    print(json.dumps(metrics, indent=2))
    assert metrics["documents"] >= 5 and metrics["tokens"] > 5000  # the real held-out split
    assert 8 < metrics["base_perplexity"] < 30  # SmolLM2 on the reference manual scores ~15
    assert metrics["perplexity"] < metrics["base_perplexity"]
    base = project / "models/base"
    assert (base / "model.safetensors").is_file() and (base / "chat_template.jinja").is_file()
    config = json.loads((base / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    champion = MlflowClient(uri).get_model_version_by_alias("llmpipe", "champion")
    assert champion.tags["base_model"] == "smollm2-gguf"
    assert summary["serve"]["completion"].strip()
