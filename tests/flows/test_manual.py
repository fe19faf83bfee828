"""Who may drive the UI, and what its form may change: the allow-list of flows/manual.py, the login
of `llmpipe up` (flows/stack.py), and that no stage sees that login."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.manual import PROJECT_ENV, form_edits, manual_finetune, runner_project
from steps.errors import UserError

pytestmark = pytest.mark.unit

PROJECT = Path("/srv/llm/project")
KEYS = "base_model.source, prepare.*, train.*, evaluate.*"
HUB = "a Hugging Face id, 'smollm2-gguf' or a model directory inside the project"
FILE = "a file inside the project, by its path relative to the project"


def test_an_allowed_form_becomes_the_edits_finetune_applies():
    named = {
        "base_model.source": "HuggingFaceTB/SmolLM2-135M",
        "prepare.data": "data/raw/tickets.jsonl",
        "train.learning_rate": 1e-4,
        "train.max_steps": None,  # an empty field keeps params.yaml
    }
    overrides = [
        "train.batch_size=4",
        "prepare.block_size=64",
        "evaluate.window=128",
        "evaluate.reference_data=data/reference/general_english.jsonl",
        f"prepare.data={PROJECT}/data/raw/other.txt",  # absolute, but inside the project
        "base_model.source=models:/llmpipe/3",
        "base_model.source=smollm2-gguf",
        "base_model.source=models/local-llama",  # a model directory in the project
    ]
    assert form_edits(PROJECT, named, overrides) == [
        "base_model.source=HuggingFaceTB/SmolLM2-135M",
        "prepare.data=data/raw/tickets.jsonl",
        "train.learning_rate=0.0001",
        *overrides,
    ]


def refusal_for_key(key: str) -> str:
    return (
        f"refused: the form cannot set '{key}' (it may set {KEYS}); "
        "change it in the project's params.yaml"
    )


@pytest.mark.parametrize(
    ("named", "override", "message"),
    [
        ({}, "base_model.trust_remote_code=true", refusal_for_key("base_model.trust_remote_code")),
        ({}, "register.model_name=other", refusal_for_key("register.model_name")),
        ({}, "serve.host=0.0.0.0", refusal_for_key("serve.host")),
        ({}, "schedule.cron=* * * * *", refusal_for_key("schedule.cron")),
        (
            {},
            "prepare.data=/etc/passwd",
            f"refused: 'prepare.data' is outside the project (got '/etc/passwd'); give {FILE}",
        ),
        (
            {"prepare.data": "data/../../other/secrets.jsonl"},
            None,
            "refused: 'prepare.data' is outside the project "
            f"(got 'data/../../other/secrets.jsonl'); give {FILE}",
        ),
        (
            {"prepare.data": "https://example.invalid/data.jsonl"},
            None,
            "refused: 'prepare.data' must not be a URL "
            f"(got 'https://example.invalid/data.jsonl'); give {FILE}",
        ),
        (
            {},
            "evaluate.reference_data=../reference.jsonl",
            "refused: 'evaluate.reference_data' is outside the project "
            f"(got '../reference.jsonl'); give {FILE}",
        ),
        (
            {"base_model.source": "/home/someone/model"},
            None,
            "refused: 'base_model.source' is outside the project "
            f"(got '/home/someone/model'); give {HUB}",
        ),
        (
            {},
            "base_model.source=hf://evil/model",
            f"refused: 'base_model.source' must not be a URL (got 'hf://evil/model'); give {HUB}",
        ),
        (
            {},
            "prepare.data='/etc/passwd'",  # quoted: what YAML reads is still the absolute path
            f"refused: 'prepare.data' is outside the project (got '/etc/passwd'); give {FILE}",
        ),
    ],
)
def test_the_form_refuses_keys_and_paths_outside_the_allow_list(named, override, message):
    allowed_first = ["train.max_steps=5"]  # a refusal anywhere refuses the whole form
    with pytest.raises(UserError) as err:
        form_edits(PROJECT, named, [*allowed_first, *([override] if override else [])])
    assert str(err.value) == message
    assert "\n" not in str(err.value)


def test_a_malformed_override_is_refused_by_the_usual_message():
    with pytest.raises(UserError, match=r"expected section\.key=value"):
        form_edits(PROJECT, {}, ["train.max_steps"])


def test_the_flow_returns_a_refusal_as_its_failed_state_before_touching_the_project(
    tmp_path, monkeypatch
):
    (tmp_path / "params.yaml").write_text("train:\n  max_steps: 3\n")
    monkeypatch.setenv(PROJECT_ENV, str(tmp_path))
    state = manual_finetune.fn(overrides=["base_model.trust_remote_code=true"])
    assert state.is_failed()
    assert state.message == refusal_for_key("base_model.trust_remote_code")
    assert (tmp_path / "params.yaml").read_text() == "train:\n  max_steps: 3\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no lock, no mlflow.db


def test_the_project_comes_from_the_runner_not_from_a_parameter(monkeypatch, tmp_path):
    monkeypatch.delenv(PROJECT_ENV, raising=False)
    with pytest.raises(UserError, match="run this deployment with its runner"):
        runner_project()
    monkeypatch.setenv(PROJECT_ENV, str(tmp_path))
    assert runner_project() == tmp_path.resolve()
    assert "project_dir" not in manual_finetune.parameters.properties


def test_the_login_comes_from_the_environment_or_is_generated():
    from flows.stack import AUTH_ENV, ui_auth

    assert ui_auth({AUTH_ENV: "operator:s3cret:with-colon"}) == (
        "operator:s3cret:with-colon",
        False,
    )
    generated, was_generated = ui_auth({})
    user, _, password = generated.partition(":")
    assert was_generated and user == "llmpipe" and len(password) >= 20
    assert ui_auth({})[0] != generated
    for bad in ("no-colon", ":password", "user:", "user:pass word", "usér:pass"):
        with pytest.raises(UserError, match=f"{AUTH_ENV} must be user:password"):
            ui_auth({AUTH_ENV: bad})


def test_up_without_a_login_or_a_terminal_refuses_before_starting_anything(monkeypatch, tmp_path):
    from flows import stack

    started = []
    monkeypatch.delenv(stack.AUTH_ENV, raising=False)
    monkeypatch.setattr(stack, "open_terminal", lambda: None)
    monkeypatch.setattr(stack, "start", lambda *args: started.append(args))
    with pytest.raises(UserError) as err:
        stack.up(tmp_path, 4200, 5000)
    assert str(err.value) == (
        "LLMPIPE_UI_AUTH is not set and there is no terminal to show a generated login on "
        "(it is never printed to a log); set LLMPIPE_UI_AUTH=user:password"
    )
    assert started == []


def test_only_the_server_and_the_runner_get_the_login(monkeypatch, tmp_path):
    from flows.runner import stage_env
    from flows.stack import runner_env, server_env, stack_env

    for name in ("LLMPIPE_UI_AUTH", "PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING"):
        monkeypatch.setenv(name, "inherited:login")
    base = stack_env(tmp_path, 4200)  # what the MLflow UI gets
    assert "inherited:login" not in base.values()
    server = server_env(base, "op:pw")
    assert server["PREFECT_SERVER_API_AUTH_STRING"] == "op:pw"
    assert server["PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED"] == "true"
    assert runner_env(base, "op:pw")["PREFECT_API_AUTH_STRING"] == "op:pw"
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "op:pw")  # as in a flow run of the runner
    assert not {"op:pw", "inherited:login"} & set(stage_env({"X": "1"}).values())


def test_the_engine_logs_no_traceback_for_a_user_error_only():
    import logging

    from flows.manual import NoTracebackForUserErrors
    from flows.runner import UserInputError

    def record(error: Exception) -> logging.LogRecord:
        info = (type(error), error, None)
        return logging.LogRecord("prefect.flow_runs", logging.ERROR, "", 0, "x", None, info)

    keep = NoTracebackForUserErrors().filter
    assert not keep(record(UserInputError("refused: ...")))
    assert not keep(record(UserError("params.yaml: ...")))
    assert keep(record(RuntimeError("a bug")))
    assert keep(logging.LogRecord("prefect.flow_runs", logging.INFO, "", 0, "x", None, None))
