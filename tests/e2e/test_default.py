"""The embedded default, for real: SmolLM2-135M-Instruct (GGUF -> safetensors) on CPython's
reference manual, a few training steps through the whole flow, then the held-out perplexity
must drop."""

from __future__ import annotations

import json

import pytest

from benchmarks.workloads import make_project

pytestmark = pytest.mark.e2e


def test_default_pipeline_lowers_heldout_perplexity(tmp_path, monkeypatch, prefect_server):
    from mlflow import MlflowClient

    from flows.finetune import finetune

    # 8 steps of 4 blocks; no checkpoint (a full one is 1.6 GB to write; tests/flows/test_resume.py
    # covers resuming); one sample and one served request (test_chat.py and the flow tests cover
    # more). The held-out split stays the default 15%: at 10% it is 6 documents and 1,486 tokens,
    # too few to score
    project = make_project(
        tmp_path / "project",
        {
            "train": {
                "max_steps": 8,
                "batch_size": 4,
                "gradient_accumulation_steps": 1,
                "save_steps": 100,
            },
            "evaluate": {"samples": 1, "sample_tokens": 16},
            "serve": {"smoke_requests": 1},
        },
    )
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
    # The gate promotes only when the upper end of the tuned interval beats the base model; after a
    # few steps that may or may not hold, and the registry must say exactly what the gate decided.
    gate_passed = (
        metrics["perplexity_ci_high"] < metrics["base_perplexity"] and metrics["forgetting"] <= 0.5
    )
    assert summary["register"]["promote"] is gate_passed, summary["register"]["reasons"]
    version = MlflowClient(uri).get_model_version("llmpipe", summary["register"]["version"])
    assert version.tags["base_model"] == "smollm2-gguf" and "challenger" in version.aliases
    if gate_passed:  # served over HTTP first, then promoted
        assert summary["serve"]["completion"].strip()  # the real model answered
        assert summary["promotion"]["promoted"] and "champion" in version.aliases
    else:
        assert summary["serve"]["skipped"] == "the gate did not pass; nothing to prove"
        assert not summary["promotion"]["promoted"] and "champion" not in version.aliases
