"""A locked or corrupt mlflow.db: commands fail in one line naming the database (never "no
champion"), and change nothing."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from steps.registry import champion_version
from steps.servers import free_port

pytestmark = pytest.mark.integration

LLMPIPE = Path(sys.executable).parent / "llmpipe"
GARBAGE = bytes(range(256)) * 64  # 16 KiB that sqlite does not recognise


def registry_copy(golden, tmp_path: Path) -> Path:
    """What `llmpipe serve` reads: params.yaml and the golden project's registry."""
    for name in ("params.yaml", "mlflow.db"):
        shutil.copy(golden[0] / name, tmp_path / name)
    return tmp_path


def serve(project: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LLMPIPE, "serve", "--port", str(free_port())], cwd=project,
                          capture_output=True, text=True, timeout=180)  # fmt: skip


def one_line(done: subprocess.CompletedProcess, code: int) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
    assert done.returncode == code and len(lines) == 1, done.stderr[-3000:]
    return lines[0]


def test_serve_on_a_locked_registry_names_the_database_not_no_champion(golden, tmp_path):
    project = registry_copy(golden, tmp_path)
    db = project / "mlflow.db"
    before = db.read_bytes()
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")  # another process writing, and taking its time
        done = serve(project)
    finally:
        holder.rollback()
        holder.close()
    line = one_line(done, 1)
    assert line == (
        f"error: {db}: cannot read the model registry: (sqlite3.OperationalError) database is "
        "locked"
    )
    assert "no champion" not in done.stderr
    assert db.read_bytes() == before
    assert str(champion_version(f"sqlite:///{db}", "llmpipe").version) == "1"  # still there


def test_serve_on_a_corrupt_registry_names_the_database(golden, tmp_path):
    project = registry_copy(golden, tmp_path)
    db = project / "mlflow.db"
    db.write_bytes(GARBAGE)
    line = one_line(serve(project), 1)
    assert line == (
        f"error: {db}: cannot read the model registry: (sqlite3.DatabaseError) file is not a "
        "database"
    )
    assert db.read_bytes() == GARBAGE  # left as it was, for the user to restore


def test_run_on_a_corrupt_registry_is_one_line_and_changes_nothing(project, tmp_path):
    db = project / "mlflow.db"
    db.write_bytes(GARBAGE)
    watched = ["params.yaml", "dvc.lock", "metrics/eval.json", "mlflow.db"]
    before = {name: (project / name).read_bytes() for name in watched}
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([LLMPIPE, "run", "--no-serve-check"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert {name: (project / name).read_bytes() for name in watched} == before
    assert done.returncode == 1, done.stderr[-3000:]
    assert one_line(done, 1) == (
        f"error: {db}: cannot read the model registry: (sqlite3.DatabaseError) file is not a "
        "database"
    )


def test_run_against_a_tracking_server_that_does_not_answer_is_one_line(project, tmp_path):
    """MLFLOW_TRACKING_URI names a server that is down: one line at once (MLflow's client alone
    retried for ~4 minutes), exit 1, nothing changed."""
    watched = ["params.yaml", "dvc.lock", "metrics/eval.json", "mlflow.db"]
    before = {name: (project / name).read_bytes() for name in watched}
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "MLFLOW_TRACKING_URI": uri}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([LLMPIPE, "run"], cwd=project, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert {name: (project / name).read_bytes() for name in watched} == before
    assert one_line(done, 1) == (
        f"error: {uri}: the MLflow tracking server does not answer ([Errno 111] Connection "
        "refused); start it, or fix MLFLOW_TRACKING_URI"
    )
