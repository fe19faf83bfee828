"""`llmpipe up`: the whole local stack on 127.0.0.1, stopped together by Ctrl-C.

    llmpipe up [--prefect-port 4200] [--mlflow-port 5000]      # defaults: steps/servers.py

1. a Prefect server with its UI (the UI is told its API's URL, so a non-default port works);
2. a runner (`python -m flows.deploy`) that registers the deployments and executes their runs;
3. the MLflow UI on the project's tracking store.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from steps.environment import quiet_offline_env
from steps.servers import LOOPBACK as HOST
from steps.servers import MLFLOW_UI_PORT, PREFECT_PORT, stop_process_group, wait_http
from steps.tracking import tracking_uri


def stack_env(project: Path, prefect_port: int) -> dict[str, str]:
    api = f"http://{HOST}:{prefect_port}/api"
    return {
        **quiet_offline_env(),
        "PREFECT_API_URL": api,
        "PREFECT_UI_API_URL": api,  # the browser calls this URL; it must match the port
        "PREFECT_SERVER_API_HOST": HOST,
        "PREFECT_SERVER_API_PORT": str(prefect_port),
        "MLFLOW_TRACKING_URI": tracking_uri(project),
    }


def start(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True)


def up(project: Path, prefect_port: int = PREFECT_PORT, mlflow_port: int = MLFLOW_UI_PORT) -> int:
    env = stack_env(project, prefect_port)
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
        for proc in procs:
            stop_process_group(proc, grace=20)
