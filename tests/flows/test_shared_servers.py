"""`llmpipe up --mlflow-database-url ... --prefect-database-url ...` for real: a PostgreSQL of the
test's own (initdb in a temporary directory, on a free loopback port, as the `postgres` user when
we are root), MLflow's server with basic auth and proxied artifacts, Prefect's server on it."""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from benchmarks.workloads import make_project, tiny_params
from steps.servers import free_port
from tests.flows.conftest import PG_USER, wait_until
from tests.flows.test_cli_errors import last_line
from tests.flows.test_stack import Api, basic, processes_in

pytestmark = pytest.mark.integration

LLMPIPE = Path(sys.executable).parent / "llmpipe"


def database_urls(pg: dict, prefix: str = "") -> dict[str, str]:
    """The URLs `up` is given: no password (that travels in PGPASSWORD). With a `prefix`, two
    new empty databases of that prefix (a module's own: MLflow's auth app keeps the first admin it
    was started with, so two stacks must not share one)."""
    where = f"{PG_USER}@127.0.0.1:{pg['port']}"
    if prefix:
        import psycopg

        with psycopg.connect(f"{pg['url']}/postgres", autocommit=True) as db:
            for name in ("mlflow", "prefect"):
                db.execute(f"CREATE DATABASE {prefix}{name}")
    return {
        "mlflow": f"postgresql://{where}/{prefix}mlflow",
        "prefect": f"postgresql+asyncpg://{where}/{prefix}prefect",
    }


def up_env(root: Path, pg: dict, login: tuple[str, str], ui_auth: str) -> dict[str, str]:
    env = {
        **os.environ,
        "PREFECT_HOME": str(root / "prefect-home"),
        "LLMPIPE_UI_AUTH": ui_auth,
        "MLFLOW_TRACKING_USERNAME": login[0],
        "MLFLOW_TRACKING_PASSWORD": login[1],
        "PGPASSWORD": pg["password"],
        "TMPDIR": str(root / "tmp"),  # where `up` writes MLflow's auth config
    }
    (root / "tmp").mkdir(exist_ok=True)
    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        env.pop(name, None)
    return env


def start_shared_up(
    root: Path,
    pg: dict,
    login: tuple[str, str],
    ui_auth: str,
    *extra: str,
    params: dict | None = None,
):
    project = make_project(root / "project", params or {})
    ports = free_port(), free_port()
    urls = database_urls(pg)
    cmd = [LLMPIPE, "up", "--prefect-port", str(ports[0]), "--mlflow-port", str(ports[1]),
           "--mlflow-database-url", urls["mlflow"], *extra]  # fmt: skip
    log = root / "up.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=project, env=up_env(root, pg, login, ui_auth), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    return proc, project, ports, log


@pytest.fixture(scope="module")
def shared(tmp_path_factory, postgres, tiny_model_dir):
    """One `llmpipe up` on both databases, once the runner has registered its deployments; its
    project trains the tiny model."""
    root = tmp_path_factory.mktemp("shared")
    login = ("team-admin", secrets.token_urlsafe(18))
    artifacts = root / "artifact-store"
    auth = f"operator:{secrets.token_urlsafe(18)}"
    proc, project, ports, log = start_shared_up(
        root, postgres, login, auth, "--prefect-database-url", database_urls(postgres)["prefect"],
        "--artifacts-destination", str(artifacts),
        params=tiny_params(tiny_model_dir, learning_rate=3.0e-3),
    )  # fmt: skip
    api = Api(f"http://127.0.0.1:{ports[0]}/api", auth)
    try:
        wait_until(
            lambda: "llmpipe is up" in log.read_text(errors="replace")
            and len(api("/deployments/filter", {})) == 2,
            proc, log, 240, "the stack did not come up",
        )  # fmt: skip
        yield {
            "proc": proc, "project": project, "log": log, "root": root, "login": login,
            "api": api, "prefect_auth": auth, "mlflow": f"http://127.0.0.1:{ports[1]}",
            "artifacts": artifacts, "pg": postgres,
        }  # fmt: skip
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=90)


def mlflow_client(shared, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", shared["login"][0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", shared["login"][1])
    return MlflowClient(shared["mlflow"])


