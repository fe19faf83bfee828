"""`llmpipe up`: the whole local stack on 127.0.0.1, stopped together by Ctrl-C.

    llmpipe up [--prefect-port 4200] [--mlflow-port 5000]

1. a Prefect server with its UI (the UI is told its API's URL, so a non-default port works);
2. a runner (`python -m flows.deploy`) that registers the deployments and executes their runs;
3. the MLflow UI on the project's tracking store.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from steps.tracking import tracking_uri

HOST = "127.0.0.1"


def wait_http(url: str, proc: subprocess.Popen, name: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status < 500:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{name} did not answer {url} within {timeout:.0f}s")


def stack_env(prefect_port: int) -> dict[str, str]:
    api = f"http://{HOST}:{prefect_port}/api"
    return {
        **os.environ,
        "PREFECT_API_URL": api,
        "PREFECT_UI_API_URL": api,  # the browser calls this URL; it must match the port
        "PREFECT_SERVER_API_HOST": HOST,
        "PREFECT_SERVER_API_PORT": str(prefect_port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "MLFLOW_TRACKING_URI": tracking_uri(),
    }


def start(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True)


def stop_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def up(project: Path, prefect_port: int = 4200, mlflow_port: int = 5000) -> int:
    env = stack_env(prefect_port)
    bin_dir = Path(sys.executable).parent
    procs: list[subprocess.Popen] = []
    # SIGTERM (a service manager, `timeout`) must stop the children too: make it unwind like Ctrl-C.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        server = start(
            [
                str(bin_dir / "prefect"),
                "server",
                "start",
                "--host",
                HOST,
                "--port",
                str(prefect_port),
            ],
            env,
            project,
        )
        procs.append(server)
        wait_http(f"http://{HOST}:{prefect_port}/api/health", server, "prefect server")
        procs.append(start([sys.executable, "-m", "flows.deploy"], env, project))
        mlflow_ui = start(
            [
                str(bin_dir / "mlflow"),
                "ui",
                "--backend-store-uri",
                env["MLFLOW_TRACKING_URI"],
                "--host",
                HOST,
                "--port",
                str(mlflow_port),
            ],
            env,
            project,
        )
        procs.append(mlflow_ui)
        wait_http(f"http://{HOST}:{mlflow_port}/health", mlflow_ui, "mlflow ui")
        print(
            f"llmpipe is up (Ctrl-C stops everything):\n"
            f"  Prefect UI  http://{HOST}:{prefect_port}  (deployments: finetune/manual, "
            f"finetune/retrain-on-new-data)\n"
            f"  MLflow UI   http://{HOST}:{mlflow_port}\n"
            f"  serve the champion with: llmpipe serve",
            flush=True,
        )
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        dead = next(p for p in procs if p.poll() is not None)
        print(
            f"error: {' '.join(map(str, dead.args[:3]))} exited with {dead.returncode}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("\nstopping llmpipe ...", flush=True)
        return 0
    finally:
        stop_all(procs)
