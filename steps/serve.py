"""Serve a registered model with MLflow's own scoring server, and check that it answers.

    python -m steps.serve --params params.yaml    # the flow's smoke_serve: free port, one request
    llmpipe serve                                 # models:/llmpipe@champion on 127.0.0.1:5001

The server is the stock `mlflow models serve -m models:/<name>@champion --env-manager local`;
llmpipe only starts it, waits for /ping, and (for the smoke check) POSTs OpenAI-style requests at
temperature 0: chat requests to a model registered as llm/v1/chat, completions otherwise. Their
answers must equal in-process greedy generation of the same prompts (steps/chat_serving.py).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from steps.arguments import stage_arguments
from steps.chat_serving import (
    Prompt,
    answer_text,
    ask,
    greedy_record,
    is_chat,
    merge_records,
    parity_checks,
    parity_verdict,
    prompt_key,
    prompt_label,
    serving_device,
    serving_place,
)
from steps.errors import UserError
from steps.executables import with_interpreter_on_path
from steps.outcome import run_step
from steps.params import load_params
from steps.registry import (
    CHAMPION,
    CHAT_TASK,
    COMPLETIONS_TASK,
    RECORDED_REPLIES,
    champion_version,
)
from steps.servers import LOOPBACK, ensure_port_free, free_port, stop_process_group, wait_http
from steps.tracking import RegistryUnavailable, check_registry, registry_exists, tracking_uri

SMOKE_PROMPT = "In Python, the for statement"
SMOKE_MESSAGES = [{"role": "user", "content": "What does the for statement do in Python?"}]
SMOKE_TOKENS = 32  # new tokens per smoke request


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
        return answer_text(json.loads(resp.read()))


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..1): the smallest value with q of them at or below."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def smoke_serve(
    model_uri: str,
    uri: str,
    requests: int = 1,
    prompts: list[Prompt] | None = None,
    max_tokens: int = SMOKE_TOKENS,
    require_end: bool = False,
    prepared: Path | None = None,
) -> dict:
    """Serve `model_uri` on a free loopback port, time `requests` requests at temperature 0 (at
    least one per prompt, in turn; chat requests for an llm/v1/chat model), stop serving, then
    compare the answers with in-process greedy generation of the same prompts (the parity check):
    the replies recorded when the version was registered (recorded_replies), and for any prompt
    they lack, the logged model loaded and generated here.

    `prompts`: chat messages ending before an assistant turn (chat model) or texts (completions
    model); by default one built-in prompt. `prepared`: prepared data whose held-out prompts are
    asked too (heldout_prompts)."""
    with tempfile.TemporaryDirectory() as tmp:
        # The server loads the model (seconds) while this process reads what to ask; the requests
        # are timed only once both are done. A model loaded here (for replies not recorded at
        # registration) is loaded only after the server stopped: one copy in memory at a time.
        with starting_scoring_server(model_uri, uri, Path(tmp) / "server.log") as starting:
            location = version_location(uri, model_uri)
            logged = download_mlmodel(location, uri, Path(tmp) / "mlmodel")
            task = logged_task(logged)
            prompts = check_prompts([*smoke_prompts(task, prepared), *(prompts or [])], task)
            asked = [prompts[i % len(prompts)] for i in range(max(requests, len(prompts)))]
            server = starting.ready()
            answers, latencies_ms = ask_all(server, asked, max_tokens)
        # An empty answer is not a fault by itself: greedy decoding of a small or barely trained
        # model can end its turn at once. The parity check below says whether the server answered
        # what the model itself generates.
        record = recorded_replies(logged, max_tokens)
        missing = [p for p in prompts if record is None or prompt_key(p) not in record["replies"]]
        if missing:
            local = download_logged(location, uri, Path(tmp) / "model")
            model, tokenizer = load_logged(local)
            record = merge_records(record, greedy_record(model, tokenizer, missing, max_tokens))
    served = [answers[i :: len(prompts)] for i in range(len(prompts))]
    checks = parity_checks(prompts, served, record)
    ok, reason = parity_verdict(checks, max_tokens, record["end_token"], require_end)
    reference = (
        f"{len(prompts) - len(missing)} recorded at registration, {len(missing)} generated here"
    )
    return {
        "model_uri": model_uri,
        "task": task,
        "prompt": prompt_label(prompts[0]),
        "completion": answers[0],
        "ready_seconds": server.ready_seconds,
        "requests": len(asked),
        "p50_ms": percentile(latencies_ms, 0.5),
        "p95_ms": percentile(latencies_ms, 0.95),
        "parity": {"ok": ok, "reason": reason, "prompts": len(prompts), "reference": reference},
    }


@dataclass(frozen=True)
class ScoringServer:
    url: str  # http://127.0.0.1:<port>
    proc: subprocess.Popen
    ready_seconds: float  # from start until /ping answered 200 (the model loaded)


@dataclass(frozen=True)
class StartingServer:
    url: str
    proc: subprocess.Popen
    ready: Callable[[], ScoringServer]  # waits until /ping answered 200


@contextmanager
def starting_scoring_server(
    model_uri: str,
    uri: str,
    log_file: Path,
    timeout: float = 600,
    extra_env: dict[str, str] | None = None,
    grace: float = 15,
) -> Iterator[StartingServer]:
    """The stock scoring server (serve_command) for `model_uri` of the registry at `uri`, on a
    free loopback port, in a session of its own, its output in `log_file`; yielded at once, so
    the caller can work while the model loads; its ready() returns the ScoringServer once /ping
    answered 200. A thread polls /ping from the start: ready_seconds is when it first answered,
    not when the caller asked. Its process group is stopped on exit (SIGTERM, then SIGKILL after
    `grace` s)."""
    port = free_port()
    env = {**server_env(uri), **(extra_env or {})}
    with log_file.open("wb") as log:
        proc = subprocess.Popen(serve_command(model_uri, LOOPBACK, port), stdout=log, env=env,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        url = f"http://{LOOPBACK}:{port}"
        started = time.monotonic()
        waited: dict = {}

        def poll() -> None:
            try:
                wait_http(f"{url}/ping", proc, "scoring server", timeout, log_file,
                          ready=range(200, 201))  # fmt: skip
                waited["seconds"] = time.monotonic() - started
            except Exception as err:  # raised in the caller's thread, by ready()
                waited["error"] = err

        poller = threading.Thread(target=poll, name="scoring-server-ready", daemon=True)
        poller.start()

        def ready() -> ScoringServer:
            while poller.is_alive():  # short joins: a signal still stops the caller
                poller.join(0.2)
            if "error" in waited:
                raise waited["error"]
            return ScoringServer(url, proc, waited["seconds"])

        yield StartingServer(url, proc, ready)
    finally:
        stop_process_group(proc, grace=grace)


@contextmanager
def scoring_server(model_uri: str, uri: str, log_file: Path, **options) -> Iterator[ScoringServer]:
    """starting_scoring_server (the same options: timeout, extra_env, grace), yielded once /ping
    answers 200."""
    with starting_scoring_server(model_uri, uri, log_file, **options) as starting:
        yield starting.ready()


def ask_all(
    server: ScoringServer, prompts: list[Prompt], max_tokens: int
) -> tuple[list[str], list[float]]:
    """Ask each prompt in turn at temperature 0: the answers and each request's latency (ms)."""
    answers, latencies_ms = [], []
    for prompt in prompts:
        sent = time.perf_counter()
        answers.append(ask(server.url, prompt, max_tokens))
        latencies_ms.append((time.perf_counter() - sent) * 1000)
    return answers, latencies_ms


