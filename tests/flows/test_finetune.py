"""Whole flow on the tiny model: real Prefect (test server), real DVC, MLflow on sqlite, real HTTP.

One first run makes the golden project (tests/flows/conftest.py) that the read-only tests inspect;
every test that changes a project (a re-run, a param edit, new data, a user error) gets its own copy
of it, so the tests run alone or in any order.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from steps.precision import label
from steps.stages import STAGE, command, dvc_stages, interpolate

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
DVC_ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def uri_of(project: Path) -> str:
    return f"sqlite:///{project}/mlflow.db"


def dvc_changed(project: Path) -> set[str]:
    """Stages that `dvc status` reports as changed (always-changed ones included)."""
    done = subprocess.run([BIN / "dvc", "status", "--json"], cwd=project, env=DVC_ENV,
                          text=True, capture_output=True, check=True)  # fmt: skip
    return set(json.loads(done.stdout))


def registry_state(uri: str) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    versions = client.search_model_versions("name='llmpipe'")
    return {
        str(v.version): sorted(client.get_model_version("llmpipe", v.version).aliases)
        for v in versions
    }


def lock_md5(project: Path, stage: str, path: str, section: str) -> str:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return next(e["md5"] for e in lock["stages"][stage][section] if e["path"] == path)


def test_first_run_trains_registers_promotes_and_serves(golden):
    from mlflow import MlflowClient

    project, first_run = golden
    mlflow_uri = uri_of(project)
    assert [s["name"] for s in first_run["stages"]] == [s.name for s in dvc_stages()]
    assert not any(s["skipped"] for s in first_run["stages"])
    metrics = json.loads((project / "metrics" / "eval.json").read_text())
    assert metrics["perplexity"] < metrics["base_perplexity"]
    assert (
        metrics["test_split_hash"]
        == json.loads((project / "data/prepared/stats.json").read_text())["test_split_hash"]
    )
    # registered once, challenger and (first model that beats the base) champion
    assert registry_state(mlflow_uri) == {"1": ["challenger", "champion"]}
    client = MlflowClient(mlflow_uri)
    version = client.get_model_version("llmpipe", "1")
    assert version.tags["data_hash"] == lock_md5(
        project, "prepare", "data/raw/pydoc_topics.jsonl", "deps"
    )
    assert version.tags["model_hash"] == lock_md5(project, "train", "models/tuned", "outs")
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", version.tags["git_sha"])
    assert float(version.tags["perplexity"]) == pytest.approx(metrics["perplexity"], rel=1e-5)
    # one MLflow run per flow run, holding the loss curve, eval metrics and lineage tags
    run = client.get_run(first_run["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    experiment = client.get_experiment_by_name("llmpipe").experiment_id
    assert len(client.search_runs([experiment])) == 1  # one run per flow run, no stray ones
    assert run.data.tags["data_hash"] == version.tags["data_hash"]
    # every value of params.yaml, as `section.key` (logged in one batch when the run opens)
    from flows.tracking import flat_params
    from steps.params import load_params

    expected = flat_params(load_params(project / "params.yaml"))
    assert {k: run.data.params.get(k) for k in expected} == expected
    assert run.data.params["train.max_steps"] == "8" and len(expected) > 40
    assert run.data.metrics["perplexity"] == pytest.approx(metrics["perplexity"])
    assert len(client.get_metric_history(run.info.run_id, "loss")) >= 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"evaluation.png", "eval.json", "samples.json"} <= artifacts
    samples = json.loads((project / "metrics/samples.json").read_text())
    assert len(samples["prompt"]) == len(samples["base"]) == len(samples["tuned"]) == 3
    assert metrics["perplexity_ci_low"] <= metrics["perplexity"] <= metrics["perplexity_ci_high"]
    assert metrics["perplexity_ci_high"] < metrics["base_perplexity"]  # the promotion gate held
    assert "forgetting" in metrics and metrics["reference_tokens"] > 1000
    # the candidate served over HTTP (stock scoring server) before it became champion
    serve = first_run["serve"]
    assert serve["model_uri"] == "models:/llmpipe/1" and serve["parity"]["ok"], serve
    assert serve["requests"] == 5 and 0 < serve["p50_ms"] <= serve["p95_ms"]
    # the built-in prompt and 3 held-out openings, their greedy replies recorded by register
    assert serve["parity"]["reference"] == "4 recorded at registration, 0 generated here", serve
    assert float(version.tags["serve_p95_ms"]) == pytest.approx(serve["p95_ms"], rel=1e-3)
    assert first_run["promotion"]["promoted"] is True
    assert first_run["promotion"]["reasons"][-1] == "champion moved from none to version 1"
    assert (
        version.tags["promoted_over"] == "none" and "beats the base model" in version.tags["gate"]
    )
    assert not (project / "checkpoints").exists() or not any((project / "checkpoints").iterdir())
    # how it was measured, on the version; and its card as the version's description
    assert version.tags["measured_stride"] == "32" and version.tags["measured_window"] == "64"
    assert version.tags["measured_tokenizer_hash"] == metrics["measured"]["tokenizer_hash"]
    assert version.tags["measured_precision"] == label("cpu")  # auto: bf16 where native
    card = version.description
    assert f"**Held-out perplexity** {metrics['perplexity']:.3f}" in card
    assert "window 64, stride 32" in card and "**Gate**: passed: reference perplexity" in card
    assert "beats the base model: upper bound" in card


def test_second_run_is_cached_and_registers_nothing(project, prefect_server):
    from flows.finetune import finetune

    mlflow_uri = uri_of(project)
    lock_before = (project / "dvc.lock").read_text()
    again = finetune(project_dir=str(project), serve_check=False)
    ran = [s["name"] for s in again["stages"] if not s["skipped"]]
    assert ran == ["model_source"], again["stages"]  # it fingerprints the source on every run
    assert again["register"]["new_version"] is False
    assert again["register"]["version"] == "1"
    assert registry_state(mlflow_uri) == {"1": ["challenger", "champion"]}
    assert (project / "dvc.lock").read_text() == lock_before
    # the re-run's MLflow run shows the metrics of the model it re-confirmed, though nothing ran
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    run = client.get_run(again["mlflow_run_id"])
    metrics = json.loads((project / "metrics/eval.json").read_text())
    assert run.data.metrics["perplexity"] == pytest.approx(metrics["perplexity"])
    assert run.data.metrics["base_perplexity"] == pytest.approx(metrics["base_perplexity"])
    assert len(client.get_metric_history(run.info.run_id, "loss")) >= 2
    assert {"eval.json", "train.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert run.data.tags["reused.evaluate"] == "outputs reused from the DVC cache"


def test_dvc_repro_alone_reruns_only_what_a_param_change_touches(project):
    env = DVC_ENV
    assert dvc_changed(project) == {"model_source"}  # always changed; nothing else
    params = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(params.replace("max_steps: 8", "max_steps: 10"))
    out = subprocess.run(
        [BIN / "dvc", "repro"], cwd=project, env=env, text=True, capture_output=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    ran = set(re.findall(r"Running stage '(\w+)'", out.stdout))
    assert ran == {"model_source", "train", "evaluate"}, out.stdout[-2000:]
    assert json.loads((project / "metrics/train.json").read_text())["steps"] == 10
    (project / "params.yaml").write_text(params)
    restore = subprocess.run(
        [BIN / "dvc", "repro"], cwd=project, env=env, text=True, capture_output=True
    )
    assert restore.returncode == 0, restore.stderr[-2000:]


def test_editing_a_module_reruns_every_stage_that_imports_it(project):
    """evaluate reads its reference documents through steps/records.py: DVC must see an edit."""
    with (project / "steps/records.py").open("a") as f:
        f.write("\n# an edit\n")
    assert dvc_changed(project) == {"model_source", "prepare", "evaluate"}
    with (project / "steps/params.py").open("a") as f:
        f.write("\n# an edit\n")
    assert dvc_changed(project) == {s.name for s in dvc_stages()}  # every step reads params


def test_a_new_model_in_the_same_local_directory_reruns_base_model(project, tiny_model_dir):
    """base_model.source names a local directory: new weights there are a changed dependency."""
    from benchmarks.workloads import build_tiny_model

    def repro_base_model() -> str:
        out = subprocess.run([BIN / "dvc", "repro", "base_model"], cwd=project, env=DVC_ENV,
                             text=True, capture_output=True)  # fmt: skip
        assert out.returncode == 0, out.stdout[-1000:] + out.stderr[-2000:]
        return out.stdout

    shutil.copytree(tiny_model_dir, project / "local-model")
    params = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(params.replace(str(tiny_model_dir), "local-model"))
    assert "Running stage 'base_model'" in repro_base_model()  # a new source
    assert "Running stage 'base_model'" not in repro_base_model()  # the same source
    build_tiny_model(project / "local-model", seed=1)  # other weights at the same path
    assert "Running stage 'base_model'" in repro_base_model()


def test_a_run_that_fails_inside_a_stage_puts_params_yaml_back(project):
    """The edits are written for the run (DVC must see them); a failure restores the file."""
    before = (project / "params.yaml").read_bytes()
    registry = registry_state(uri_of(project))
    done = llmpipe_run(project, "-S", "base_model.source=no-such-org/no-such-model")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "error: base_model.source: cannot load 'no-such-org/no-such-model'" in done.stderr
    assert (project / "params.yaml").read_bytes() == before
    assert registry_state(uri_of(project)) == registry


def llmpipe_run(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BIN / "llmpipe", "run", *args], cwd=project, text=True, capture_output=True, timeout=300
    )


CHAT_LINES = [
    json.dumps(
        {
            "messages": [
                {"role": "user", "content": f"Question {i}?"},
                {"role": "assistant", "content": f"Answer {i}."},
            ]
        }
    )
    + "\n"
    for i in range(40)
]

USER_ERRORS = {
    "missing data file": (
        ["-S", "prepare.data=data/raw/missing.jsonl"],
        None,
        r"data/raw/missing\.jsonl: data file not found",
    ),
    "empty corpus": (
        ["-S", "prepare.data=data/raw/empty.txt"],
        ("data/raw/empty.txt", "\n \n"),
        r"empty\.txt: the corpus is empty",
    ),
    "bad JSONL line": (
        ["-S", "prepare.data=data/raw/bad.jsonl"],
        ("data/raw/bad.jsonl", '{"text": "a"}\n{oops\n'),
        r"bad\.jsonl:2: not valid JSON",
    ),
    "unknown params key": (["-S", "train.lr=0.1"], None, r"unknown key 'train\.lr'"),
    "value out of range": (["-S", "train.max_steps=0"], None, r"'train\.max_steps'"),
    "stride beyond the window": (
        ["-S", "evaluate.stride=999"],
        None,
        r"evaluate\.stride \(999\) must not exceed evaluate\.window \(64\)",
    ),
    "a block longer than the model's positions": (
        ["-S", "prepare.block_size=1024"],  # the tiny model has 512
        None,
        r"prepare\.block_size \(1024\) exceeds the base model's maximum positions \(512, ",
    ),
    "a model directory that does not exist": (
        ["-S", "base_model.source=/path/to/hf-model-dir"],
        None,
        r"base_model\.source: /path/to/hf-model-dir: no such directory; give a model directory",
    ),
    "a corpus that cannot be split": (
        ["-S", "prepare.data=data/raw/one.txt"],
        ("data/raw/one.txt", "A single document cannot be both trained on and held out.\n"),
        r"data/raw/one\.txt: the (test|train) split is empty \(1 distinct records\)",
    ),
    "LoRA targets the model lacks": (
        ["-S", "train.method=lora", "-S", "train.lora_target_modules=q_proj,nonexistent_proj"],
        None,
        r"train\.lora_target_modules: the model has no Linear layer named nonexistent_proj; ",
    ),
    "qlora without CUDA": (
        ["-S", "train.method=qlora"],
        None,
        r"train\.method: qlora needs a CUDA GPU \(4-bit bitsandbytes\); none is visible here",
    ),
    "chat data for a model without a chat template": (
        ["-S", "prepare.data=data/raw/chat.jsonl"],
        ("data/raw/chat.jsonl", "".join(CHAT_LINES)),
        r"data/raw/chat\.jsonl: the base model has no chat template, so chat records cannot be",
    ),
    "mixed record kinds": (
        ["-S", "prepare.data=data/raw/mixed.jsonl"],
        ("data/raw/mixed.jsonl", CHAT_LINES[0] + '{"prompt": "p", "completion": "c"}\n'),
        r"mixed\.jsonl:2: a prompt/completion record, but line 1 is a messages record; ",
    ),
}


@pytest.mark.parametrize(
    ("args", "setup", "expected"), USER_ERRORS.values(), ids=USER_ERRORS.keys()
)
def test_user_errors_are_one_line_and_touch_nothing(project, args, setup, expected):
    from mlflow import MlflowClient

    mlflow_uri = uri_of(project)
    if setup:
        (project / setup[0]).write_text(setup[1])
    watched = ["params.yaml", "dvc.lock", "metrics/eval.json", "models/base/config.json"]
    before = {name: (project / name).read_bytes() for name in watched}
    registry = registry_state(mlflow_uri)
    experiment = MlflowClient(mlflow_uri).get_experiment_by_name("llmpipe").experiment_id
    runs = len(MlflowClient(mlflow_uri).search_runs([experiment]))
    done = llmpipe_run(project, *args)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert re.search(expected, lines[0]), lines[0]
    assert "Traceback" not in done.stderr + done.stdout
    assert {name: (project / name).read_bytes() for name in watched} == before
    assert registry_state(mlflow_uri) == registry
    assert len(MlflowClient(mlflow_uri).search_runs([experiment])) == runs


def test_unknown_key_in_params_file_stops_dvc_repro_too(project):
    """Without Prefect, a step refuses a bad params.yaml with the same one-line error."""
    params = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(params + "\nextra_section:\n  x: 1\n")
    values = yaml.safe_load(params)
    cmd = [interpolate(arg, values) for arg in command(STAGE["prepare"])]
    done = subprocess.run([sys.executable, *cmd[1:]], cwd=project, text=True, capture_output=True)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2
    assert len(lines) == 1 and "unknown key 'extra_section'" in lines[0], done.stderr


def test_perplexity_cli_scores_the_champion_uri_like_the_pipeline(golden, tmp_path):
    """`llmpipe perplexity` on models:/llmpipe@champion reproduces the evaluate stage's number."""
    from datasets import load_from_disk

    project = golden[0]
    mlflow_uri = uri_of(project)
    texts = load_from_disk(str(project / "data/prepared/test"))["text"]
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    done = subprocess.run(
        [
            BIN / "llmpipe",
            "perplexity",
            "--model",
            "models:/llmpipe@champion",
            "--input",
            heldout,
            "--window",
            "64",
            "--stride",
            "32",
            "--per-text",
            "--json",
        ],
        cwd=project,
        text=True,
        capture_output=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["precision"] == label("cpu")  # auto, as the evaluate stage scored it
    forced = subprocess.run(
        [BIN / "llmpipe", "perplexity", "--model", "models:/llmpipe@champion", "--input",
         heldout, "--window", "64", "--stride", "32", "--json", "--precision", "fp32"],
        cwd=project, text=True, capture_output=True,
    )  # fmt: skip
    assert forced.returncode == 0, forced.stderr[-2000:]
    fp32 = json.loads(forced.stdout.strip().splitlines()[-1])
    assert fp32["precision"] == "fp32"
    assert fp32["perplexity"] == pytest.approx(out["perplexity"], rel=5e-3)
    from mlflow import MlflowClient

    champion = MlflowClient(mlflow_uri).get_model_version_by_alias("llmpipe", "champion")
    assert out["perplexity"] == pytest.approx(float(champion.tags["perplexity"]), rel=1e-6)
    metrics = json.loads((project / "metrics/eval.json").read_text())
    assert out["tokens"] == metrics["tokens"] and len(out["perplexities"]) == len(texts)


def test_each_run_leaves_a_report_artifact_in_prefect(first_run):
    """The golden run's report is among the session's `finetune-report` artifacts."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def latest_report():
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["finetune-report"]))
            )
            return found

    reports = asyncio.run(latest_report())
    ours = [r.data for r in reports if first_run["mlflow_run_id"] in r.data]
    assert len(ours) == 1, f"{len(reports)} reports, {len(ours)} of the golden run"
    assert "## Promotion" in ours[0] and "promoted to champion" in ours[0]
    assert "llmpipe version 1" in ours[0]
    assert f"Measured with window 64, stride 32, {label('cpu')} on cpu, tokenizer `" in ours[0]


def test_retrain_skips_unchanged_data_then_continues_from_the_champion_after_data_add(
    golden, project, prefect_server
):
    """What the scheduled deployment does: nothing while the data is the champion's; after a
    `data add`, a run, here fine-tuning the champion instead of the base model (one run checks
    both: the base-model path is the golden run's)."""
    import mlflow
    import torch
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM

    from flows.finetune import finetune
    from steps.lineage import file_md5

    champion_data = golden[1]["register"]["tags"]["data_hash"]
    assert champion_data == file_md5(project / "data/raw/pydoc_topics.jsonl")  # DVC's md5
    skipped = finetune(project_dir=str(project), only_if_data_changed=True)
    assert skipped["skipped"].startswith("no new data")

    new = project / "new_topics.jsonl"
    words = [
        "loop",
        "branch",
        "scope",
        "name",
        "value",
        "object",
        "class",
        "module",
        "import",
        "yield",
    ]
    new.write_text(
        "".join(
            json.dumps({"text": f"Topic {i}. " + " ".join(words[(i + k) % 10] for k in range(60))})
            + "\n"
            for i in range(60)
        )
    )
    added = subprocess.run(
        [BIN / "llmpipe", "data", "add", str(new)], cwd=project, text=True, capture_output=True
    )
    assert added.returncode == 0, added.stderr
    mlflow_uri = uri_of(project)
    champion = MlflowClient(mlflow_uri).get_model_version_by_alias("llmpipe", "champion")
    rerun = finetune(
        project_dir=str(project),
        only_if_data_changed=True,
        continue_from_champion=True,
        serve_check=False,
        overrides=["train.max_steps=4"],
    )
    assert "skipped" not in rerun
    ran = {s["name"] for s in rerun["stages"] if not s["skipped"]}
    assert {"base_model", "prepare", "train", "evaluate"} <= ran
    assert rerun["register"]["tags"]["data_hash"] == file_md5(project / "data/raw/new_topics.jsonl")
    assert rerun["register"]["new_version"] is True
    # the champion was this run's base; params.yaml is the project's again (edits were for the run)
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["base_model"]["source"] != f"models:/llmpipe/{champion.version}"
    assert params["prepare"]["data"] == "data/raw/new_topics.jsonl"  # what `data add` wrote
    # the new base model is the champion, weight for weight
    mlflow.set_tracking_uri(mlflow_uri)
    registered = mlflow.transformers.load_model(
        f"models:/llmpipe/{champion.version}", return_type="components"
    )["model"].state_dict()
    base = AutoModelForCausalLM.from_pretrained(project / "models/base").state_dict()
    assert registered.keys() == base.keys()
    assert all(torch.equal(registered[k], base[k]) for k in base)
    assert rerun["register"]["tags"]["base_model"] == f"models:/llmpipe/{champion.version}"
