"""steps/serve.py: ports, the server command, the completion client, and readiness failures."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from steps.serve import complete, free_port, serve_command, wait_ready

pytestmark = pytest.mark.unit


def test_free_port_is_bindable():
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        assert s.getsockname() == ("127.0.0.1", port)


def test_serve_command():
    cmd = serve_command("models:/llmpipe@champion", "127.0.0.1", 5123)
    assert cmd[:3] == [sys.executable, "-m", "mlflow"]
    assert cmd[3:5] == ["models", "serve"]
    joined = " ".join(cmd)
    assert "-m models:/llmpipe@champion" in joined
    assert "--env-manager local" in joined
    assert "-h 127.0.0.1" in joined
    assert "-p 5123" in joined


@pytest.fixture
def completion_server():
    """A real HTTP server on 127.0.0.1: POST /invocations answers `state["answer"]` as JSON."""
    state: dict = {"requests": [], "answer": None}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state["requests"].append(
                {"path": self.path, "type": self.headers["Content-Type"], "body": json.loads(body)}
            )
            out = json.dumps(state["answer"]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


CHOICES = {"choices": [{"text": "hi", "index": 0}, {"text": "other"}]}


@pytest.mark.parametrize(
    "answer", [CHOICES, [CHOICES], {"predictions": [CHOICES]}], ids=["dict", "list", "predictions"]
)
def test_complete_against_a_real_server(completion_server, answer):
    url, state = completion_server
    state["answer"] = answer
    assert complete(url, "In Python, the for statement", max_tokens=7) == "hi"
    assert state["requests"] == [
        {
            "path": "/invocations",
            "type": "application/json",
            "body": {"prompt": "In Python, the for statement", "max_tokens": 7},
        }
    ]


def test_wait_ready_fails_when_the_server_has_exited(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("".join(f"line {i}\n" for i in range(1, 9)))
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    proc.wait(timeout=30)
    with pytest.raises(RuntimeError) as info:
        wait_ready(f"http://127.0.0.1:{free_port()}", proc, log, timeout=30)
    msg = str(info.value)
    assert "exited with 3" in msg
    assert msg.endswith("line 4 | line 5 | line 6 | line 7 | line 8")
    assert "line 3" not in msg


def test_wait_ready_returns_when_ping_answers(tmp_path):
    class Ping(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/ping" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Ping)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert wait_ready(url, proc, tmp_path / "unused.log", timeout=20) is None
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
        server.shutdown()
        server.server_close()
