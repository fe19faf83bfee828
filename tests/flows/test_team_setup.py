"""Issue 11's acceptance: a team's setup on one machine, each part standing for another one.

- `llmpipe up --no-runner` starts MLflow's server (basic auth, proxied artifacts) and Prefect's
  server, both on a PostgreSQL this test starts itself (tests/flows/conftest.py);
- `llmpipe deploy --pool` places the deployments on a process work pool, and a worker in a second
  clone of the project (another machine) runs the manual deployment: its data comes through the
  DVC remote (pulled first; every stage output pushed after), the tiny model trains, registers
  into the shared registry, is smoke-served and promoted;
- a third directory (a serving machine) serves `models:/llmpipe@champion` from that registry with
  `llmpipe serve`, and answers a completion.
Real servers on 127.0.0.1, real DVC, real Prefect worker; no credential in any log.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from benchmarks.workloads import SAMPLE_TEXT, commit_all, edit_params, make_project, tiny_params
from flows.manual import PROJECT_ENV
from steps.serve import complete
from steps.servers import free_port, stop_process_group
from tests.flows.conftest import wait_until
from tests.flows.test_shared_servers import database_urls, up_env

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
DATA = "data/raw/notes.jsonl"
POOL = "team-gpus"


def run(cwd: Path, env: dict[str, str], *cmd: str | Path, timeout: int = 300) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    assert done.returncode == 0, f"{cmd}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done.stdout


def remote_files(remote: Path) -> set[str]:
    return {str(p.relative_to(remote)) for p in remote.rglob("*") if p.is_file()}


def lock_outs(project: Path, stage: str) -> list[dict]:
    return yaml.safe_load((project / "dvc.lock").read_text())["stages"][stage]["outs"]


def wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    wait_until(lambda: text in path.read_text(errors="replace"), proc, path, timeout, repr(text))


def client_env(prefect: str, ui_auth: str, mlflow: str, login: tuple[str, str]) -> dict[str, str]:
    """What a team member's machine sets: the servers' URLs and the two logins, nothing else of
    this test's environment's MLflow, Prefect or llmpipe settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "LLMPIPE_", "PREFECT_", "PGPASSWORD"))
    }
    return {
        **env,
        "PREFECT_API_URL": prefect,
        "PREFECT_API_AUTH_STRING": ui_auth,
        "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED": "true",
        "MLFLOW_TRACKING_URI": mlflow,
        "MLFLOW_TRACKING_USERNAME": login[0],
        "MLFLOW_TRACKING_PASSWORD": login[1],
    }


