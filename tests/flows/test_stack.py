"""`llmpipe up` for real: a Prefect server on loopback behind a login and CSRF protection, the
runner, the MLflow UI; deployments triggered through the REST API (what the UI's Run button calls)
run the tiny pipeline, and the manual form refuses what its allow-list does not name."""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from benchmarks.workloads import make_project, tiny_params
from steps.servers import free_port, wait_http
from tests.flows.conftest import request, wait_until

pytestmark = pytest.mark.integration

LLMPIPE = Path(sys.executable).parent / "llmpipe"
LOGIN_LINE = re.compile(rb"Prefect UI login \(type it whole\): (\S+)")


def basic(auth: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}


class Api:
    """The Prefect REST API as the UI calls it: the login on every call, and on every write a CSRF
    token that the server issued to this client (GET /api/csrf-token?client=ID)."""

    def __init__(self, base: str, auth: str):
        self.base, self.auth, self.client = base, auth, str(uuid.uuid4())

    def csrf(self) -> dict[str, str]:
        status, token = request(
            f"{self.base}/csrf-token?client={self.client}", None, self.headers()
        )
        assert status == 200, token
        return {"Prefect-Csrf-Token": token["token"], "Prefect-Csrf-Client": self.client}

    def headers(self, write: bool = False) -> dict[str, str]:
        return {**basic(self.auth), **(self.csrf() if write else {})}

    def __call__(self, path: str, body: dict | None = None, method: str | None = None):
        write = (method or ("POST" if body is not None else "GET")) != "GET"
        status, answer = request(f"{self.base}{path}", body, self.headers(write), method)
        assert status < 300, f"{path}: {status} {answer}"
        return answer


def drain(master: int, log: Path, out: bytearray) -> None:
    """Copy what `llmpipe up` writes to its terminal into `out` and the log, until no process
    holds the terminal any more (then reading fails with EIO); then close it."""
    try:
        with log.open("ab") as f:
            while chunk := os.read(master, 65536):
                out.extend(chunk)
                f.write(chunk)
                f.flush()
    except OSError:
        pass
    finally:
        os.close(master)


