"""steps/overhead.py: a stack sample goes to its innermost Prefect, MLflow or llmpipe frame, and a
profiled process accounts for its whole wall time; benchmarks/orchestration.py's split of a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.workloads import load_benchmark
from steps.overhead import PROFILE_ENV, category, read_profiles

bench = load_benchmark("orchestration")
REPO = Path(__file__).resolve().parents[2]
SITE = "/venv/lib/python3.11/site-packages"


def frames_through(files: list[str]):
    """The innermost frame of nested calls, the i-th defined in files[i] (outermost first)."""
    namespace: dict = {"sys": sys}
    code = "def f{i}():\n    return {call}\n"
    for i, path in reversed(list(enumerate(files))):
        inner = f"f{i + 1}()" if i + 1 < len(files) else "sys._getframe()"
        exec(compile(code.format(i=i, call=inner), path, "exec"), namespace)
    return namespace["f0"]()


@pytest.mark.unit
def test_a_sample_belongs_to_its_innermost_prefect_mlflow_or_llmpipe_frame():
    llmpipe = str(REPO / "flows" / "finetune.py")
    prefect = f"{SITE}/prefect/task_engine.py"
    mlflow = f"{SITE}/mlflow/tracking/client.py"
    library = f"{SITE}/sqlalchemy/engine/base.py"
    # Prefect's engine runs the flow body, which calls an MLflow client, which calls sqlalchemy
    assert category(frames_through([prefect, llmpipe, mlflow, library])) == "mlflow"
    # Prefect's engine runs a task body waiting on its stage's process (the stdlib's subprocess)
    assert category(frames_through([prefect, llmpipe, "/usr/lib/python3.11/subprocess.py"])) == (
        "llmpipe"
    )
    # a task body logs a line through Prefect's handler
    assert category(frames_through([llmpipe, f"{SITE}/prefect/logging/handlers.py"])) == "prefect"
    assert category(frames_through([library, "/usr/lib/python3.11/threading.py"])) == "other"
    # a folder named like a library outside site-packages is not that library
    assert category(frames_through(["/home/me/prefect/notes.py"])) == "other"


PROFILED = """
import time
import steps  # starts the sampler
started = time.perf_counter()
import mlflow
print(time.perf_counter() - started)
time.sleep(0.5)
"""


@pytest.mark.unit
def test_a_profiled_process_accounts_for_its_wall_time_and_finds_mlflow(tmp_path):
    out = tmp_path / "profiles"
    env = {**os.environ, PROFILE_ENV: str(out)}
    done = subprocess.run(
        [sys.executable, "-c", PROFILED], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    import_seconds = float(done.stdout.split()[-1])
    [profile] = read_profiles(out)
    seconds = profile["seconds"]
    assert sum(seconds.values()) == pytest.approx(profile["wall_seconds"], abs=1e-6)
    assert profile["samples"] > 100
    # importing MLflow is MLflow's; the sleep in this script (no llmpipe frame) is "other"
    assert 0.6 * import_seconds <= seconds["mlflow"] <= 1.2 * import_seconds
    assert seconds["other"] >= 0.4
    assert seconds["prefect"] == 0.0


@pytest.mark.unit
def test_without_the_variable_nothing_is_sampled_or_written(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != PROFILE_ENV}
    code = "import steps.overhead as o, threading; print(o._started, threading.active_count())"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.stdout.split() == ["None", "1"], done.stderr


def run_record(tmp_path: Path) -> dict:
    """A run as benchmarks/orchestration.py sees it: a flow process and two step processes."""
    profile = {"startup": 0.5, "prefect": 0.0, "mlflow": 0.0, "llmpipe": 0.0, "other": 0.0}
    flow = {**profile, "prefect": 6.0, "mlflow": 2.0, "llmpipe": 390.0, "other": 1.5}
    train = {**profile, "mlflow": 1.0, "llmpipe": 300.0}
    register = {**profile, "mlflow": 9.0, "llmpipe": 1.0}
    profiles = [
        {"pid": 10, "argv": ["-c"], "wall_seconds": 400.0, "seconds": flow},
        {"pid": 11, "argv": ["/p/steps/train.py"], "wall_seconds": 302.0, "seconds": train},
        {"pid": 12, "argv": ["/p/steps/register.py"], "wall_seconds": 10.5, "seconds": register},
    ]
    summary = {
        "stages": [
            {"name": "prepare", "skipped": True, "seconds": 3.0},  # cached: all DVC's
            # its profile ends after its record (302 > 301): the profile counts
            {"name": "train", "skipped": False, "seconds": 305.0, "process_seconds": 301.0},
            # a step without a profile: its record's lifetime; then 0.5 s of the flow logging
            # what it left for the MLflow run (in the flow's profile, as MLflow's: not DVC's)
            {
                "name": "evaluate",
                "skipped": False,
                "seconds": 20.0,
                "process_seconds": 18.5,
                "log_seconds": 0.5,
            },
        ],
        "register": {"seconds": 11.0},
        "serve": {"seconds": 40.0},
        "promotion": {"seconds": 2.0},
    }
    return {"summary": summary, "profiles": profiles, "flow_pid": 10}


@pytest.mark.unit
def test_the_split_of_a_run_measures_each_share(tmp_path):
    s = bench.split(run_record(tmp_path))
    assert s["wall"] == 400.0
    assert s["prefect"] == 6.0
    assert s["dvc"] == pytest.approx(3.0 + 3.0 + 1.0)
    assert s["mlflow"] == pytest.approx(2.0 + 1.0 + 9.0)
    assert s["stages"] == pytest.approx(3.0 + 305.0 + 20.0 + 11.0 + 40.0 + 2.0)
    assert s["llmpipe_flow_code"] == pytest.approx(390.0 - 380.5)
    assert bench.mlflow_by_process(run_record(tmp_path)) == {
        "flow": 2.0,
        "train": 1.0,
        "register": 9.0,
    }


@pytest.mark.integration
def test_a_real_flow_run_is_split_into_prefect_dvc_and_mlflow(tmp_path, tiny_model_dir):
    from benchmarks.workloads import make_project, tiny_params

    project = make_project(tmp_path / "project", tiny_params(tiny_model_dir))
    started = time.perf_counter()
    [run] = bench.measure(project, tmp_path, [], rerun=False)
    outside = time.perf_counter() - started
    s = bench.split(run)
    assert 0 < s["wall"] < outside  # the flow process, inside the benchmark's own wall time
    for share in ("prefect", "dvc", "mlflow"):
        assert 0 < s[share] < s["wall"] / 2, (share, s)
    assert s["stages"] + s["prefect"] < s["wall"]
    by_process = bench.mlflow_by_process(run)
    # the flow opens and tags its run; the Trainer's callback logs the loss; register logs the
    # model: each its own process, each profiled
    assert by_process["flow"] > 0 and by_process["train"] > 0 and by_process["register"] > 0
    stages = {t["name"]: t for t in run["summary"]["stages"]}
    assert 0 < stages["train"]["process_seconds"] < stages["train"]["seconds"]
    # prepare and evaluate leave their figures for the flow to log into its run; corpus does not
    assert stages["evaluate"]["log_seconds"] > 0 and stages["corpus"]["log_seconds"] == 0
    for stage in stages.values():
        assert bench.dvc_seconds(stage, run["profiles"]) > 0, stage
    assert json.dumps(s)  # plain numbers
