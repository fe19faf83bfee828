"""Local servers: their default addresses, free ports, readiness polling and stopping them.

One home for the ports that llmpipe's commands and reports print, and for the start/poll/stop logic
that `llmpipe serve`, the smoke check, `llmpipe up` and the benchmarks share.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

LOOPBACK = "127.0.0.1"  # every server binds here unless the user asks otherwise
PREFECT_PORT = 4200  # Prefect server and UI (`llmpipe up`)
MLFLOW_UI_PORT = 5000  # MLflow UI (`llmpipe up`, and the links in run reports)
# The champion's scoring server listens on `serve.port` (params.yaml, default 5001).


def free_port(host: str = LOOPBACK) -> int:
    """A port that nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ensure_port_free(host: str, port: int, hint: str) -> None:
    """UserError naming the address when something already listens on it.

    The check binds the way the server will (uvicorn sets SO_REUSEADDR): a connection that ended
    on this port moments ago and lingers in TIME_WAIT does not stop the server, so it must not
    stop the check either; a listener does."""
    from steps.errors import UserError

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise UserError(f"{host}:{port} is not available ({err.strerror}); {hint}") from None


def wait_http(
    url: str,
    proc: subprocess.Popen,
    name: str,
    timeout: float = 180,
    log_file: Path | None = None,
    ready: range = range(200, 500),
) -> None:
    """Poll GET `url` until its status is in `ready` (any answer below 500 by default); fail at
    once (with the log's last lines) if `proc` exits first, or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = ""
            if log_file is not None and log_file.is_file():
                lines = log_file.read_text(errors="replace").strip().splitlines()[-5:]
                tail = ": " + " | ".join(lines)
            raise RuntimeError(f"{name} exited with {proc.returncode} before answering{tail}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status in ready:
                    return
        except urllib.error.HTTPError as err:
            if err.code in ready:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    where = f" (log: {log_file})" if log_file else ""
    raise TimeoutError(f"{name} did not answer {url} within {timeout:.0f}s{where}")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_process_group(proc: subprocess.Popen, grace: float = 15) -> None:
    """Stop the process group that `proc` leads (started with start_new_session=True): SIGTERM to
    every member, then SIGKILL to what is left after `grace` seconds. Returns once the leader is
    reaped and the group is gone (or killed)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        proc.wait()
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader, so it does not keep the group alive as a zombie
        if proc.returncode is not None and not group_alive(proc.pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
