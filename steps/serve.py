"""Serve a registered model with MLflow's own scoring server, and check that it answers.

    llmpipe serve                               # models:/llmpipe@champion on 127.0.0.1:5001
    python -m steps.serve --smoke --report PATH # the flow's smoke_serve task: free port, one request

The server is the stock `mlflow models serve -m models:/<name>@champion --env-manager local`; llmpipe
only starts it, waits for /ping, and (for the smoke check) POSTs one OpenAI-style completion.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from steps.errors import UserError, run_main
from steps.outputs import write_json
from steps.params import load_params
from steps.tracking import tracking_uri

SMOKE_PROMPT = "In Python, the for statement"


def serve_command(model_uri: str, host: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "local",
        "-h",
        host,
        "-p",
        str(port),
    ]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_server(model_uri: str, host: str, port: int, log_file: Path) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri()}
    with log_file.open("wb") as log:
        return subprocess.Popen(
            serve_command(model_uri, host, port),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def wait_ready(url: str, proc: subprocess.Popen, log_file: Path, timeout: float = 600) -> None:
    """Poll GET /ping until the model is loaded; fail with the server's last lines if it dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_file.read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"scoring server exited with {proc.returncode}: " + " | ".join(tail))
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"scoring server at {url} not ready after {timeout:.0f}s (log: {log_file})")


def complete(url: str, prompt: str, max_tokens: int = 24) -> str:
    """POST one OpenAI-style completion to /invocations and return the generated text."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens}).encode()
    req = urllib.request.Request(
        f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=300) as resp:
        answer = json.loads(resp.read())
    if isinstance(answer, dict) and "predictions" in answer:
        answer = answer["predictions"]
    if isinstance(answer, list):
        answer = answer[0]
    return answer["choices"][0]["text"]


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the server's whole process group (uvicorn workers too), SIGKILL after 15 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def smoke_serve(model_uri: str, prompt: str = SMOKE_PROMPT) -> dict:
    """Serve `model_uri` on a free loopback port, require a non-empty completion, stop the server."""
    host, port = "127.0.0.1", free_port()
    url = f"http://{host}:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        log_file = Path(tmp) / "server.log"
        proc = start_server(model_uri, host, port, log_file)
        try:
            started = time.monotonic()
            wait_ready(url, proc, log_file)
            ready_s = time.monotonic() - started
            text = complete(url, prompt)
        finally:
            stop_server(proc)
    if not text.strip():
        raise RuntimeError(f"{model_uri} answered an empty completion to {prompt!r}")
    return {"model_uri": model_uri, "prompt": prompt, "completion": text, "ready_seconds": ready_s}


def champion_uri(model_name: str) -> str | None:
    """models:/<name>@champion if that alias exists, else None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient(tracking_uri()).get_model_version_by_alias(model_name, "champion")
    except MlflowException:
        return None
    return f"models:/{model_name}@champion"


def serve_forever(host: str, port: int, model_name: str) -> int:
    uri = champion_uri(model_name)
    if uri is None:
        raise UserError(
            f"registered model {model_name!r} has no champion yet; run `llmpipe run` first"
        )
    print(
        f"serving {uri} on http://{host}:{port} (Ctrl-C stops)\n"
        f"  curl -s http://{host}:{port}/invocations -H 'Content-Type: application/json' "
        f'-d \'{{"prompt": "{SMOKE_PROMPT}", "max_tokens": 32}}\'',
        flush=True,
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri()}
    try:
        return subprocess.run(serve_command(uri, host, port), env=env).returncode
    except KeyboardInterrupt:
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="serve on a free port, one request")
    parser.add_argument("--report", type=Path, help="with --smoke: write the outcome as JSON here")
    args = parser.parse_args()
    params = load_params()
    if not args.smoke:
        sys.exit(serve_forever(params.serve.host, params.serve.port, params.registry.model_name))
    uri = champion_uri(params.registry.model_name)
    if uri is None:
        report = {"skipped": f"{params.registry.model_name} has no champion yet"}
    else:
        report = smoke_serve(uri)
        print(f"smoke_serve: {uri} answered {report['completion']!r}")
    if args.report:
        write_json(args.report, report)


if __name__ == "__main__":
    run_main(main)
