"""Throwaway copies of the pipeline for tests and benchmarks: a git repo with DVC and params."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

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


def tiny_params(model_dir: Path, **train: object) -> dict[str, dict]:
    """params.yaml edits for a fast run of the tiny model: small blocks, few steps, one sample."""
    return {
        "base_model": {"source": str(model_dir)},
        "prepare": {"block_size": 32},
        "train": {"max_steps": 6, "save_steps": 3, **train},
        "evaluate": {"window": 64, "stride": 64, "batch_size": 8, "samples": 1, "sample_tokens": 4},
    }
