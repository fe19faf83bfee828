"""`llmpipe serve` as the README prints it: the installed command, no activated venv, real HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.workloads import make_project
from steps.serve import complete
from steps.servers import free_port, stop_process_group, wait_http

pytestmark = pytest.mark.integration

LLMPIPE = Path(sys.executable).parent / "llmpipe"


def without_venv() -> dict[str, str]:
    """The environment of a shell where the venv was never activated."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "MLFLOW_TRACKING_URI")}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    assert not any(Path(d, "uvicorn").exists() for d in env["PATH"].split(os.pathsep))
    return env


def one_line_error(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr + done.stdout
    return lines[0]


def test_serve_answers_a_completion_without_an_activated_venv(golden, tmp_path):
    project = golden[0]
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([LLMPIPE, "serve", "--port", str(port)], cwd=project,
                                env=without_venv(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/ping", proc, "llmpipe serve", 300, log, ready=range(200, 201))
        assert complete(url, "The for statement", max_tokens=8).strip()
    finally:
        stop_process_group(proc)
    assert "serving models:/llmpipe@champion" in log.read_text()


def test_serve_on_a_busy_port_is_one_line(golden):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cmd = [LLMPIPE, "serve", "--port", str(port)]
        done = subprocess.run(cmd, cwd=golden[0], env=without_venv(), capture_output=True,
                              text=True, timeout=120)  # fmt: skip
    line = one_line_error(done)
    assert line.startswith(f"error: 127.0.0.1:{port} is not available"), line
    assert "pass --port" in line


def test_serve_without_a_champion_is_one_line(tmp_path):
    project = make_project(tmp_path / "project", {})
    done = subprocess.run([LLMPIPE, "serve"], cwd=project, env=without_venv(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    line = one_line_error(done)
    assert line == "error: registered model 'llmpipe' has no champion yet; run `llmpipe run` first"


def test_the_scoring_server_loads_while_its_caller_works_and_says_when_it_was_ready(
    golden, tmp_path
):
    """smoke_serve starts the server first and reads what to ask meanwhile: the server it is
    handed says when /ping first answered, not when the caller got round to asking; a server
    that exits before answering is raised to the caller."""
    import time

    from steps.serve import starting_scoring_server

    uri = f"sqlite:///{golden[0]}/mlflow.db"
    started = time.monotonic()
    with starting_scoring_server("models:/llmpipe@champion", uri, tmp_path / "a.log") as starting:
        wait_http(f"{starting.url}/ping", starting.proc, "server", 300, ready=range(200, 201))
        seen = time.monotonic() - started  # the caller's own view of when the model had loaded
        time.sleep(3)  # the caller is still busy
        server = starting.ready()
        assert server.ready_seconds <= seen + 0.6  # polled from the start, every 0.5 s
        assert server.url == starting.url
        assert isinstance(complete(server.url, "In Python, the for statement", max_tokens=2), str)
    assert server.proc.poll() is not None  # stopped on exit

    missing = starting_scoring_server("models:/llmpipe/99", uri, tmp_path / "b.log")
    with missing as starting, pytest.raises(RuntimeError, match="scoring server exited with"):
        starting.ready()
