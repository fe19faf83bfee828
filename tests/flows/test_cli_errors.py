"""Bad command lines: the installed `llmpipe` answers in one line (argparse adds its usage line),
exit status 2, no traceback, nothing written. Each is refused before anything heavy starts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.workloads import REPO

pytestmark = pytest.mark.unit

LLMPIPE = Path(sys.executable).parent / "llmpipe"


def llmpipe(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return subprocess.run([LLMPIPE, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def last_line(done: subprocess.CompletedProcess, usage: bool = False) -> str:
    """The error line of a refused command: exit 2, no traceback, and that one line on stderr
    (after argparse's usage lines when `usage`)."""
    err = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-2000:]
    assert done.returncode == 2 and err, done.stderr[-2000:]
    assert err[0].startswith("usage: ") if usage else len(err) == 1, done.stderr[-2000:]
    return err[-1]


@pytest.fixture
def params_dir(tmp_path) -> Path:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


PERPLEXITY = ["perplexity", "--model", "m", "--input", "in.txt"]


def test_perplexity_window_and_stride_are_checked_before_any_model_loads(tmp_path):
    assert last_line(llmpipe(tmp_path, *PERPLEXITY, "--window", "0")) == (
        "error: --window: Input should be greater than or equal to 2"
    )
    assert last_line(llmpipe(tmp_path, *PERPLEXITY, "--window", "4", "--stride", "9")) == (
        "error: --stride (9) must not exceed --window (4)"
    )
    assert last_line(llmpipe(tmp_path, *PERPLEXITY, "--batch-size", "0")) == (
        "error: --batch-size: Input should be greater than or equal to 1"
    )


def test_perplexity_of_a_directory_that_holds_no_model(tmp_path):
    line = last_line(llmpipe(tmp_path, "perplexity", "--model", str(tmp_path), "--input", "x"))
    assert line == (
        f"error: --model {tmp_path}: no config.json there; give a model directory or "
        "models:/NAME@ALIAS"
    )


def test_argparse_refuses_unknown_commands_flags_and_types(tmp_path):
    assert last_line(llmpipe(tmp_path, "trian"), usage=True).startswith(
        "llmpipe: error: argument command: invalid choice: 'trian' (choose from "
    )
    assert last_line(llmpipe(tmp_path, "run", "--max-steps", "3"), usage=True) == (
        "llmpipe: error: unrecognized arguments: --max-steps 3"
    )
    assert last_line(llmpipe(tmp_path, "serve", "--port", "abc"), usage=True) == (
        "llmpipe serve: error: argument --port: invalid int value: 'abc'"
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("foo", "-S 'foo': expected section.key=value, e.g. train.max_steps=100"),
        ("a.b.c=1", "-S 'a.b.c=1': the key must be section.key, e.g. train.learning_rate"),
    ],
    ids=["no-equals", "three-part-key"],
)
def test_a_malformed_override_names_itself(override, message):
    from steps.errors import UserError
    from steps.params import parse_override

    with pytest.raises(UserError) as info:
        parse_override(override)
    assert str(info.value) == message


def test_an_override_of_the_wrong_type_is_refused_and_params_yaml_is_untouched(params_dir):
    before = (params_dir / "params.yaml").read_bytes()
    line = last_line(llmpipe(params_dir, "run", "-S", "train.max_steps=abc"))
    assert line == (
        f"error: {params_dir / 'params.yaml'} with -S train.max_steps=abc: 'train.max_steps': "
        "Input should be a valid integer, unable to parse string as an integer (got 'abc')"
    )
    assert (params_dir / "params.yaml").read_bytes() == before
    assert sorted(p.name for p in params_dir.iterdir()) == ["params.yaml"]


def test_serve_outside_a_project_says_where_params_yaml_should_be(tmp_path):
    assert last_line(llmpipe(tmp_path, "serve")) == (
        "error: params.yaml: not found; run from the project directory or create it"
    )


def test_deploy_without_a_prefect_server(tmp_path):
    assert last_line(llmpipe(tmp_path, "deploy")) == (
        "error: PREFECT_API_URL is not set; point it at a Prefect server, or use `llmpipe up`"
    )


def test_a_prefect_server_that_does_not_answer_is_one_line_and_writes_nothing(params_dir):
    """PREFECT_API_URL names a server that is down (`llmpipe up` not started): one line, exit 1,
    instead of Prefect's traceback from inside the flow's start; nothing in the project changes."""
    from steps.servers import free_port

    shutil.copytree(REPO / "data" / "reference", params_dir / "data" / "reference")
    before = sorted(p.relative_to(params_dir) for p in params_dir.rglob("*"))
    api = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    env = {**os.environ, "PREFECT_API_URL": api}
    for command in (["run"], ["sweep", "-S", "train.max_steps=2,3"]):
        done = subprocess.run([LLMPIPE, *command], cwd=params_dir, env=env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert done.returncode == 1, done.stderr[-2000:]
        assert "Traceback" not in done.stderr + done.stdout, done.stderr[-2000:]
        assert done.stderr.strip().splitlines() == [
            f"error: the Prefect server at PREFECT_API_URL ({api}) does not answer ([Errno 111] "
            "Connection refused); start it (`llmpipe up`), or unset PREFECT_API_URL for a "
            "temporary one"
        ]
        assert sorted(p.relative_to(params_dir) for p in params_dir.rglob("*")) == before
