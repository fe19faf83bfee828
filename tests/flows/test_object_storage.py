"""Object storage by configuration only: the DVC remote and MLflow's artifact store on S3.

The S3 service is moto's S3 server (`moto.server.ThreadedMotoServer`) on 127.0.0.1: an emulator
standing in for S3, reached over real HTTP by DVC's S3 plugin (dvc-s3, s3fs) and by the MLflow
server's boto3. Nothing of llmpipe, DVC or MLflow is mocked: `llmpipe data add` and `dvc pull` run
as a user runs them, and a real `mlflow server` proxies the artifacts into the bucket. GCS and Azure
go through the same two settings (a `gs://`/`azure://` DVC remote, a `gs://`/`wasbs://` artifacts
destination) and are documented in the README, not tested here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.workloads import make_project
from steps.servers import LOOPBACK, free_port, stop_process_group, wait_http

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
BUCKET = "llmpipe-test"
CREDENTIALS = {  # moto accepts any; real ones come from the provider's variables or profiles
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# A guard: an S3 call that lost its endpoint would go to a closed loopback port (botocore reads
# AWS_ENDPOINT_URL when a client is given none), never to a host outside this machine.
NOWHERE = {"AWS_ENDPOINT_URL": f"http://{LOOPBACK}:9", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """The emulator's endpoint URL, with an empty bucket BUCKET."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=LOOPBACK, port=free_port())
    server.start()
    try:
        endpoint = "http://{}:{}".format(*server.get_host_and_port())
        bucket_client(endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.stop()


def bucket_client(endpoint: str):
    """A boto3 S3 client of the emulator, with the credentials given explicitly."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
    )


def keys(endpoint: str, prefix: str) -> list[str]:
    listed = bucket_client(endpoint).list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for o in listed.get("Contents", [])]


@pytest.fixture
def aws_env(monkeypatch) -> dict[str, str]:
    """The environment of the commands a user runs against S3: credentials in the provider's
    variables. This process itself keeps none: the MLflow client reaches S3 only via the server."""
    for name in (*CREDENTIALS, "AWS_PROFILE", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in NOWHERE.items():
        monkeypatch.setenv(name, value)
    return {**os.environ, **CREDENTIALS}


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"{cmd}: {done.stdout}\n{done.stderr}"
    return done


def test_data_add_pushes_to_s3_and_a_clone_pulls_it_back(s3, aws_env, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPIPE_CACHE", str(tmp_path / "cache"))
    project = make_project(tmp_path / "project", {})
    url = f"s3://{BUCKET}/dvc"
    dvc, git = str(BIN / "dvc"), ["git", "-c", "user.email=t@t.invalid", "-c", "user.name=t"]
    # the README's commands: the remote and its endpoint in .dvc/config, credentials elsewhere
    run([dvc, "remote", "add", "-d", "storage", url], project, aws_env)
    run([dvc, "remote", "modify", "storage", "endpointurl", s3], project, aws_env)
    src = tmp_path / "tickets.jsonl"
    src.write_text("".join(json.dumps({"text": f"ticket {i}: reset it"}) + "\n" for i in range(4)))
    added = run([str(BIN / "llmpipe"), "data", "add", str(src), "--remote", url], project, aws_env)
    assert url in added.stdout and "4 documents" in added.stdout, added.stdout
    md5 = (project / "data/raw/tickets.jsonl.dvc").read_text().split("md5: ")[1].split()[0]
    assert f"dvc/files/md5/{md5[:2]}/{md5[2:]}" in keys(s3, "dvc/"), "not pushed to the bucket"
    assert "testing" not in (project / ".dvc/config").read_text()
    run([*git, "add", "-A"], project, aws_env)
    run([*git, "commit", "-qm", "data on s3"], project, aws_env)

    clone = tmp_path / "clone"  # another machine: no DVC cache, only git and the bucket
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path, aws_env)
    assert not (clone / ".dvc/cache").exists()
    pulled = run([dvc, "pull", "data/raw/tickets.jsonl.dvc"], clone, aws_env)
    assert (clone / "data/raw/tickets.jsonl").read_bytes() == src.read_bytes(), pulled.stdout


@pytest.fixture
def mlflow_server(s3, aws_env, tmp_path) -> Iterator[str]:
    """`mlflow server` proxying artifacts into the bucket (the README's command); its URL."""
    port, log = free_port(), tmp_path / "mlflow.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", LOOPBACK, "--port", str(port),
           "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--workers", "1",
           "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--serve-artifacts"]  # fmt: skip
    env = {**aws_env, "MLFLOW_S3_ENDPOINT_URL": s3}
    with log.open("wb") as out:
        server = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # fmt: skip
    try:
        uri = f"http://{LOOPBACK}:{port}"
        wait_http(f"{uri}/health", server, "mlflow server", 120, log, ready=range(200, 201))
        yield uri
    finally:
        stop_process_group(server)


def test_runs_and_registered_models_live_in_the_bucket(
    s3, mlflow_server, tiny_model_dir, tmp_path, monkeypatch
):
    import torch
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    from flows.tracking import open_run
    from steps.params import Params
    from steps.registry import COMPLETIONS_TASK, log_and_register
    from steps.scoring import load_model
    from steps.serve import registered_task

    uri, project = mlflow_server, tmp_path / "project"
    project.mkdir()
    run_id, _ = open_run(uri, project, Params(), "on-s3", {})
    client = MlflowClient(uri)
    (project / "note.txt").write_text("hello")
    client.log_artifact(run_id, str(project / "note.txt"))
    # what steps/register.py does inside a flow's run: log the model, register a version
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    mv = log_and_register(uri, "tiny-on-s3", tiny_model_dir, {"model_hash": "tiny"})
    client.set_terminated(run_id)

    stored = keys(s3, "mlflow/")
    assert any(k.endswith(f"{run_id}/artifacts/note.txt") for k in stored), stored
    assert any(k.endswith("model.safetensors") for k in stored), stored
    assert not (project / "mlartifacts").exists()
    version = f"models:/tiny-on-s3/{mv.version}"
    assert registered_task(uri, version) == COMPLETIONS_TASK  # `llmpipe serve` reads its MLmodel
    model, tokenizer = load_model(version)
    expected = load_file(str(tiny_model_dir / "model.safetensors"))
    loaded = model.state_dict()
    assert all(torch.equal(loaded[name], value) for name, value in expected.items())
    assert tokenizer("hello")["input_ids"]
