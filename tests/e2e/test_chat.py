"""Chat fine-tuning for real: SmolLM2-135M-Instruct with LoRA on the embedded questions about the
standard library, a few steps through the whole flow; the held-out response perplexity must drop,
the stock MLflow server must answer an OpenAI-style chat request, and `llmpipe chat` a piped one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.workloads import make_project
from steps.params import EMBEDDED_CHAT

pytestmark = pytest.mark.e2e

LLMPIPE = str(Path(sys.executable).parent / "llmpipe")


def test_chat_lora_lowers_response_perplexity_and_answers_chat(
    tmp_path, monkeypatch, prefect_server
):
    from mlflow import MlflowClient

    from flows.finetune import finetune
    from steps.serve import smoke_serve

    project = make_project(
        tmp_path / "project",
        {
            # 2% held out (~50 conversations) and 6 steps of 4 blocks: a few minutes in all
            "prepare": {"data": EMBEDDED_CHAT, "test_fraction": 0.02},
            "train": {
                "method": "lora",
                "max_steps": 6,
                "batch_size": 4,
                "gradient_accumulation_steps": 1,
                "save_steps": 3,
                "learning_rate": 1.0e-3,
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
    assert metrics["scored"] == "responses" and metrics["documents"] >= 30
    assert 5 < metrics["base_perplexity"] < 60  # SmolLM2 on these answers scores ~19
    assert metrics["perplexity"] < metrics["base_perplexity"]
    card = json.loads((project / "metrics/data.json").read_text())
    assert card["format"] == "chat" and card["splits"]["train"]["records"] > 2000
    assert (project / "models/tuned/adapter/adapter_model.safetensors").is_file()

    # the stock `mlflow models serve` answered OpenAI-style chat requests (smoke_serve posts
    # {"messages": [...]} to it), equal to in-process greedy generation; when the gate held the
    # candidate back nothing was served, so serve it here
    version = summary["register"]["version"]
    report = summary["serve"]
    if not summary["promotion"]["promoted"]:
        report = smoke_serve(f"models:/llmpipe/{version}", uri, 1)
    assert report["task"] == "llm/v1/chat" and report["completion"].strip()
    assert report["parity"]["ok"], report["parity"]
    assert MlflowClient(uri).get_model_version("llmpipe", version).tags["base_model"] == (
        "smollm2-gguf"
    )

    done = subprocess.run(
        [LLMPIPE, "chat", "--model", "models/tuned", "--max-new-tokens", "24"],
        input="What does `json.dumps` do?\n",
        capture_output=True,
        text=True,
        cwd=project,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip()) > 5 and "Traceback" not in done.stderr