def version_location(uri: str, model_uri: str) -> str:
    """Where the artifacts of models:/NAME/VERSION or models:/NAME@ALIAS lie, asked of the registry
    at `uri` (MLflow's own models:/ resolution asks the process-wide registry instead)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri, registry_uri=uri)
    ref = model_uri[len("models:/") :]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = client.get_model_version_by_alias(name, alias).version
    else:
        name, version = ref.rsplit("/", 1)
    return client.get_model_version_download_uri(name, version)


def download_logged(location: str, uri: str, dest: Path) -> Path:
    """The logged model at artifact `location` (version_location), as a local MLflow model."""
    from mlflow.artifacts import download_artifacts

    dest.mkdir(parents=True)
    return Path(download_artifacts(location, dst_path=str(dest), tracking_uri=uri))


def download_model(model_uri: str, uri: str, dest: Path) -> Path:
    """The logged model behind `model_uri` in the registry at `uri`, as a local MLflow model."""
    return download_logged(version_location(uri, model_uri), uri, dest)


def download_mlmodel(location: str, uri: str, dest: Path) -> Path:
    """Only the MLmodel file of the logged model at `location`: its flavor and metadata, without
    copying its weights."""
    from mlflow.artifacts import download_artifacts

    dest.mkdir(parents=True)
    mlmodel = location.rstrip("/") + "/MLmodel"
    return Path(download_artifacts(mlmodel, dst_path=str(dest), tracking_uri=uri))


def logged_task(local: Path) -> str:
    """The llm/v1 task a local MLflow model (its directory or MLmodel file) was logged with
    (llm/v1/completions when none)."""
    from mlflow.models import Model

    flavor = Model.load(str(local)).flavors.get("transformers", {})
    return flavor.get("inference_task") or COMPLETIONS_TASK


def recorded_replies(local: Path, max_tokens: int) -> dict | None:
    """The greedy replies recorded in a logged model's metadata when it was registered
    (steps/registry.py log_and_register), when they were made with `max_tokens` at this place
    (serving_place: the same host and GPUs as the server here); else None."""
    from mlflow.models import Model

    record = (Model.load(str(local)).metadata or {}).get(RECORDED_REPLIES)
    if not record or record["max_tokens"] != max_tokens or record["place"] != serving_place():
        return None
    return record


def load_logged(local: Path):
    """(model, tokenizer) of a local MLflow transformers model, on the device the scoring server
    uses (MLflow serves on GPU 0 when there is one)."""
    import mlflow

    parts = mlflow.transformers.load_model(str(local), return_type="components")
    return parts["model"].to(serving_device()), parts["tokenizer"]


def default_prompts(task: str) -> list[Prompt]:
    return [SMOKE_MESSAGES] if task == CHAT_TASK else [SMOKE_PROMPT]


def check_prompts(prompts: list[Prompt], task: str) -> list[Prompt]:
    """`prompts` when they fit `task`: message lists ending before an assistant turn for chat,
    texts for completions; otherwise a ValueError naming the first that does not."""
    chat = task == CHAT_TASK
    for i, prompt in enumerate(prompts, 1):
        if is_chat(prompt) != chat:
            want = "a list of messages" if chat else "a text"
            raise ValueError(f"smoke prompt {i}: a {task} model is asked {want}, got {prompt!r}")
        if chat and (not prompt or prompt[-1]["role"] == "assistant"):
            raise ValueError(
                f"smoke prompt {i}: chat messages must end before an assistant turn, got {prompt!r}"
            )
    return prompts


def within_budget(report: dict, max_p95_ms: float | None) -> tuple[bool, str]:
    """Whether the serving check lets the candidate through, and the sentence that says so: the
    smoke requests' p95 meets the latency budget and (when checked) the served answers equal
    in-process greedy generation."""
    p95, n = report["p95_ms"], report["requests"]
    noun = "chat answers" if report.get("task") == CHAT_TASK else "completions"
    if max_p95_ms is None:
        ok, said = True, f"served {n} {noun}, p95 {p95:.0f} ms (no budget)"
    elif p95 <= max_p95_ms:
        ok, said = True, f"served {n} {noun}, p95 {p95:.0f} ms <= {max_p95_ms:g}"
    else:
        return False, f"too slow: p95 {p95:.0f} ms > serve.max_p95_ms {max_p95_ms:g}"
    parity = report.get("parity")
    if parity is None:
        return ok, said
    if not parity["ok"]:
        return False, f"not served as generated: {parity['reason']}"
    return True, f"{said}; {parity['reason']}"


def record_latency(uri: str, model_uri: str, report: dict) -> None:
    """The smoke check's figures as tags of the version it served (models:/NAME/VERSION)."""
    from mlflow import MlflowClient

    name, version = model_uri[len("models:/") :].rsplit("/", 1)
    client = MlflowClient(uri)
    for key in ("p50_ms", "p95_ms", "requests"):
        client.set_model_version_tag(name, version, f"serve_{key}", f"{report[key]:g}")
    if "parity" in report:
        client.set_model_version_tag(name, version, "serve_parity", report["parity"]["reason"])


