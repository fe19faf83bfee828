"""Shared fixtures. The environment is made offline and quiet before anything is imported."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("MLFLOW_RUN_ID", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)  # each test project uses its own mlflow.db
# A suite started in the background by a non-interactive shell (`make test &`, nohup) inherits
# SIGINT ignored, and so would every process it starts: the Ctrl-C tests would then see servers
# survive a Ctrl-C that a terminal delivers. Python's own handler here; children get the default.
signal.signal(signal.SIGINT, signal.default_int_handler)


# `make test` runs two pytest-xdist workers with --dist loadfile: each test file on one worker, so
# a module's fixtures (a stack of servers, the README walk and its fixed ports 4200, 5000, 5001)
# are built once; session fixtures (the tiny model, the Prefect server, the golden project) once
# per worker. (--dist loadgroup's xdist_group marks do nothing under pytest 9: xdist 3.8 renames
# an attribute pytest no longer reads, and the walk ran on both workers.)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from benchmarks.workloads import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory) -> Path:
    """The tiny Llama with ChatML turn tokens and a chat template (EOS = <|im_end|>)."""
    from benchmarks.workloads import build_tiny_chat_model

    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat") / "model")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def text_project(tmp_path_factory, tiny_model_dir):
    """A project with the tiny model as `base` and 60 documents prepared into blocks of 32."""
    import json
    import random

    from transformers import AutoTokenizer

    from benchmarks.workloads import SAMPLE_TEXT
    from steps.params import PrepareParams
    from steps.prepare import prepare

    root = tmp_path_factory.mktemp("ddp")
    rng = random.Random(0)
    corpus = root / "corpus.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"text": f"{i}: " + " ".join(rng.sample(SAMPLE_TEXT, 2))}) + "\n"
            for i in range(60)
        )
    )
    prep = PrepareParams(block_size=32, test_fraction=0.2, validation_fraction=0.1)
    prepare(prep, corpus, AutoTokenizer.from_pretrained(tiny_model_dir), root / "prepared")
    (root / "base").symlink_to(tiny_model_dir)
    return root


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server (temporary SQLite) for the whole session: it takes ~20 s to start.
    Yields its API URL, for the `llmpipe run` subprocesses of a test to use (PREFECT_API_URL)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


@pytest.fixture(autouse=True)
def no_leaked_tracking_uri():
    """mlflow.set_tracking_uri() also exports MLFLOW_TRACKING_URI to child processes: undo it after
    each test, so one test's registry never becomes the next test's default."""
    yield
    import sys

    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
