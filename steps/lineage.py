"""Lineage facts recorded on every MLflow run and model version: DVC hashes and the git commit.

Which hash is which fact is declared in the stage table (`Stage.lineage`: data_hash,
base_model_hash, model_hash); the values are the md5s DVC wrote to dvc.lock when it ran the stage.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import yaml

from steps.stages import STAGES, interpolate


def dvc_lock_hash(lock: Path, stage: str, path: str, section: str = "outs") -> str:
    """md5 that DVC recorded for `path` among the deps or outs of `stage`; '' when not recorded."""
    if not lock.is_file():
        return ""
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for entry in stages.get(stage, {}).get(section, []):
        if entry.get("path") == path:
            return entry.get("md5", "")
    return ""


def stage_lineage(project: Path, params: dict, stages=STAGES) -> dict[str, str]:
    """{tag: md5} for every lineage fact of `stages` that dvc.lock records ('' when not yet)."""
    tags = {}
    for stage in stages:
        for tag, option in stage.lineage.items():
            section = "outs" if option in stage.outputs else "deps"
            path = interpolate(stage.path(option), params)
            tags[tag] = dvc_lock_hash(project / "dvc.lock", stage.name, path, section)
    return tags


def file_md5(path: Path) -> str:
    """The md5 DVC 3 records for a file (of its raw bytes), read in 1 MiB chunks."""
    h = hashlib.md5()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def git_sha(cwd: Path) -> str:
    """HEAD's sha, with '-dirty' when tracked files differ from it; '' outside a git checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return f"{sha}-dirty" if dirty else sha
