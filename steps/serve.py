"""Serve a registered model with MLflow's own scoring server, and check that it answers.

    python -m steps.serve --params params.yaml    # the flow's smoke_serve: free port, one request
    llmpipe serve                                 # models:/llmpipe@champion on 127.0.0.1:5001

The server is the stock `mlflow models serve -m models:/<name>@champion --env-manager local`;
llmpipe only starts it, waits for /ping, and (for the smoke check) POSTs one
OpenAI-style completion.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from steps.arguments import stage_arguments
from steps.errors import UserError
from steps.executables import with_interpreter_on_path
from steps.outcome import run_main
from steps.params import load_params
from steps.registry import CHAMPION, champion_version
from steps.servers import LOOPBACK, ensure_port_free, free_port, stop_process_group, wait_http
from steps.tracking import RegistryUnavailable, check_registry, registry_exists, tracking_uri

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


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..1): the smallest value with q of them at or below."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def smoke_serve(model_uri: str, uri: str, requests: int = 1, prompt: str = SMOKE_PROMPT) -> dict:
    """Serve `model_uri` on a free loopback port, require `requests` non-empty completions, time
    them, stop serving."""
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    env = server_env(uri)
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
            texts, latencies_ms = [], []
            for _ in range(requests):
                sent = time.perf_counter()
                texts.append(complete(url, prompt, max_tokens=32))
                latencies_ms.append((time.perf_counter() - sent) * 1000)
        finally:
            stop_process_group(proc)
    if not all(t.strip() for t in texts):
        raise RuntimeError(f"{model_uri} answered an empty completion to {prompt!r}")
    return {
        "model_uri": model_uri,
        "prompt": prompt,
        "completion": texts[0],
        "ready_seconds": ready_s,
        "requests": requests,
        "p50_ms": percentile(latencies_ms, 0.5),
        "p95_ms": percentile(latencies_ms, 0.95),
    }


def within_budget(report: dict, max_p95_ms: float | None) -> tuple[bool, str]:
    """Whether the smoke requests' p95 meets the latency budget, and the sentence that says so."""
    p95 = report["p95_ms"]
    if max_p95_ms is None:
        return True, f"served {report['requests']} completions, p95 {p95:.0f} ms (no budget)"
    if p95 <= max_p95_ms:
        return True, f"served {report['requests']} completions, p95 {p95:.0f} ms <= {max_p95_ms:g}"
    return False, f"too slow: p95 {p95:.0f} ms > serve.max_p95_ms {max_p95_ms:g}"


def record_latency(uri: str, model_uri: str, report: dict) -> None:
    """The smoke check's figures as tags of the version it served (models:/NAME/VERSION)."""
    from mlflow import MlflowClient

    name, version = model_uri[len("models:/") :].rsplit("/", 1)
    client = MlflowClient(uri)
    for key in ("p50_ms", "p95_ms", "requests"):
        client.set_model_version_tag(name, version, f"serve_{key}", f"{report[key]:g}")


def server_env(uri: str) -> dict[str, str]:
    """The scoring server's environment: its registry, and this interpreter's bin/ first on PATH
    (MLflow execs `uvicorn` by name: without this, `.venv/bin/llmpipe serve` needs an activated
    venv)."""
    return with_interpreter_on_path({**os.environ, "MLFLOW_TRACKING_URI": uri})


def champion_uri(uri: str, model_name: str) -> str | None:
    """models:/<name>@champion if that alias is set in the registry at `uri`, else None."""
    return None if champion_version(uri, model_name) is None else f"models:/{model_name}@{CHAMPION}"


def serve_forever(project: Path, host: str, port: int, model_name: str) -> int:
    uri = tracking_uri(project)
    try:  # a locked or corrupt database is not "no champion"
        check_registry(uri)
        model_uri = champion_uri(uri, model_name) if registry_exists(uri) else None
    except RegistryUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if model_uri is None:
        raise UserError(
            f"registered model {model_name!r} has no champion yet; run `llmpipe run` first"
        )
    ensure_port_free(host, port, "stop what listens there, or pass --port (or set serve.port)")
    print(
        f"serving {model_uri} on http://{host}:{port} (Ctrl-C stops)\n"
        f"  curl -s http://{host}:{port}/invocations -H 'Content-Type: application/json' "
        f'-d \'{{"prompt": "{SMOKE_PROMPT}", "max_tokens": 32}}\'',
        flush=True,
    )
    try:
        return subprocess.run(serve_command(model_uri, host, port), env=server_env(uri)).returncode
    except KeyboardInterrupt:
        return 0


def main() -> dict:
    args = stage_arguments(text=("model_uri",))
    params = load_params(args.params)
    uri = tracking_uri(args.params.resolve().parent)
    report = smoke_serve(args.model_uri, uri, params.serve.smoke_requests)
    record_latency(uri, args.model_uri, report)
    report["within_budget"], report["verdict"] = within_budget(report, params.serve.max_p95_ms)
    print(f"smoke_serve: {args.model_uri} answered {report['completion']!r}; {report['verdict']}")
    return report


if __name__ == "__main__":
    run_main(main)