def status(url: str, body: dict | None, headers: dict[str, str]) -> int:
    """The HTTP status of one call (MLflow answers 401 in plain text, not JSON)."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **headers}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def test_mlflow_refuses_calls_without_the_login(shared):
    base, (user, password) = shared["mlflow"] + "/api/2.0/mlflow", shared["login"]
    search = f"{base}/experiments/search?max_results=1"
    for headers in ({}, basic(f"{user}:wrong-password-123"), basic(f"nobody:{password}")):
        assert status(search, None, headers) == 401
        assert status(f"{base}/registered-models/create", {"name": "intruder"}, headers) == 401
    login = basic(f"{user}:{password}")
    assert status(search, None, login) == 200
    assert status(f"{base}/registered-models/get?name=intruder", None, login) == 404


def test_a_client_with_the_login_logs_through_the_proxy_and_registers(
    shared, monkeypatch, tmp_path
):
    client = mlflow_client(shared, monkeypatch)
    experiment = client.create_experiment("shared-check")
    assert client.get_experiment(experiment).artifact_location.startswith("mlflow-artifacts:")
    run = client.create_run(experiment, tags={"purpose": "shared-servers test"})
    client.log_param(run.info.run_id, "lr", "0.001")
    card = tmp_path / "card.txt"
    card.write_text("stored through the server's proxy\n")
    client.log_artifact(run.info.run_id, str(card), "model")
    client.set_terminated(run.info.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    stored = list(shared["artifacts"].rglob("card.txt"))
    assert [p.read_text() for p in stored] == [card.read_text()]
    assert run.info.run_id in str(stored[0])

    client.create_registered_model("shared-check")
    version = client.create_model_version(
        "shared-check", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id
    )
    client.set_registered_model_alias("shared-check", "champion", version.version)
    assert client.get_model_version_by_alias("shared-check", "champion").version == "1"

    data = client.get_run(run.info.run_id).data
    logged = " ".join([*data.params, *data.params.values(), *data.tags, *data.tags.values()])
    assert shared["login"][1] not in logged and shared["login"][0] not in logged


def test_the_mlflow_login_is_written_nowhere_but_a_0600_file(shared):
    password = shared["login"][1].encode()
    header = base64.b64encode(":".join(shared["login"]).encode())
    config = list((shared["root"] / "tmp").glob("llmpipe-mlflow-auth-*"))
    assert len(config) == 1 and config[0].stat().st_mode & 0o777 == 0o600
    leaks = []
    for path in shared["root"].rglob("*"):
        if path.is_file() and path != config[0]:
            data = path.read_bytes()
            if password in data or header in data:
                leaks.append(str(path.relative_to(shared["root"])))
    assert leaks == []  # up's log (every server's output), the project, the artifact store


def test_prefect_keeps_flow_runs_in_postgresql(shared, tmp_path):
    """A trivial flow run through the API of `up`'s Prefect server: the API returns it, and its
    rows are in the prefect database (beside the deployments the runner registered)."""
    import psycopg

    name = f"shared-{secrets.token_hex(4)}"
    script = tmp_path / "trivial.py"
    script.write_text(
        "from prefect import flow\n\n"
        f"@flow(name={name!r})\n"
        "def trivial() -> int:\n    return 42\n\n"
        "assert trivial() == 42\n"
    )
    env = {
        **os.environ,
        "PREFECT_API_URL": shared["api"].base,
        "PREFECT_API_AUTH_STRING": shared["prefect_auth"],
        "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED": "true",
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
    }
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    runs = shared["api"]("/flow_runs/filter", {"flows": {"name": {"any_": [name]}}})
    assert [r["state"]["type"] for r in runs] == ["COMPLETED"]
    with psycopg.connect(f"{shared['pg']['url']}/prefect") as db:
        rows = db.execute(
            "SELECT fr.state_type FROM flow_run fr JOIN flow f ON f.id = fr.flow_id "
            "WHERE f.name = %s",
            (name,),
        ).fetchall()
        deployments = db.execute("SELECT name FROM deployment ORDER BY name").fetchall()
    assert [str(r[0]).rsplit(".", 1)[-1] for r in rows] == ["COMPLETED"]
    assert [d[0] for d in deployments] == ["manual", "retrain-on-new-data"]


def test_a_login_the_server_does_not_know_stops_everything(shared, tmp_path):
    """The admin exists already (created by `shared`'s first start): another password is refused
    after the servers started; `up` stops them, deletes its auth file, says so in one line."""
    login = (shared["login"][0], "another-password-" + secrets.token_hex(4))
    proc, project, _, log = start_shared_up(tmp_path, shared["pg"], login, shared["prefect_auth"])
    assert proc.wait(timeout=240) == 2, log.read_text()[-3000:]
    text = log.read_text()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: the MLflow server refuses MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD: "
        "give a user it knows (its admin was created on its first start from "
        "MLFLOW_AUTH_ADMIN_USERNAME/MLFLOW_AUTH_ADMIN_PASSWORD, else from those two)"
    ]
    assert "Traceback" not in text and login[1] not in text
    assert processes_in(project) == []
    assert list((tmp_path / "tmp").glob("llmpipe-mlflow-auth-*")) == []  # deleted


@pytest.mark.parametrize(
    ("args", "unset", "message"),
    [
        (
            ["--mlflow-database-url", "sqlite:///mlflow.db"],
            [],
            "error: --mlflow-database-url must start with postgresql:// or "
            "postgresql+psycopg:// (got 'sqlite:///mlflow.db'), "
            "e.g. postgresql://USER@127.0.0.1:5432/DBNAME",
        ),
        (
            ["--prefect-database-url", "postgresql://u:secret@127.0.0.1:1/p"],
            [],
            "error: --prefect-database-url must start with postgresql+asyncpg:// "
            "(got 'postgresql://u:***@127.0.0.1:1/p'), "
            "e.g. postgresql+asyncpg://USER@127.0.0.1:5432/DBNAME",
        ),
        (
            ["--mlflow-database-url", "postgresql://u@127.0.0.1:1/mlflow"],
            ["MLFLOW_TRACKING_PASSWORD"],
            "error: --mlflow-database-url needs MLFLOW_TRACKING_PASSWORD set: the MLflow login "
            "that the runner uses (and, on the server's first start, its admin unless "
            "MLFLOW_AUTH_ADMIN_USERNAME/MLFLOW_AUTH_ADMIN_PASSWORD are set)",
        ),
        (
            ["--prefect-database-url", "postgresql+asyncpg://u@127.0.0.1:{port}/prefect"],
            [],
            "error: --prefect-database-url: cannot connect to "
            "postgresql+asyncpg://u@127.0.0.1:{port}/prefect (",
        ),
    ],
    ids=["mlflow-sqlite", "prefect-scheme", "no-password", "unreachable"],
)
def test_bad_input_is_one_line_and_starts_nothing(args, unset, message, tmp_path):
    port = str(free_port())  # nothing listens there
    project = make_project(tmp_path / "project", {})
    env = {**os.environ, "LLMPIPE_UI_AUTH": "operator:" + secrets.token_hex(8)}
    env.update({"MLFLOW_TRACKING_USERNAME": "u", "MLFLOW_TRACKING_PASSWORD": "p" * 16})
    for name in [*unset, "PREFECT_API_URL"]:
        env.pop(name, None)
    cmd = [LLMPIPE, "up", "--prefect-port", str(free_port()), "--mlflow-port", str(free_port())]
    done = subprocess.run([*cmd, *(a.replace("{port}", port) for a in args)], cwd=project,
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    line = last_line(done)
    assert line.startswith(message.replace("{port}", port)), line
    assert "secret" not in done.stderr + done.stdout
    assert processes_in(project) == []


@pytest.mark.skipif(
    not os.environ.get("LLMPIPE_SHARED_SLOW"), reason="~2.5 min: set LLMPIPE_SHARED_SLOW=1"
)
def test_the_runner_runs_the_pipeline_into_the_shared_servers(shared):
    """The manual deployment, triggered through the API as the UI's Run button does: the tiny
    pipeline tracks, registers, smoke-serves and promotes through the MLflow server; the model's
    files are in the artifact store, none in the project's mlartifacts/."""
    from tests.flows.test_stack import run_and_wait

    state = run_and_wait(shared, "manual", {})
    assert state["type"] == "COMPLETED", shared["log"].read_text()[-3000:]
    assert list(shared["artifacts"].rglob("model.safetensors"))
    assert not (shared["project"] / "mlartifacts").exists()
    assert "promote: champion moved from none to version 1" in shared["log"].read_text()
    assert shared["login"][1] not in shared["log"].read_text()
