"""`llmpipe up` for real: a Prefect server on loopback, the runner, the MLflow UI; deployments
triggered through the REST API (what the UI's Run button calls) run the tiny pipeline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from benchmarks.workloads import make_project, tiny_params
from steps.servers import free_port, wait_http

pytestmark = pytest.mark.integration

LLMPIPE = Path(sys.executable).parent / "llmpipe"


def api(base: str, path: str, body: dict | None = None, method: str | None = None) -> dict | list:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"{base}{path}",
        data=data,
        method=method or ("POST" if data else "GET"),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read() or b"null")


def start_up(root: Path, tiny_model_dir: Path) -> dict:
    """`llmpipe up` in a new project under `root`, once both deployments are registered."""
    project = make_project(root / "project", tiny_params(tiny_model_dir, learning_rate=3.0e-3))
    prefect_port, mlflow_port = free_port(), free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(root / "prefect-home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlflow.db",
    }
    env.pop("PREFECT_API_URL", None)
    log = (root / "up.log").open("w")
    proc = subprocess.Popen(
        [LLMPIPE, "up", "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)],
        cwd=project,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{prefect_port}/api"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, (root / "up.log").read_text()[-3000:]
        try:
            if len(api(base, "/deployments/filter", {})) == 2:
                break
        except OSError:
            pass
        time.sleep(1)
    else:
        pytest.fail("deployments did not appear: " + (root / "up.log").read_text()[-3000:])
    return {
        "api": base,
        "project": project,
        "mlflow": f"http://127.0.0.1:{mlflow_port}",
        "ui": f"http://127.0.0.1:{prefect_port}",
        "proc": proc,
        "log": root / "up.log",
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir):
    """One `llmpipe up` for the module's read-only checks (the Ctrl-C test starts its own)."""
    up = start_up(tmp_path_factory.mktemp("stack"), tiny_model_dir)
    yield up
    if up["proc"].poll() is None:
        os.killpg(up["proc"].pid, signal.SIGINT)
        up["proc"].wait(timeout=60)


@pytest.fixture(scope="module")
def ui_run(stack) -> dict:
    """What the UI's Run button does: a run of `manual` through the REST API, to its end."""
    return run_and_wait(stack, "manual", {})  # serves the candidate before promoting it


def deployments(stack) -> dict[str, dict]:
    return {d["name"]: d for d in api(stack["api"], "/deployments/filter", {})}


def test_deployments_have_their_schedule_and_a_typed_form(stack):
    found = deployments(stack)
    assert set(found) == {"manual", "retrain-on-new-data"}
    cron = [s["schedule"]["cron"] for s in found["retrain-on-new-data"]["schedules"]]
    assert cron == ["0 3 * * *"] and not found["manual"]["schedules"]
    assert found["retrain-on-new-data"]["parameters"]["only_if_data_changed"] is True
    form = found["manual"]["parameter_openapi_schema"]["properties"]
    assert {"learning_rate", "max_steps", "base_model", "data", "only_if_data_changed"} <= set(form)
    assert any(t.get("type") == "number" for t in form["learning_rate"]["anyOf"])
    # the MLflow UI starts after the runner has registered the deployments
    wait_http(stack["mlflow"] + "/health", stack["proc"], "mlflow ui", 90, ready=range(200, 201))


def run_and_wait(stack, name: str, parameters: dict, timeout: float = 400) -> dict:
    deployment = deployments(stack)[name]
    run = api(
        stack["api"], f"/deployments/{deployment['id']}/create_flow_run", {"parameters": parameters}
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = api(stack["api"], f"/flow_runs/{run['id']}")["state"]
        if state["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
            return state
        time.sleep(2)
    pytest.fail(f"flow run {run['id']} still {state['type']}: " + stack["log"].read_text()[-3000:])


def test_ui_run_button_runs_the_pipeline_then_schedule_skips_unchanged_data(stack, ui_run):
    assert ui_run["type"] == "COMPLETED", stack["log"].read_text()[-3000:]
    assert json.loads((stack["project"] / "metrics/eval.json").read_text())["perplexity"] > 0
    scheduled = run_and_wait(stack, "retrain-on-new-data", {})
    assert scheduled["type"] == "COMPLETED"
    assert "no new data" in stack["log"].read_text()


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
    """Headless Debian chromium opens the UI that `llmpipe up` serves (set LLMPIPE_SCREENSHOTS=DIR
    to keep the pictures the README shows)."""
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


def test_ctrl_c_stops_every_process(tmp_path, tiny_model_dir):
    own = start_up(tmp_path, tiny_model_dir)
    proc = own["proc"]
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    for url in (own["ui"], own["mlflow"]):
        with pytest.raises(OSError):
            urllib.request.urlopen(url, timeout=3)