def server_env(uri: str) -> dict[str, str]:
    """The scoring server's environment: its registry, and this interpreter's bin/ first on PATH
    (MLflow execs `uvicorn` by name: without this, `.venv/bin/llmpipe serve` needs an activated
    venv)."""
    return with_interpreter_on_path({**os.environ, "MLFLOW_TRACKING_URI": uri})


def registered_task(uri: str, model_uri: str) -> str:
    """The llm/v1 task of a registered model (read from its MLmodel file alone)."""
    from mlflow.artifacts import download_artifacts

    location = version_location(uri, model_uri)
    with tempfile.TemporaryDirectory() as tmp:
        mlmodel = download_artifacts(f"{location}/MLmodel", dst_path=tmp, tracking_uri=uri)
        return logged_task(Path(mlmodel))


def example_request(task: str) -> str:
    """A request body to show beside the server's address, for a model of `task`."""
    if task == CHAT_TASK:
        return json.dumps({"messages": SMOKE_MESSAGES, "max_tokens": SMOKE_TOKENS})
    return json.dumps({"prompt": SMOKE_PROMPT, "max_tokens": SMOKE_TOKENS})


def champion_uri(uri: str, model_name: str) -> str | None:
    """models:/<name>@champion if that alias is set in the registry at `uri`, else None."""
    return None if champion_version(uri, model_name) is None else f"models:/{model_name}@{CHAMPION}"


