"""Fixtures of the integration tier: the golden project, run once per session and never changed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchmarks.workloads import make_project


@pytest.fixture(scope="session")
def golden(tmp_path_factory, tiny_model_dir, prefect_server) -> tuple[Path, dict]:
    """A project after one full run (stages, register, smoke-serve): (directory, summary)."""
    from flows.finetune import finetune

    root = make_project(
        tmp_path_factory.mktemp("golden") / "project",
        {
            "base_model": {"source": str(tiny_model_dir)},
            "prepare": {"block_size": 32},
            "train": {"max_steps": 8, "learning_rate": 3.0e-3, "save_steps": 4},
            "evaluate": {"window": 64, "stride": 32, "batch_size": 8},
        },
    )
    return root, finetune(project_dir=str(root))


@pytest.fixture
def project(golden, tmp_path) -> Path:
    """A private copy of the golden project (git, DVC cache, mlflow.db) for a test to change."""
    return Path(shutil.copytree(golden[0], tmp_path / "project", symlinks=True))


@pytest.fixture
def first_run(golden) -> dict:
    return golden[1]
