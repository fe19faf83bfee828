"""Serve a registered model with MLflow's own scoring server, and check that it answers.

    python -m steps.serve --params params.yaml    # the flow's smoke_serve: free port, one request
    llmpipe serve                                 # models:/llmpipe@champion on 127.0.0.1:5001

The server is the stock `mlflow models serve -m models:/<name>@champion --env-manager local`;
llmpipe only starts it, waits for /ping, and (for the smoke check) POSTs one
OpenAI-style completion.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from steps.arguments import stage_arguments
from steps.errors import UserError
from steps.outcome import run_main
from steps.params import load_params
from steps.registry import CHAMPION, champion_version
from steps.servers import LOOPBACK, free_port, stop_process_group, wait_http
from steps.tracking import tracking_uri

SMOKE_PROMPT = "In Python, the for statement"


def serve_command(model_uri: str, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
            "--env-manager", "local", "-h", host, "-p", str(port)]  # fmt: skip


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


def smoke_serve(model_uri: str, uri: str, prompt: str = SMOKE_PROMPT) -> dict:
    """Serve `model_uri` on a free loopback port, require a non-empty completion, stop serving."""
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    with tempfile.TemporaryDirectory() as tmp:
        log_file = Path(tmp) / "server.log"
        with log_file.open("wb") as log:
            proc = subprocess.Popen(serve_command(model_uri, LOOPBACK, port), stdout=log,
                                    stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)  # fmt: skip
        try:
            started = time.monotonic()
            wait_http(f"{url}/ping", proc, "scoring server", 600, log_file, ready=range(200, 201))
            ready_s = time.monotonic() - started
            text = complete(url, prompt)
        finally:
            stop_process_group(proc)
    if not text.strip():
        raise RuntimeError(f"{model_uri} answered an empty completion to {prompt!r}")
    return {"model_uri": model_uri, "prompt": prompt, "completion": text, "ready_seconds": ready_s}


def champion_uri(uri: str, model_name: str) -> str | None:
    """models:/<name>@champion if that alias is set in the registry at `uri`, else None."""
    return None if champion_version(uri, model_name) is None else f"models:/{model_name}@{CHAMPION}"


def serve_forever(project: Path, host: str, port: int, model_name: str) -> int:
    uri = tracking_uri(project)
    model_uri = champion_uri(uri, model_name)
    if model_uri is None:
        raise UserError(
            f"registered model {model_name!r} has no champion yet; run `llmpipe run` first"
        )
    print(
        f"serving {model_uri} on http://{host}:{port} (Ctrl-C stops)\n"
        f"  curl -s http://{host}:{port}/invocations -H 'Content-Type: application/json' "
        f'-d \'{{"prompt": "{SMOKE_PROMPT}", "max_tokens": 32}}\'',
        flush=True,
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    try:
        return subprocess.run(serve_command(model_uri, host, port), env=env).returncode
    except KeyboardInterrupt:
        return 0


def main() -> dict:
    args = stage_arguments()
    name = load_params(args.params).registry.model_name
    uri = tracking_uri(args.params.resolve().parent)
    model_uri = champion_uri(uri, name)
    if model_uri is None:
        return {"skipped": f"{name} has no champion yet"}
    report = smoke_serve(model_uri, uri)
    print(f"smoke_serve: {model_uri} answered {report['completion']!r}")
    return report


if __name__ == "__main__":
    run_main(main)
