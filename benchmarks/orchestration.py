"""The cost of orchestration: how much of a run is Prefect, DVC and MLflow rather than the stages.

    python benchmarks/orchestration.py [--quick]

Starts a Prefect server on a free 127.0.0.1 port, copies the project into a temporary directory and
runs the `finetune` flow against that server twice: a first run, then a fully cached re-run. The
baseline is the time spent inside the stages themselves (each stage's subprocess, register and
smoke_serve included); llmpipe's cost is everything else in the flow's wall time.
- overhead share = (flow wall time - time inside the stages) / flow wall time (goal <= 5%);
- cached re-run wall time / first-run wall time (reported).
Full: the embedded default (SmolLM2-135M, ~10 min on 2 CPU cores). --quick: a tiny random Llama and a
few steps, so the fixed costs weigh much more than on a real run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN_FLOW = """
import json, sys, time
from flows.finetune import finetune
started = time.perf_counter()
summary = finetune(project_dir=sys.argv[1], overrides=sys.argv[2:])
summary["flow_wall_seconds"] = time.perf_counter() - started
print("SUMMARY " + json.dumps(summary))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env: dict[str, str], port: int) -> subprocess.Popen:
    cmd = [
        str(Path(sys.executable).parent / "prefect"),
        "server",
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5):
                return proc
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("the Prefect server did not start within 180 s")


def run_flow(project: Path, overrides: list[str], env: dict[str, str]) -> dict:
    """One finetune flow run in a fresh process; its summary with the flow's wall time."""
    done = subprocess.run(
        [sys.executable, "-c", RUN_FLOW, str(project), *overrides],
        env=env,
        cwd=project,
        capture_output=True,
        text=True,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("SUMMARY ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"flow failed: {(done.stderr or done.stdout)[-1500:]}")
    return json.loads(lines[-1][len("SUMMARY ") :])


def inside_stages(summary: dict) -> float:
    stages = sum(s["seconds"] for s in summary["stages"])
    return stages + summary["register"]["seconds"] + summary.get("serve", {}).get("seconds", 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, a few steps")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sys.path.insert(0, str(REPO))
        from tests.project import make_project, tiny_params
        from tests.tiny import build_tiny_model

        edits = tiny_params(build_tiny_model(work / "tiny")) if args.quick else {}
        project = make_project(work / "project", edits)
        port = free_port()
        env = {
            **os.environ,
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_HOME": str(work / "prefect-home"),
            "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "HF_HUB_OFFLINE": "1",
            "MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlflow.db",
        }
        env.pop("MLFLOW_RUN_ID", None)
        server = start_server(env, port)
        try:
            first = run_flow(project, [], env)
            cached = run_flow(project, [], env)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    for label, s in (("first run", first), ("cached re-run", cached)):
        wall, inner = s["flow_wall_seconds"], inside_stages(s)
        print(
            f"{label:>13}: flow {wall:7.1f} s, inside stages {inner:7.1f} s, "
            f"orchestration {wall - inner:5.1f} s ({(wall - inner) / wall:.1%})"
        )
    overhead = (first["flow_wall_seconds"] - inside_stages(first)) / first["flow_wall_seconds"]
    rerun = cached["flow_wall_seconds"] / first["flow_wall_seconds"]
    print(
        json.dumps(
            {
                "benchmark": "orchestration",
                "checks": [
                    {
                        "name": "overhead_share_of_first_run",
                        "ratio": round(overhead, 4),
                        "goal": "<=0.05",
                    },
                    {
                        "name": "cached_rerun_wall_over_first_run",
                        "ratio": round(rerun, 4),
                        "goal": "reported",
                    },
                ],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
