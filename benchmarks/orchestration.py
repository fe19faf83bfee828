"""The cost of orchestration: the shares of a run spent in Prefect, in DVC and in MLflow.

    python benchmarks/orchestration.py [--quick] [--model DIR] [--steps N]

Starts a Prefect server on a free 127.0.0.1 port, copies the project into a temporary directory and
runs the `finetune` flow against that server twice, each in a fresh process as `llmpipe run` runs
it: a first run of the embedded default (SmolLM2-135M-Instruct on the CPython reference manual, the
default params), then a fully cached re-run. Each share is measured, none inferred from the others:
- Prefect: the flow process's wall time whose innermost llmpipe/Prefect/MLflow stack frame is
  Prefect's (steps/overhead.py samples the stack every 5 ms): importing Prefect, the flow and task
  engines, their calls to the server, the run report, logging, exit handlers.
- MLflow: the same sampling, over every llmpipe process (the flow's and each step's): the flow's
  run, params and lineage tags, the Trainer's MLflow callback, log_model and the registry.
- DVC: for each DVC stage, its task's wall time (`dvc repro --single-item`) less the lifetime of
  the step process DVC started (its creation to its exit handlers, from its profile) and less the
  flow's logging of what the step left for its MLflow run (MLflow's, sampled in the flow): DVC's
  start, hashing, cache copies, dvc.lock. The interpreter's last teardown, after the exit
  handlers, falls in DVC's share: an over-estimate.
Each is divided by the flow process's wall time (its creation to its exit). Goal: the three
together <= 3% of the first run. Also printed, not checked: llmpipe's own code outside the stages
(input checks, the lock, launching tasks), and the cached re-run's wall time against the first's.
--quick: the same run with train.max_steps 8 instead of 40 (fixed costs weigh more: a harder test
of the same goal); --model DIR: another base model (tests use a tiny random Llama).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.workloads import MeasureError, make_project, print_checks  # noqa: E402
from steps.environment import quiet_offline_env  # noqa: E402
from steps.overhead import PROFILE_ENV, read_profiles  # noqa: E402
from steps.servers import LOOPBACK, free_port, stop_process_group, wait_http  # noqa: E402

GOALS = {"orchestration_share_of_run": "<=0.03"}
QUICK_STEPS = 8

# `llmpipe run`'s flow call, printing the summary as JSON (flows/__init__.py starts the sampler)
RUN_FLOW = """
import json, sys
from flows.finetune import finetune
summary = finetune(project_dir=sys.argv[1], overrides=sys.argv[2:], keep_edits=True)
print("SUMMARY " + json.dumps(summary))
"""


def start_server(env: dict[str, str], port: int) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).parent / "prefect"), "server", "start",
           "--host", LOOPBACK, "--port", str(port)]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    wait_http(f"http://{LOOPBACK}:{port}/api/health", proc, "prefect server", 180)
    return proc


def run_flow(project: Path, overrides: list[str], env: dict[str, str], profiles: Path) -> dict:
    """One finetune flow run in a fresh process, every llmpipe process sampled into `profiles`;
    {summary, profiles, flow_pid}."""
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_FLOW, str(project), *overrides],
        env={**env, PROFILE_ENV: str(profiles)},
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate()
    lines = [line for line in out.splitlines() if line.startswith("SUMMARY ")]
    if proc.returncode != 0 or not lines:
        raise MeasureError(f"the flow failed (exit {proc.returncode}): {(err or out)[-1500:]}")
    summary = json.loads(lines[-1][len("SUMMARY ") :])
    return {"summary": summary, "profiles": read_profiles(profiles), "flow_pid": proc.pid}


def split(run: dict) -> dict[str, float]:
    """Seconds of the run: its wall time, Prefect, DVC, MLflow, llmpipe's flow code, the stages."""
    summary, profiles = run["summary"], run["profiles"]
    flows = [p for p in profiles if p["pid"] == run["flow_pid"]]
    if not flows:
        raise MeasureError("the flow process wrote no profile (was LLMPIPE_PROFILE_DIR passed?)")
    flow = flows[0]["seconds"]
    tasks = [*summary["stages"], summary["register"], summary.get("serve", {})]
    tasks.append(summary.get("promotion", {}))
    dvc = sum(dvc_seconds(stage, profiles) for stage in summary["stages"])
    return {
        "wall": flows[0]["wall_seconds"],
        "prefect": flow["prefect"],
        "dvc": dvc,
        "mlflow": sum(p["seconds"]["mlflow"] for p in profiles),
        # a task's logging into the flow's run is sampled as MLflow's, not as llmpipe's
        "llmpipe_flow_code": flow["llmpipe"]
        - sum(t.get("seconds", 0.0) - t.get("log_seconds", 0.0) for t in tasks),
        "stages": sum(t.get("seconds", 0.0) for t in tasks),
    }