def test_a_worker_trains_into_the_shared_servers_and_a_third_machine_serves_the_champion(
    tmp_path, postgres, tiny_model_dir
):
    login = ("team-admin", secrets.token_urlsafe(18))
    ui_auth = f"operator:{secrets.token_urlsafe(18)}"
    # the origin project: the tiny model, its data under DVC in a remote every machine reaches
    origin = make_project(tmp_path / "origin", tiny_params(tiny_model_dir, learning_rate=3.0e-3))
    notes = [f"Note {i}: {SAMPLE_TEXT[i % len(SAMPLE_TEXT)]}" for i in range(40)]
    (origin / DATA).parent.mkdir(parents=True, exist_ok=True)
    (origin / DATA).write_text("".join(json.dumps({"text": t}) + "\n" for t in notes))
    plain = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LLMPIPE_"))}
    run(origin, plain, BIN / "dvc", "add", DATA)
    run(origin, plain, BIN / "dvc", "remote", "add", "--default", "team", tmp_path / "dvc-remote")
    run(origin, plain, BIN / "dvc", "push")
    edit_params(origin / "params.yaml", {"prepare": {"data": DATA}})
    commit_all(origin, "data under DVC")

    # the servers: no runner, the flows run on the pool's workers
    ports = free_port(), free_port()
    urls, artifacts = database_urls(postgres, prefix="team_"), tmp_path / "artifact-store"
    up_log = tmp_path / "up.log"
    with up_log.open("w") as out:
        up = subprocess.Popen(
            [BIN / "llmpipe", "up", "--no-runner", "--prefect-port", str(ports[0]),
             "--mlflow-port", str(ports[1]), "--mlflow-database-url", urls["mlflow"],
             "--prefect-database-url", urls["prefect"], "--artifacts-destination", artifacts],
            cwd=origin, env=up_env(tmp_path, postgres, login, ui_auth), stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    prefect, mlflow = f"http://127.0.0.1:{ports[0]}/api", f"http://127.0.0.1:{ports[1]}"
    team = client_env(prefect, ui_auth, mlflow, login)
    worker = serving = None
    try:
        wait_for_text(up_log, "llmpipe is up", up, timeout=240)
        assert "no runner" in up_log.read_text()
        made = run(origin, team, BIN / "prefect", "work-pool", "create", POOL, "--type", "process")
        assert f"Created work pool {POOL!r}" in made
        assert f"on work pool '{POOL}'" in run(
            origin, team, BIN / "llmpipe", "deploy", "--pool", POOL
        )

        # the worker's machine: a clone, no data, no DVC cache
        clone = tmp_path / "worker-clone"
        run(tmp_path, plain, "git", "clone", "-q", origin, clone)
        assert not (clone / DATA).exists()
        worker_log = tmp_path / "worker.log"
        with worker_log.open("w") as out:
            worker = subprocess.Popen(
                [BIN / "prefect", "worker", "start", "--pool", POOL], cwd=clone,
                env={**team, PROJECT_ENV: str(clone), "PYTHONPATH": str(clone),
                     "PREFECT_WORKER_QUERY_SECONDS": "2"},
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        started = time.monotonic()
        ran = run(origin, team, BIN / "prefect", "deployment", "run", "finetune/manual",
                  "--watch", "--watch-timeout", "600", timeout=660)  # fmt: skip
        assert "Completed" in ran, ran[-3000:] + worker_log.read_text(errors="replace")[-6000:]
        print(f"the worker's run took {time.monotonic() - started:.0f} s")
        assert (clone / DATA).read_bytes() == (origin / DATA).read_bytes()  # pulled by DVC
        # the stage outputs went back to the remote: the prepared data and the tuned model too
        pushed = remote_files(tmp_path / "dvc-remote")
        for stage, path in (("prepare", "data/prepared"), ("train", "models/tuned")):
            md5 = next(out["md5"] for out in lock_outs(clone, stage) if out["path"] == path)
            assert f"files/md5/{md5[:2]}/{md5[2:]}" in pushed, f"{path} was not pushed"
        in_sync = run(clone, plain, BIN / "dvc", "status", "--cloud")
        assert "Cache and remote 'team' are in sync" in in_sync, in_sync
        assert not (origin / "metrics/eval.json").exists()  # the origin ran nothing
        # a plain deploy (a runner's) would leave them on the pool without what a worker needs
        refused = subprocess.run([BIN / "llmpipe", "deploy"], cwd=origin, env=team,
                                 capture_output=True, text=True, timeout=120)  # fmt: skip
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert refused.stderr.strip().splitlines() == [
            f"error: finetune/manual is on work pool '{POOL}' (llmpipe deploy --pool); keep it "
            f"there with `llmpipe deploy --pool {POOL}`, or delete it first to deploy it for a "
            "runner: `prefect deployment delete finetune/manual`"
        ]

        # the registry lives in PostgreSQL behind the login; the model's files in the store
        from mlflow import MlflowClient

        os.environ.update(MLFLOW_TRACKING_USERNAME=login[0], MLFLOW_TRACKING_PASSWORD=login[1])
        champion = MlflowClient(mlflow).get_model_version_by_alias("llmpipe", "champion")
        assert champion.version == "1" and champion.source.startswith(("models:/", "mlflow-art"))
        assert list(artifacts.rglob("model.safetensors"))
        assert not (clone / "mlartifacts").exists() and not (origin / "mlartifacts").exists()

        # the serving machine: a directory with the project's params.yaml and nothing else
        elsewhere = tmp_path / "serving"
        elsewhere.mkdir()
        shutil.copy(origin / "params.yaml", elsewhere / "params.yaml")
        port = free_port()
        serve_log = tmp_path / "serve.log"
        with serve_log.open("w") as out:
            serving = subprocess.Popen(
                [BIN / "llmpipe", "serve", "--port", str(port)], cwd=elsewhere, env=team,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        wait_for_text(serve_log, "serving models:/llmpipe@champion", serving, timeout=60)
        deadline = time.monotonic() + 180
        while True:
            try:
                answer = complete(f"http://127.0.0.1:{port}", "In Python, the for", max_tokens=8)
                break
            except OSError:  # not listening yet: the server loads the model first
                assert serving.poll() is None, serve_log.read_text(errors="replace")[-3000:]
                assert time.monotonic() < deadline, serve_log.read_text(errors="replace")[-3000:]
                time.sleep(1)
        # an OpenAI-style completion came back (the random tiny model's 8 tokens may be blanks;
        # the smoke check before promotion compared the served text with generate())
        assert isinstance(answer, str)
        assert sorted(p.name for p in elsewhere.iterdir()) == ["params.yaml"]  # no local store
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME", None)
        os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)
        for proc in (serving, worker):
            if proc is not None:
                stop_process_group(proc, grace=30)
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGINT)
            up.wait(timeout=90)
    # the run logged its params in batches: MLflow's basic-auth checks the password's hash on
    # every request (~0.2 s each here), and one request a param cost each run ~10 s
    requests = up_log.read_text(errors="replace")
    assert "/mlflow/runs/log-batch" in requests and "/mlflow/runs/log-parameter" not in requests
    logs = [tmp_path / name for name in ("up.log", "worker.log", "serve.log")]
    for secret in (login[1], ui_auth.split(":")[1], postgres["password"]):
        assert not any(secret in p.read_text(errors="replace") for p in logs if p.exists())
