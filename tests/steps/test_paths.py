"""dvc.yaml and steps/paths.py name the same files: one fact, checked rather than owned twice."""

from __future__ import annotations

import pytest
import yaml

from steps import paths
from tests.conftest import REPO

pytestmark = pytest.mark.unit


def stage_files(stage: dict, key: str) -> set[str]:
    return {next(iter(e)) if isinstance(e, dict) else e for e in stage.get(key, [])}


def test_dvc_yaml_outs_and_deps_match_steps_paths():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    outs = {name: stage_files(s, "outs") | stage_files(s, "metrics") | stage_files(s, "plots")
            for name, s in stages.items()}  # fmt: skip
    assert outs["corpus"] == {str(paths.EMBEDDED_CORPUS)}
    assert outs["base_model"] == {str(paths.BASE_MODEL_DIR)}
    assert outs["prepare"] == {str(paths.PREPARED_DIR)}
    assert outs["train"] == {
        str(p) for p in (paths.TUNED_MODEL_DIR, paths.TRAIN_METRICS, paths.LOSS_CURVE)
    }
    assert outs["evaluate"] == {
        str(p) for p in (paths.EVAL_METRICS, paths.SAMPLES, paths.FIGURE, paths.PERPLEXITY_PLOT)
    }
    deps = {name: stage_files(s, "deps") for name, s in stages.items()}
    assert {str(paths.BASE_MODEL_DIR)} <= deps["prepare"]
    assert {str(paths.BASE_MODEL_DIR), str(paths.PREPARED_DIR)} <= deps["train"]
    assert {str(paths.BASE_MODEL_DIR), str(paths.TUNED_MODEL_DIR), str(paths.PREPARED_DIR)} <= deps[
        "evaluate"
    ]
    assert str(paths.CHECKPOINTS_DIR) not in set().union(*outs.values())  # a retry must find them


def test_each_stage_depends_on_its_own_script():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        assert stage["cmd"] == f"python -m steps.{name}"
        assert f"steps/{name}.py" in stage_files(stage, "deps")