def dvc_seconds(stage: dict, profiles: list[dict]) -> float:
    """DVC's own seconds in a DVC stage's task: its wall time less the step process's life and
    less the flow's logging of what the step left for its MLflow run (log_seconds: sampled in
    the flow's process as MLflow's; counting it here too would count it twice)."""
    return stage["seconds"] - step_lifetime(stage, profiles) - stage.get("log_seconds", 0.0)


def step_lifetime(stage: dict, profiles: list[dict]) -> float:
    """Seconds the step process of a DVC stage lived: its profile's creation to exit (its outcome
    record's process_seconds, which stops before its exit handlers, when it left no profile; 0
    when DVC ran nothing)."""
    if stage.get("skipped"):
        return 0.0
    mine = [p for p in profiles if Path(p["argv"][0]).stem == stage["name"]]
    return mine[0]["wall_seconds"] if mine else stage.get("process_seconds", 0.0)


def mlflow_by_process(run: dict) -> dict[str, float]:
    """MLflow's seconds per process: 'flow' or the step's module (steps/train.py -> train)."""
    out: dict[str, float] = {}
    for p in run["profiles"]:
        name = "flow" if p["pid"] == run["flow_pid"] else Path(p["argv"][0]).stem
        out[name] = out.get(name, 0.0) + p["seconds"]["mlflow"]
    return out


def report(label: str, run: dict) -> dict[str, float]:
    s = split(run)
    wall = s["wall"]
    together = s["prefect"] + s["dvc"] + s["mlflow"]
    print(f"{label}: {wall:.1f} s (the flow process, its start to its exit)")
    for key, what in (
        ("prefect", "Prefect (import, engines, server calls, report, logs)"),
        ("dvc", "DVC (dvc repro around each stage, less the step process)"),
        ("mlflow", "MLflow (every process)"),
    ):
        print(f"  {what:<58} {s[key]:7.1f} s {s[key] / wall:7.2%}")
    print(f"  {'Prefect + DVC + MLflow':<58} {together:7.1f} s {together / wall:7.2%}")
    print(f"  {'llmpipe flow code outside tasks (not counted)':<58} "
          f"{s['llmpipe_flow_code']:7.1f} s {s['llmpipe_flow_code'] / wall:7.2%}")  # fmt: skip
    by = ", ".join(f"{k} {v:.1f}" for k, v in mlflow_by_process(run).items() if v >= 0.05)
    print(f"  MLflow seconds by process: {by}")
    per_stage = ", ".join(
        f"{t['name']} {dvc_seconds(t, run['profiles']):.1f}" for t in run["summary"]["stages"]
    )
    print(f"  DVC seconds by stage: {per_stage}")
    return s


def measure(project: Path, work: Path, overrides: list[str], rerun: bool = True) -> list[dict]:
    """A Prefect server, then the first run (and the cached re-run) of the flow in `project`."""
    port = free_port()
    env = {
        **quiet_offline_env(),
        "PREFECT_API_URL": f"http://{LOOPBACK}:{port}/api",
        "PREFECT_HOME": str(work / "prefect-home"),
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlflow.db",
    }
    env.pop("MLFLOW_RUN_ID", None)
    env.pop(PROFILE_ENV, None)
    server = start_server(env, port)
    try:
        runs = [run_flow(project, overrides, env, work / "profiles-first")]
        if rerun:
            runs.append(run_flow(project, overrides, env, work / "profiles-rerun"))
    finally:
        stop_process_group(server, grace=30)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"train.max_steps {QUICK_STEPS}")
    parser.add_argument("--model", help="base model directory (default: the embedded SmolLM2)")
    parser.add_argument("--steps", type=int, help="train.max_steps (default: 40, --quick 8)")
    args = parser.parse_args(argv)
    overrides = []
    if args.model:
        overrides.append(f"base_model.source={Path(args.model).resolve()}")
    steps = args.steps or (QUICK_STEPS if args.quick else None)
    if steps:
        overrides.append(f"train.max_steps={steps}")
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            project = make_project(work / "project", {})
            first, rerun = measure(project, work, overrides)
    except MeasureError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"params: defaults{' with ' + ' '.join(overrides) if overrides else ''}")
    s = report("first run", first)
    r = report("cached re-run", rerun)
    print(f"cached re-run / first run wall time: {r['wall'] / s['wall']:.3f}x (printed, no goal)")
    print(f"benchmark wall time: {time.perf_counter() - started:.0f} s")
    share = (s["prefect"] + s["dvc"] + s["mlflow"]) / s["wall"]
    print_checks("orchestration", {"orchestration_share_of_run": share}, GOALS)
    return 0


if __name__ == "__main__":
    from benchmarks.workloads import run_benchmark

    run_benchmark(main)
