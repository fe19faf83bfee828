"""deploy/: the training image and the docker and kubernetes base job templates, checked without a
container engine (none runs here): the templates through Prefect's own validation and rendering,
the Dockerfile by what it copies and pins. Nothing here builds or runs a container."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml
from pydantic import ConfigDict

from benchmarks.workloads import REPO
from flows.manual import PROJECT_ENV
from flows.pool import JOB_VARIABLES

pytestmark = pytest.mark.unit

DEPLOY = REPO / "deploy"
TEMPLATES = {"docker": "docker-job-template.json", "kubernetes": "kubernetes-job-template.json"}


def template(kind: str) -> dict:
    return json.loads((DEPLOY / TEMPLATES[kind]).read_text())


class NoServer:
    """The client Prefect's rendering would ask for block documents and variables: the templates
    use neither, so any call is a failure (and no temporary server starts)."""

    def __getattr__(self, name: str):
        raise AssertionError(f"rendering the template asked the Prefect server ({name})")


def render(kind: str, job_variables: dict) -> dict:
    """The job configuration a worker of `kind` gets for a pool deployment's run: Prefect's own
    rendering (variable defaults, the deployment's job variables, `env` merged), every field kept
    (the docker and kubernetes workers' configuration classes are not installed here)."""
    import asyncio

    from prefect.workers.base import BaseJobConfiguration

    class Rendered(BaseJobConfiguration):
        model_config = ConfigDict(extra="allow")

    config = asyncio.run(
        Rendered.from_template_and_values(template(kind), job_variables, client=NoServer())
    )
    return {**config.model_dump(), **(config.model_extra or {})}


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def tracked(path: str) -> bool:
    out = subprocess.run(["git", "ls-files", "--", path], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    return bool(out.strip())


@pytest.mark.parametrize("kind", TEMPLATES)
def test_prefect_accepts_the_template_and_the_pool_deployments_job_variables(kind):
    from jsonschema import Draft202012Validator
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.schema_tools import validate

    base = template(kind)
    # what the server runs on `prefect work-pool create --base-job-template`: every placeholder of
    # job_configuration is a property of variables
    WorkPoolCreate(name="gpu", type=kind, base_job_template=base)
    Draft202012Validator.check_schema(base["variables"])
    # what it runs on a deployment's job variables (`llmpipe deploy --pool`)
    validate(JOB_VARIABLES, base["variables"], raise_on_error=True, preprocess=True,
             ignore_required=True)  # fmt: skip
    for prop in base["variables"]["properties"].values():
        if "default" in prop:
            Draft202012Validator(prop).validate(prop["default"])  # a default its own type


def test_a_docker_job_asks_for_the_gpus_and_gets_the_run_environment():
    job = render("docker", JOB_VARIABLES)
    assert job["container_create_kwargs"]["device_requests"] == [
        {"driver": "nvidia", "count": 1, "capabilities": [["gpu"]]}  # docker run --gpus 1
    ]
    assert job["env"] == {
        PROJECT_ENV: "/opt/llmpipe",
        "MLFLOW_TRACKING_URI": "http://host.docker.internal:5000",
        "LLMPIPE_DVC_SYNC": "1",
    }
    assert job["image"] == "llmpipe-train:0.1.0"
    every_gpu = render("docker", {"gpu_count": -1})["container_create_kwargs"]
    assert every_gpu["device_requests"][0]["count"] == -1  # --gpus all


def test_a_kubernetes_job_limits_nvidia_gpus_and_gets_the_run_environment():
    job = render("kubernetes", {**JOB_VARIABLES, "gpu_count": 2})
    pod = job["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["image"] == "llmpipe-train:0.1.0"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
        pod["tolerations"]
    )
    # the worker turns this mapping into the container's env list
    assert job["env"] == {
        PROJECT_ENV: "/opt/llmpipe",
        "MLFLOW_TRACKING_URI": "http://mlflow.llmpipe.svc.cluster.local:5000",
        "LLMPIPE_DVC_SYNC": "1",
    }


def test_the_image_holds_the_project_where_the_templates_say():
    instructions = dockerfile()
    env = " ".join(args for op, args in instructions if op == "ENV")
    assert f"{PROJECT_ENV}=/opt/llmpipe" in env
    assert ("WORKDIR", "/opt/llmpipe") in instructions
    for kind in TEMPLATES:
        assert template(kind)["job_configuration"]["env"][PROJECT_ENV] == "/opt/llmpipe"


def test_the_base_image_and_torch_are_pinned():
    bases = [args for op, args in dockerfile() if op == "FROM"]
    assert bases and all(re.fullmatch(r"python:3\.11\.\d+-slim-\w+", b) for b in bases), bases
    pin = re.search(r"^torch==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
    assert ("ARG", f"TORCH_VERSION={pin}") in dockerfile()
    project_install = [a for op, a in dockerfile() if op == "RUN" and "-e ." in a]
    assert project_install and "-c constraints.txt" in project_install[0]


def test_every_copy_source_is_in_the_repository_and_covers_the_stages_code():
    sources = []
    for op, args in dockerfile():
        if op == "COPY":
            *srcs, _dest = [a for a in args.split() if not a.startswith("--")]
            sources += srcs
    missing = [s for s in sources if not tracked(s)]
    assert not missing, f"COPY sources not in the repository: {missing}"
    # every file a stage depends on that git holds and no stage makes (the steps' code) is in
    # the image
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    made = [o for s in stages.values() for k in ("outs", "metrics", "plots") for o in s.get(k, [])]
    outs = {next(iter(o)) if isinstance(o, dict) else o for o in made}
    deps = {d for s in stages.values() for d in s.get("deps", []) if d not in outs and tracked(d)}
    copied = [s.rstrip("/") for s in sources]
    uncovered = [d for d in deps if not any(d == c or d.startswith(c + "/") for c in copied)]
    assert not uncovered, f"stage dependencies the image lacks: {sorted(uncovered)}"
