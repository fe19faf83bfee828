"""The cost of orchestration: how much of a run is Prefect, DVC and MLflow rather than the stages.

    python benchmarks/orchestration.py [--quick]

Starts a Prefect server on a free 127.0.0.1 port, copies the project into a temporary directory and
runs the `finetune` flow against that server twice: a first run, then a fully cached re-run. The
baseline is the time spent inside the stages themselves (each stage's subprocess, register and
smoke_serve included); llmpipe's cost is everything else in the flow's wall time.
- overhead share = (flow wall time - time inside the stages) / flow wall time (goal <= 5%);
- cached re-run wall time / first-run wall time (printed; no goal).
Full: the embedded default (SmolLM2-135M, ~10 min on 2 CPU cores). --quick: a tiny random Llama and
a few steps, so the fixed costs weigh much more than on a real run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.workloads import build_tiny_model, make_project, tiny_params  # noqa: E402
from steps.environment import quiet_offline_env  # noqa: E402
from steps.servers import LOOPBACK, free_port, stop_process_group, wait_http  # noqa: E402

RUN_FLOW = """
import json, sys, time
from flows.finetune import finetune
started = time.perf_counter()
summary = finetune(project_dir=sys.argv[1], overrides=sys.argv[2:])
summary["flow_wall_seconds"] = time.perf_counter() - started
print("SUMMARY " + json.dumps(summary))
"""


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
    wait_http(f"http://{LOOPBACK}:{port}/api/health", proc, "prefect server", 180)
    return proc


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
        edits = tiny_params(build_tiny_model(work / "tiny")) if args.quick else {}
        project = make_project(work / "project", edits)
        port = free_port()
        env = {
            **quiet_offline_env(),
            "PREFECT_API_URL": f"http://{LOOPBACK}:{port}/api",
            "PREFECT_HOME": str(work / "prefect-home"),
            "HF_HUB_OFFLINE": "1",
            "MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlflow.db",
        }
        env.pop("MLFLOW_RUN_ID", None)
        server = start_server(env, port)
        try:
            first = run_flow(project, [], env)
            cached = run_flow(project, [], env)
        finally:
            stop_process_group(server, grace=30)
    for label, s in (("first run", first), ("cached re-run", cached)):
        wall, inner = s["flow_wall_seconds"], inside_stages(s)
        print(
            f"{label:>13}: flow {wall:7.1f} s, inside stages {inner:7.1f} s, "
            f"orchestration {wall - inner:5.1f} s ({(wall - inner) / wall:.1%})"
        )
    overhead = (first["flow_wall_seconds"] - inside_stages(first)) / first["flow_wall_seconds"]
    rerun = cached["flow_wall_seconds"] / first["flow_wall_seconds"]
    print(f"cached re-run / first run wall time: {rerun:.3f}x (no goal: printed, not checked)")
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
                ],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