def no_champion(model_name: str) -> UserError:
    return UserError(
        f"registered model {model_name!r} has no champion yet; run `llmpipe run` first"
    )


def serve_forever(project: Path, host: str, port: int, model_name: str) -> int:
    uri = tracking_uri(project)
    try:  # a locked or corrupt database is not "no champion"
        check_registry(uri)
        model_uri = champion_uri(uri, model_name) if registry_exists(uri) else None
    except RegistryUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if model_uri is None:
        raise no_champion(model_name)
    ensure_port_free(host, port, "stop what listens there, or pass --port (or set serve.port)")
    print(
        f"serving {model_uri} on http://{host}:{port} (Ctrl-C stops)\n"
        f"  curl -s http://{host}:{port}/invocations -H 'Content-Type: application/json' "
        f"-d '{example_request(registered_task(uri, model_uri))}'",
        flush=True,
    )
    try:
        return subprocess.run(serve_command(model_uri, host, port), env=server_env(uri)).returncode
    except KeyboardInterrupt:
        return 0


PARITY_PROMPTS = 3  # held-out prompts whose served answers must equal in-process generation


def heldout_prompts(prepared: Path | None) -> list | None:
    """The first held-out conversations up to their last answer (chat data), or openings of
    held-out documents (text data); None when there is no prepared data (the built-in prompt)."""
    if prepared is None or not (prepared / "stats.json").is_file():
        return None
    from steps.samples import chat_prompts, sample_prompts
    from steps.scoring import heldout

    held = heldout(prepared)
    if held.kind == "chat":
        return chat_prompts(held.items, PARITY_PROMPTS)
    return sample_prompts(held.items, PARITY_PROMPTS)


def smoke_prompts(task: str, prepared: Path | None) -> list[Prompt]:
    """What the smoke check asks a model of `task`: the built-in prompt first (its answer is the
    one reported), then the held-out prompts of `prepared` (heldout_prompts). Register records the
    model's greedy replies to the same prompts."""
    return [*default_prompts(task), *(heldout_prompts(prepared) or [])]


def main() -> dict:
    args = stage_arguments(text=("model_uri",))
    params = load_params(args.params)
    uri = tracking_uri(args.params.resolve().parent)
    print(f"smoke_serve: serving {args.model_uri} with `mlflow models serve` on {LOOPBACK} ...")
    report = smoke_serve(args.model_uri, uri, params.serve.smoke_requests, prepared=args.prepared)
    record_latency(uri, args.model_uri, report)
    report["within_budget"], report["verdict"] = within_budget(report, params.serve.max_p95_ms)
    print(f"smoke_serve: {args.model_uri} answered {report['completion']!r}; {report['verdict']}")
    return report


if __name__ == "__main__":
    run_step(main)
