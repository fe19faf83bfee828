"""Shared fixtures. The environment is made offline and quiet before anything is imported."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("MLFLOW_RUN_ID", None)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tests.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server (temporary SQLite) for the whole session: it takes ~20 s to start."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


PROJECT_FILES = [
    "steps",
    "flows",
    "dvc.yaml",
    "params.yaml",
    ".dvc/config",
    ".gitignore",
    "data/reference",
]


def make_project(dest: Path, params: dict[str, dict]) -> Path:
    """A throwaway copy of the pipeline (a git repo with DVC), with params.yaml keys replaced."""
    import shutil
    import subprocess

    from ruamel.yaml import YAML

    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    rt = YAML()
    doc = rt.load((dest / "params.yaml").read_text())
    for section, values in params.items():
        doc[section].update(values)
    with (dest / "params.yaml").open("w") as f:
        rt.dump(doc, f)
    git = ["git", "-c", "user.email=ci@llmpipe.invalid", "-c", "user.name=ci"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "test project"], cwd=dest, check=True)
    return dest
