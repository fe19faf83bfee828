"""steps/servers.py: free ports, readiness polling against real servers, stopping process groups."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from steps.errors import UserError
from steps.servers import ensure_port_free, free_port, stop_process_group, wait_http

pytestmark = pytest.mark.unit


def test_free_port_is_bindable():
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        assert s.getsockname() == ("127.0.0.1", port)


def test_a_listener_makes_the_port_busy_but_a_lingering_connection_does_not():
    """A server stopped moments ago leaves its side of a closed connection in TIME_WAIT on its
    port; the server binding there again (SO_REUSEADDR, as uvicorn does) succeeds, so the check
    must pass too. Seen in CI: `llmpipe serve` refused 127.0.0.1:5001 that nothing listened on."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    with pytest.raises(UserError, match=f"127.0.0.1:{port} is not available .*; hint$"):
        ensure_port_free("127.0.0.1", port, "hint")
    client = socket.create_connection(("127.0.0.1", port))
    served, _ = listener.accept()
    served.close()  # the server closes first: its end lingers in TIME_WAIT on `port`
    client.close()
    listener.close()
    with socket.socket() as plain, pytest.raises(OSError):  # what the old check did
        plain.bind(("127.0.0.1", port))
    ensure_port_free("127.0.0.1", port, "hint")


def test_wait_ready_fails_when_the_server_has_exited(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("".join(f"line {i}\n" for i in range(1, 9)))
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    proc.wait(timeout=30)
    with pytest.raises(RuntimeError) as info:
        wait_http(f"http://127.0.0.1:{free_port()}/ping", proc, "scoring server", 30, log)
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
        assert wait_http(f"{url}/ping", proc, "s", 20, ready=range(200, 201)) is None
        with pytest.raises(TimeoutError, match="did not answer"):  # 404 is not ready here
            wait_http(f"{url}/other", proc, "s", 2, ready=range(200, 201))
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
        server.shutdown()
        server.server_close()


def test_stop_process_group_takes_down_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    for _ in range(100):
        if pid_file.is_file() and pid_file.read_text():
            break
        time.sleep(0.1)
    stop_process_group(proc, grace=5)
    assert proc.returncode is not None
    child = int(pid_file.read_text())
    for _ in range(50):
        try:
            import os

            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    pytest.fail(f"child {child} survived")
