"""Bring new data: `llmpipe data add PATH`.

    llmpipe data add notes.jsonl [--remote DIR]

Validates the file (exists, text, UTF-8, every JSONL line parses, not empty), copies it under
data/raw/, tracks it with `dvc add`, pushes it to the DVC remote (a local directory by default, or
whatever `dvc remote add -d` configured) and points `prepare.data` at it, so the next run trains on
it. Nothing is copied, tracked or edited when the file is rejected.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from flows.runner import dvc_executable, stage_env
from steps.environment import cache_dir
from steps.errors import UserError
from steps.outputs import copy_file
from steps.params import apply_overrides, load_params
from steps.prepare import read_documents

RAW_DIR = Path("data/raw")
BINARY_SNIFF_BYTES = 8192  # a NUL byte in the first 8 KiB means "not a text file"


def default_remote() -> Path:
    """Where `data add` pushes when no DVC remote is configured: a machine-wide local directory."""
    return cache_dir() / "dvc-remote"


def validate_text_file(path: Path, text_field: str) -> int:
    """Number of documents in a .txt/.jsonl file; UserError naming the file (and line) otherwise."""
    if not path.is_file():
        raise UserError(f"{path}: no such file; give the path of a .txt or .jsonl file")
    if path.suffix not in (".txt", ".jsonl"):
        raise UserError(f"{path}: unsupported file type {path.suffix!r}; use .txt or .jsonl")
    with path.open("rb") as f:
        if b"\0" in f.read(BINARY_SNIFF_BYTES):
            raise UserError(f"{path}: looks binary (NUL bytes); give a UTF-8 text file")
    return len(read_documents(path, text_field))


def dvc(project: Path, *args: str) -> str:
    done = subprocess.run([dvc_executable(), *args], cwd=project, env=stage_env({}),
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"dvc {' '.join(args)} failed: {last[0]}")
    return done.stdout


def ensure_remote(project: Path, remote: str | None) -> str:
    """The default DVC remote's URL, creating a local one when none is configured."""
    if remote:
        dvc(project, "remote", "add", "--default", "--force", "llmpipe", remote)
        return remote
    remotes = dict(
        line.split(None, 1) for line in dvc(project, "remote", "list").splitlines() if line
    )
    if remotes:
        try:
            default = dvc(project, "remote", "default").strip()
        except RuntimeError:  # remotes exist but none is the default: push to the first
            default = ""
        return remotes.get(default, next(iter(remotes.values()))).split()[0]
    target = default_remote()
    target.mkdir(parents=True, exist_ok=True)
    dvc(project, "remote", "add", "--default", "llmpipe", str(target))
    return str(target)


def add_data(source: Path, project: Path, remote: str | None = None) -> dict:
    params = load_params(project / "params.yaml")
    documents = validate_text_file(source, params.prepare.text_field)
    dest = project / RAW_DIR / source.name
    if source.resolve() != dest.resolve():
        copy_file(source, dest)
    relative = str(dest.relative_to(project))
    dvc(project, "add", relative)
    md5 = yaml.safe_load((project / f"{relative}.dvc").read_text())["outs"][0]["md5"]
    url = ensure_remote(project, remote)
    dvc(project, "push", f"{relative}.dvc")
    apply_overrides(project / "params.yaml", [f"prepare.data={relative}"])
    return {"path": relative, "documents": documents, "md5": md5, "remote": url}