def start_up(root: Path, tiny_model_dir: Path, terminal: bool = False) -> dict:
    """`llmpipe up` in a new project under `root`, once both deployments are registered. The login
    is LLMPIPE_UI_AUTH; with `terminal`, `up` runs on a pseudo-terminal of its own (its controlling
    terminal) without that variable, so it generates the login and shows it there."""
    project = make_project(root / "project", tiny_params(tiny_model_dir, learning_rate=3.0e-3))
    prefect_port, mlflow_port = free_port(), free_port()
    auth = None if terminal else f"operator:{secrets.token_urlsafe(18)}"
    env = {
        **os.environ,
        "PREFECT_HOME": str(root / "prefect-home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlflow.db",
        **({"LLMPIPE_UI_AUTH": auth} if auth else {}),
    }
    env.pop("PREFECT_API_URL", None)
    if terminal:
        env.pop("LLMPIPE_UI_AUTH", None)
    cmd = [LLMPIPE, "up", "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)]
    log_path = root / "up.log"
    screen = bytearray()
    if terminal:
        import fcntl
        import termios

        master, slave = os.openpty()
        proc = subprocess.Popen(
            cmd,
            cwd=project,
            env=env,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(slave)
        threading.Thread(target=drain, args=(master, log_path, screen), daemon=True).start()
    else:
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                cmd, cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
    base = f"http://127.0.0.1:{prefect_port}/api"

    def both_deployments() -> bool:
        nonlocal auth
        if auth is None and (found := LOGIN_LINE.search(bytes(screen))):
            auth = found.group(1).decode()
        return bool(auth) and len(Api(base, auth)("/deployments/filter", {})) == 2

    wait_until(both_deployments, proc, log_path, 240, "deployments did not appear")
    return {
        "api": Api(base, auth),
        "base": base,
        "auth": auth,
        "project": project,
        "root": root,
        "mlflow": f"http://127.0.0.1:{mlflow_port}",
        "ui": f"http://127.0.0.1:{prefect_port}",
        "ports": (prefect_port, mlflow_port),
        "proc": proc,
        "log": log_path,
        "screen": screen,
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir):
    """One `llmpipe up` for the module's read-only checks (the signal tests start their own)."""
    up = start_up(tmp_path_factory.mktemp("stack"), tiny_model_dir)
    yield up
    if up["proc"].poll() is None:
        os.killpg(up["proc"].pid, signal.SIGINT)
        up["proc"].wait(timeout=90)


@pytest.fixture(scope="module")
def ui_run(stack) -> dict:
    """What the UI's Run button does: a run of `manual` through the REST API, to its end."""
    return run_and_wait(stack, "manual", {})  # serves the candidate before promoting it


def deployments(stack) -> dict[str, dict]:
    return {d["name"]: d for d in stack["api"]("/deployments/filter", {})}


def test_deployments_have_their_schedule_and_a_typed_form(stack):
    found = deployments(stack)
    assert set(found) == {"manual", "retrain-on-new-data"}
    cron = [s["schedule"]["cron"] for s in found["retrain-on-new-data"]["schedules"]]
    assert cron == ["0 3 * * *"] and not found["manual"]["schedules"]
    # the scheduled check takes nothing from the UI: params.yaml decides
    assert found["retrain-on-new-data"]["parameters"] == {}
    assert found["retrain-on-new-data"]["parameter_openapi_schema"]["properties"] == {}
    form = found["manual"]["parameter_openapi_schema"]["properties"]
    assert set(form) == {
        "base_model",
        "data",
        "learning_rate",
        "max_steps",
        "overrides",
        "serve_check",
        "only_if_data_changed",
        "continue_from_champion",
    }  # no project_dir: the runner fixes the project
    assert found["manual"]["parameters"] == {}
    assert any(t.get("type") == "number" for t in form["learning_rate"]["anyOf"])
    # the MLflow UI is up before the runner registers the deployments (mlflow.db is migrated
    # before any run can start)
    wait_http(stack["mlflow"] + "/health", stack["proc"], "mlflow ui", 5, ready=range(200, 201))


def test_the_mlflow_ui_runs_two_web_workers_and_no_job_runner(stack):
    """MLflow 3's server starts a job runner (huey consumers) by default and 4 web workers: 15
    processes and 3.4 GB for one person's UI, measured; `up` asks for 2 workers and no jobs."""
    import psutil

    wait_http(stack["mlflow"] + "/health", stack["proc"], "mlflow ui", 90, ready=range(200, 201))
    tree = psutil.Process(stack["proc"].pid).children(recursive=True)
    commands = [" ".join(p.cmdline()) for p in tree if p.is_running()]
    assert not [c for c in commands if "huey" in c or "_job_runner" in c], commands
    [uvicorn] = [c for c in commands if "uvicorn" in c and "mlflow" in c]
    assert "--workers 2" in uvicorn, uvicorn


def flow_run_count(stack) -> int:
    return len(stack["api"]("/flow_runs/filter", {}))


def test_the_api_refuses_callers_without_the_login(stack):
    base, manual = stack["base"], deployments(stack)["manual"]
    runs_before = flow_run_count(stack)
    wrong = basic(stack["auth"].split(":")[0] + ":wrong-password")
    for headers in ({}, wrong, {"Authorization": "Bearer " + stack["auth"]}):
        assert request(f"{base}/deployments/{manual['id']}", None, headers)[0] == 401
        assert request(f"{base}/csrf-token?client=x", None, headers)[0] == 401
    create = f"{base}/deployments/{manual['id']}/create_flow_run"
    # a write without the login: refused (by the CSRF check, which comes first, or the login)
    assert request(create, {"parameters": {}}, {})[0] in {401, 403}
    # a valid CSRF token does not stand in for the password
    token = stack["api"].csrf()
    assert request(create, {"parameters": {}}, {**wrong, **token})[0] == 401
    assert request(f"{base}/health")[0] == 200  # only the health probe is open
    assert flow_run_count(stack) == runs_before
    status, ui = request(stack["ui"] + "/ui-settings")  # what makes the UI show its login page
    assert status == 200 and ui["auth"] == "BASIC" and ui["csrf_enabled"] is True


def test_a_write_without_a_csrf_token_is_refused(stack):
    base, manual = stack["base"], deployments(stack)["manual"]
    runs_before = flow_run_count(stack)
    create = f"{base}/deployments/{manual['id']}/create_flow_run"
    login = basic(stack["auth"])
    status, answer = request(create, {"parameters": {}}, login)
    assert (status, answer["detail"]) == (403, "Missing CSRF token.")
    forged = {"Prefect-Csrf-Token": "0" * 64, "Prefect-Csrf-Client": str(uuid.uuid4())}
    status, answer = request(create, {"parameters": {}}, {**login, **forged})
    assert (status, answer["detail"]) == (403, "Invalid CSRF token or client identifier.")
    assert flow_run_count(stack) == runs_before


def run_and_wait(stack, name: str, parameters: dict, timeout: float = 400) -> dict:
    return wait_for(stack, start_run(stack, name, parameters), timeout)["state"]


def start_run(stack, name: str, parameters: dict) -> str:
    deployment = deployments(stack)[name]
    body = {"parameters": parameters}
    return stack["api"](f"/deployments/{deployment['id']}/create_flow_run", body)["id"]


def wait_for(stack, run_id: str, timeout: float = 400) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = stack["api"](f"/flow_runs/{run_id}")
        if run["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
            return run
        time.sleep(2)
    pytest.fail(f"flow run {run_id} still {run['state']['type']}: " + stack["log"].read_text())


def mlflow_runs(project: Path) -> int:
    try:
        with sqlite3.connect(project / "mlflow.db") as db:
            return db.execute("SELECT count(*) FROM runs").fetchone()[0]
    except sqlite3.OperationalError:  # no tables yet
        return 0


KEYS = "base_model.source, prepare.*, train.*, evaluate.*"
INSIDE = "give a file inside the project, by its path relative to the project"


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        (
            {"overrides": ["train.max_steps=2", "base_model.trust_remote_code=true"]},
            "refused: the form cannot set 'base_model.trust_remote_code' "
            f"(it may set {KEYS}); change it in the project's params.yaml",
        ),
        (
            {"data": "/etc/passwd", "max_steps": 2},
            f"refused: 'prepare.data' is outside the project (got '/etc/passwd'); {INSIDE}",
        ),
        ({"project_dir": "/etc"}, None),  # not a parameter: Prefect cannot call the flow with it
    ],
    ids=["trust-remote-code", "data-outside", "project-dir"],
)
def test_the_form_refuses_what_its_allow_list_does_not_name(stack, parameters, message):
    params_yaml = (stack["project"] / "params.yaml").read_bytes()
    runs = mlflow_runs(stack["project"])
    run = wait_for(stack, start_run(stack, "manual", parameters), timeout=240)
    state = run["state"]
    if message is None:
        assert state["type"] in {"FAILED", "CRASHED"}, state
    else:
        assert (state["type"], state["message"]) == ("FAILED", message)
        logs = stack["api"]("/logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}}})
        assert not [entry for entry in logs if "Traceback" in entry["message"]]
    assert (stack["project"] / "params.yaml").read_bytes() == params_yaml
    assert mlflow_runs(stack["project"]) == runs
    # leave the UI's run list (and the README's screenshot of it) as the other tests made it
    stack["api"](f"/flow_runs/{run['id']}", method="DELETE")


def test_ui_run_button_runs_the_pipeline_then_schedule_skips_unchanged_data(stack, ui_run):
    assert ui_run["type"] == "COMPLETED", stack["log"].read_text()[-3000:]
    assert json.loads((stack["project"] / "metrics/eval.json").read_text())["perplexity"] > 0
    scheduled = run_and_wait(stack, "retrain-on-new-data", {})
    assert scheduled["type"] == "COMPLETED"
    assert "no new data" in stack["log"].read_text()


def test_the_login_is_written_nowhere(stack, ui_run):
    """Not in the log of `up` (where the Prefect and stage logs go), the Prefect database, the
    project (params.yaml, MLflow's database and artifacts, DVC's cache), nor anything else."""
    password = stack["auth"].partition(":")[2].encode()
    header = base64.b64encode(stack["auth"].encode())
    leaks = []
    for path in stack["root"].rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if password in data or header in data:
                leaks.append(str(path.relative_to(stack["root"])))
    assert leaks == []


CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_prefect_ui_shows_the_deployments_and_the_last_run(stack, ui_run, tmp_path):
    """Headless Debian chromium logs in on the UI's login page, then opens the UI that `llmpipe up`
    serves (set LLMPIPE_SCREENSHOTS=DIR to keep the pictures the README shows)."""
    import shutil

    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "install Debian's chromium (apt-get install chromium); .ci/run does"
    shots = Path(os.environ.get("LLMPIPE_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(stack["ui"] + "/deployments")
        password = page.get_by_placeholder("admin:pass")  # the login page, not the deployments
        password.wait_for(timeout=90_000)
        assert page.get_by_text("retrain-on-new-data").count() == 0
        password.fill(stack["auth"])  # the whole user:password, as `up` prints it
        page.get_by_role("button", name="Login").click()
        page.get_by_text("retrain-on-new-data").first.wait_for(timeout=90_000)
        # a fresh load: the notices the login page raised before the login do not stay on screen
        page.goto(stack["ui"] + "/deployments")
        page.get_by_text("retrain-on-new-data").first.wait_for(timeout=90_000)
        page.get_by_text("manual", exact=True).first.wait_for(timeout=30_000)
        page.screenshot(path=shots / "prefect-deployments.png")
        page.goto(stack["ui"] + "/runs")
        page.get_by_text("Completed").first.wait_for(timeout=90_000)
        page.screenshot(path=shots / "prefect-runs.png")
        page.goto(stack["mlflow"] + "/#/models/llmpipe")
        page.get_by_text("champion").first.wait_for(timeout=90_000)
        page.screenshot(path=shots / "mlflow-model.png")
        browser.close()
    assert (shots / "prefect-runs.png").stat().st_size > 10_000


def processes_in(project: Path) -> list[str]:
    import psutil

    left = []
    for proc in psutil.process_iter(["pid", "cwd", "cmdline"]):
        cwd = proc.info["cwd"]
        if cwd and Path(cwd).is_relative_to(project):
            left.append(f"{proc.info['pid']}: {' '.join(proc.info['cmdline'] or [])}")
    return left


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(3)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("how", ["ctrl-c-to-group", "sighup-to-up"])
def test_ctrl_c_or_a_closed_terminal_stops_every_process(how, tmp_path, tiny_model_dir):
    """Ctrl-C (SIGINT to the terminal's foreground group), and SIGHUP to `llmpipe up` alone (its
    terminal closed), each stop everything it started. The SIGHUP case runs `up` on a terminal of
    its own with no LLMPIPE_UI_AUTH: it shows a generated login there once, and that login works."""
    own = start_up(tmp_path, tiny_model_dir, terminal=how == "sighup-to-up")
    proc = own["proc"]
    assert processes_in(own["project"])  # the server, the runner, the MLflow UI
    if how == "ctrl-c-to-group":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        assert own["auth"].startswith("llmpipe:")
        assert bytes(own["screen"]).count(own["auth"].encode()) == 1
        os.kill(proc.pid, signal.SIGHUP)
    assert proc.wait(timeout=90) == 0
    assert processes_in(own["project"]) == []
    assert not [port for port in own["ports"] if port_open(port)]
    for url in (own["ui"], own["mlflow"]):
        with pytest.raises(OSError):
            urllib.request.urlopen(url, timeout=3)
