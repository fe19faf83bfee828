"""Bad requests to the champion's scoring server (`mlflow models serve`, what `llmpipe serve` runs):
what MLflow answers to each, and that the server still answers a good request afterwards.

These document MLflow's own behaviour; llmpipe adds nothing between the client and the server.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import psutil
import pytest

from steps import serve

pytestmark = pytest.mark.integration

REQUEST_TIMEOUT_S = 10  # MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT here; MLflow's default is 60 s
GOOD = {"prompt": "The for statement", "max_tokens": 4}


@pytest.fixture(scope="module")
def scoring_server(golden, tmp_path_factory):
    """The golden project's champion on a free loopback port, served as `llmpipe serve` does."""
    root = tmp_path_factory.mktemp("scoring")
    project = shutil.copytree(golden[0], root / "project", symlinks=True)
    registry = f"sqlite:///{project}/mlflow.db"
    env = {"MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT_S)}
    log = root / "server.log"
    # grace 5: the runaway generation below delays a graceful stop
    with serve.scoring_server(
        "models:/llmpipe@champion", registry, log, timeout=300, extra_env=env, grace=5
    ) as server:
        yield server.url, server.proc


def post(url: str, body: bytes, content_type: str = "application/json", method: str = "POST"):
    """(status, response text) of one request to /invocations."""
    req = urllib.request.Request(f"{url}/invocations", data=body, method=method,
                                 headers={"Content-Type": content_type})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def still_answers(url: str, proc: subprocess.Popen) -> None:
    assert proc.poll() is None, "the scoring server exited"
    status, text = post(url, json.dumps(GOOD).encode())
    assert status == 200, text
    assert isinstance(json.loads(text)[0]["choices"][0]["text"], str)


def js(payload) -> bytes:
    return json.dumps(payload).encode()


# name: (content type, body, status, a line of MLflow's answer)
BAD_REQUESTS = {
    "not JSON": (
        "application/json", b"this is not json", 400,
        "Invalid input. Ensure that input is a valid JSON formatted string.",
    ),
    "empty body": (
        "application/json", b"", 400,
        "Invalid input. Ensure that input is a valid JSON formatted string.",
    ),
    "a JSON list": (
        "application/json", js([1, 2]), 400,
        "The input must be a JSON dictionary with exactly one of the input fields",
    ),
    "no prompt": (
        "application/json", js({"max_tokens": 4}), 400,
        "The input must be a JSON dictionary with exactly one of the input fields",
    ),
    "prompt a number": (
        "application/json", js({"prompt": 5, "max_tokens": 4}), 400,
        "Incompatible input types for column prompt.",
    ),
    "prompt null": (
        "application/json", js({"prompt": None, "max_tokens": 4}), 400,
        "Invalid data submission. Ensure all elements in the list are strings or dictionaries.",
    ),
    "max_tokens a string": (
        "application/json", js({"prompt": "x", "max_tokens": "many"}), 400,
        "Incompatible input types for column max_tokens. Can not safely convert str to int64.",
    ),
    "max_tokens a float": (
        "application/json", js({"prompt": "x", "max_tokens": 2.5}), 400,
        "Can not safely convert float64 to int64.",
    ),
    "negative max_tokens": (
        "application/json", js({"prompt": "x", "max_tokens": -5}), 400,
        "Encountered an unexpected error while evaluating the model.",
    ),
    "text/plain": (
        "text/plain", js(GOOD), 415,
        "This predictor only supports the following content types",
    ),
}  # fmt: skip


@pytest.mark.parametrize(
    ("content_type", "body", "status", "message"), BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys()
)
def test_a_bad_request_gets_a_4xx_and_the_server_keeps_serving(
    scoring_server, content_type, body, status, message
):
    url, proc = scoring_server
    got, text = post(url, body, content_type)
    assert (got, message in text) == (status, True), text[:2000]
    still_answers(url, proc)


def test_the_4xx_answers_are_json_but_a_model_error_carries_a_server_traceback(scoring_server):
    url, proc = scoring_server
    status, text = post(url, js({"prompt": "x", "max_tokens": "many"}))
    answer = json.loads(text)
    assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE"
    assert answer["error_class"] == "SCHEMA_ENFORCEMENT_FAILED" and "stack_trace" not in answer
    status, text = post(url, js({"prompt": "x", "max_tokens": -5}))
    answer = json.loads(text)
    assert status == 400 and answer["error_code"] == "BAD_REQUEST"
    assert answer["message"].startswith(
        "Encountered an unexpected error while evaluating the model."
    )
    # MLflow sends the model's traceback (server file paths) to the client
    assert "`max_new_tokens` must be greater than 0, but is -5." in answer["stack_trace"]
    assert "Traceback (most recent call last)" in answer["stack_trace"]
    status, text = post(url, b"", method="GET")
    assert (status, json.loads(text)) == (405, {"detail": "Method Not Allowed"})
    still_answers(url, proc)


def test_an_empty_prompt_is_completed_from_nothing(scoring_server):
    url, proc = scoring_server
    status, text = post(url, js({"prompt": "", "max_tokens": 4}))
    assert status == 200, text
    [answer] = json.loads(text)
    assert answer["usage"]["prompt_tokens"] == 0 and answer["choices"][0]["text"] is not None
    still_answers(url, proc)


def test_a_huge_max_tokens_times_out_and_the_server_keeps_serving(scoring_server):
    """The request gets 504 after the timeout; the generation itself runs on in the server (MLflow
    cannot cancel it), taking a CPU core until it ends or the server stops."""
    url, proc = scoring_server
    status, text = post(url, js({"prompt": "x", "max_tokens": 10_000_000}))
    assert (status, text) == (504, "Request processing time exceeded limit")
    server = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    before = cpu_seconds(server)
    time.sleep(2)
    assert cpu_seconds(server) - before > 0.5  # still generating after the 504
    still_answers(url, proc)


def cpu_seconds(processes: list[psutil.Process]) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in processes if p.is_running())
