"""Fingerprint the base model's source, so DVC re-runs `base_model` when the source changes.

    python -m steps.model_source --params params.yaml --out models/base_source.json

DVC cannot depend on `base_model.source` directly: it is a path for a local directory but a name for
the embedded model or a Hugging Face id, and a missing dependency stops `dvc repro`. This stage runs
every time (always_changed) and writes a small record that changes only when the source does:
- a local directory: each file's relative path, size and modification time (a cheap stand-in for
  hashing gigabytes of weights on every run; a touched but identical file re-runs `base_model`,
  whose output then has the same hash, so nothing after it re-runs);
- `models:/NAME@ALIAS`: the version the alias points at now (a moved alias is a new model);
- anything else (the embedded model, a hub id, `models:/NAME/VERSION`): the string itself, which
  params already track.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from steps.arguments import stage_arguments
from steps.outcome import run_step
from steps.outputs import write_json
from steps.params import BaseModelParams, load_params


def directory_fingerprint(directory: Path) -> str:
    """sha256 over (relative path, size, mtime in ns) of every file below `directory`."""
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        stat = path.stat()
        h.update(f"{path.relative_to(directory)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()


def source_record(params: BaseModelParams, project: Path) -> dict:
    source = params.source
    local = Path(source) if Path(source).is_absolute() else project / source
    if not source.startswith("models:/") and local.is_dir():
        return {"source": source, "kind": "directory", "fingerprint": directory_fingerprint(local)}
    if source.startswith("models:/") and "@" in source:
        from steps.registry import alias_version
        from steps.tracking import tracking_uri

        name, alias = source[len("models:/") :].split("@", 1)
        from mlflow import MlflowClient

        mv = alias_version(MlflowClient(tracking_uri(project)), name, alias)
        return {"source": source, "kind": "alias", "version": None if mv is None else mv.version}
    return {"source": source, "kind": "name"}


def run(params: BaseModelParams, project: Path, out: Path) -> dict:
    record = source_record(params, project)
    write_json(out, record)
    return record


def main() -> dict:
    args = stage_arguments()
    return run(load_params(args.params).base_model, args.params.resolve().parent, args.out)


if __name__ == "__main__":
    run_step(main)
