"""flows/tracking.py against a real MLflow tracking server: artifacts go where the server keeps
them (proxied `mlflow-artifacts:`), not to a path on the machine that ran the flow."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flows.tracking import artifact_location, open_run
from steps.params import Params
from steps.servers import LOOPBACK, free_port, stop_process_group, wait_http


@pytest.mark.unit
def test_artifact_location_is_local_only_for_a_local_store(tmp_path):
    assert artifact_location(f"sqlite:///{tmp_path}/mlflow.db", tmp_path) == (
        (tmp_path / "mlartifacts").as_uri()
    )
    assert artifact_location("http://127.0.0.1:5000", tmp_path) is None
    assert artifact_location("https://mlflow.example.org", tmp_path) is None


@pytest.mark.integration
def test_runs_on_a_tracking_server_store_artifacts_on_the_server(tmp_path):
    from mlflow import MlflowClient

    store, project = tmp_path / "server-artifacts", tmp_path / "project"
    project.mkdir()
    port = free_port()
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", LOOPBACK, "--port", str(port),
           "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
           "--artifacts-destination", str(store), "--workers", "1"]  # fmt: skip
    with log.open("wb") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        uri = f"http://{LOOPBACK}:{port}"
        wait_http(f"{uri}/health", server, "mlflow server", 120, log, ready=range(200, 201))
        run_id, experiment_id = open_run(uri, project, Params(), "remote", {})
        client = MlflowClient(uri)
        location = client.get_experiment(experiment_id).artifact_location
        assert location.startswith("mlflow-artifacts:"), location
        (project / "note.txt").write_text("hello")
        client.log_artifact(run_id, str(project / "note.txt"))
        assert [p.name for p in store.rglob("note.txt")] == ["note.txt"]  # on the server's side
        assert not (project / "mlartifacts").exists()
    finally:
        stop_process_group(server)
