"""docs/architecture.md's "How to add a stage": its diff applies to the project as it is, and its
commands work there exactly as printed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.workloads import REPO, make_project

pytestmark = pytest.mark.integration

DOC = REPO / "docs" / "architecture.md"


def fenced(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)\n```", DOC.read_text(), flags=re.S)


def test_the_add_a_stage_example_applies_and_runs(tmp_path):
    project = make_project(tmp_path / "project", {})
    (project / ".venv").symlink_to(Path(sys.executable).parents[1])  # the doc's .venv
    [diff] = fenced("diff")
    (tmp_path / "change.diff").write_text(diff + "\n")
    subprocess.run(["git", "apply", str(tmp_path / "change.diff")], cwd=project, check=True)
    dvc_yaml = (project / "dvc.yaml").read_text()
    [commands] = [block for block in fenced("bash") if "steps.stages --write" in block]
    done = subprocess.run(["bash", "-ec", commands], cwd=project, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (project / "dvc.yaml").read_text() == dvc_yaml  # the diff's dvc.yaml is the rendering
    assert "1 passed" in done.stdout  # the new step's own test
    assert "metrics/corpus.json" in done.stdout  # `dvc metrics show`
    assert '"documents": 79' in (project / "metrics" / "corpus.json").read_text()
