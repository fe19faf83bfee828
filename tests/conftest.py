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


# With `make test TEST_WORKERS=2` (`-n 2 --dist loadgroup`) each worker builds its own session
# fixtures (in its own temporary directories), and the tests of one xdist_group are meant to run
# on one worker: group "fixed-ports" holds the tests that bind a port the README names (4200, 5000,
# 5001). Measured: the README walk's tests still ran on both workers (their ports collided), so
# `make test` runs in one process by default.


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
    """The tests that share a module-scoped fixture form a group of their module, so that
    fixture (a stack of servers, a run of the flow) is built once, not once per worker."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None or item.get_closest_marker("xdist_group"):
            continue
        if any(defs[-1].scope == "module" for defs in info.name2fixturedefs.values()):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


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
