"""A chat data set fine-tuned with LoRA through the whole flow: prepare renders and packs the
conversations, train fits a LoRA adapter and saves the merged model, evaluate scores responses,
register logs a chat model, smoke_serve asks it chat requests through the stock MLflow server."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from benchmarks.workloads import SAMPLE_TEXT, commit_all, make_project

pytestmark = pytest.mark.integration


def chat_file(path: Path, n: int = 120) -> Path:
    """Questions about the tiny tokenizer's sample sentences, answered by them."""
    rng = random.Random(0)
    lines = []
    for i in range(n):
        answer = SAMPLE_TEXT[i % len(SAMPLE_TEXT)]
        subject = answer.split(" ")[1]
        record = {
            "messages": [
                {"role": "system", "content": "Answer in one sentence."},
                {"role": "user", "content": f"What about the {subject} statement? ({i})"},
                {"role": "assistant", "content": answer + " " + rng.choice(["Yes.", "Indeed."])},
            ]
        }
        lines.append(json.dumps(record))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tiny_chat_model_dir, prefect_server):
    from flows.finetune import finetune

    root = tmp_path_factory.mktemp("chat") / "project"
    make_project(
        root,
        {
            "base_model": {"source": str(tiny_chat_model_dir)},
            "prepare": {"data": "data/raw/chat.jsonl", "format": "chat", "block_size": 128},
            "train": {
                "max_steps": 8,
                "learning_rate": 1.0e-2,
                "save_steps": 4,
                "method": "lora",
                "lora_r": 8,
            },
            "evaluate": {"window": 128, "stride": 128, "samples": 2, "sample_tokens": 8},
        },
    )
    chat_file(root / "data/raw/chat.jsonl")
    commit_all(root, "chat data")
    return root, finetune(project_dir=str(root))


def test_a_chat_lora_run_scores_responses_registers_a_chat_model_and_serves_it(chat_run):
    from mlflow import MlflowClient

    root, summary = chat_run
    metrics = json.loads((root / "metrics/eval.json").read_text())
    assert metrics["scored"] == "responses"
    assert metrics["perplexity"] < metrics["base_perplexity"]
    assert metrics["measured"]["stride"] == "responses"
    card = json.loads((root / "metrics/data.json").read_text())
    assert card["format"] == "chat" and card["splits"]["train"]["supervised_tokens"] > 0
    assert card["splits"]["train"]["records"] + card["splits"]["test"]["records"] <= 120
    train = json.loads((root / "metrics/train.json").read_text())
    assert train["method"] == "lora" and train["trainable_parameters"] < train["total_parameters"]
    assert (root / "models/tuned/adapter/adapter_config.json").is_file()
    samples = json.loads((root / "metrics/samples.json").read_text())
    assert len(samples["prompt"]) == 2 and samples["prompt"][0].startswith("What about the")

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    version = client.get_model_version("llmpipe", summary["register"]["version"])
    run = client.get_run(version.run_id)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "adapter" in artifacts and "data.json" in artifacts
    assert run.data.metrics["data.splits.train.supervised_tokens"] == float(
        card["splits"]["train"]["supervised_tokens"]
    )
    assert summary["promotion"]["promoted"], summary["promotion"]
    # served as a chat model, and its answers to the built-in prompt and 3 held-out prompts equal
    # in-process generation
    from steps.serve import registered_task

    assert registered_task(f"sqlite:///{root}/mlflow.db", f"models:/llmpipe/{version.version}") == (
        "llm/v1/chat"
    )
    assert version.tags["serve_parity"].startswith(
        "served answers equal in-process greedy generation for 4 of 4 prompts"
    )
    assert summary["serve"]["parity"]["reference"] == "4 recorded at registration, 0 generated here"
    from flows.report import report_markdown

    report = report_markdown(summary, root)
    assert "## Data card" in report and "held-out test split, responses" in report
