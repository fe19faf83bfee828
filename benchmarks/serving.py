"""Serving: the stock MLflow scoring server against in-process generation, and under load.

    python benchmarks/serving.py [--quick] [--model DIR] [--requests N] [--tokens N]

The model (default: the embedded SmolLM2-135M-Instruct) is logged and registered into a temporary
sqlite registry by steps.registry.log_and_register (the register step's own call), as an
llm/v1/completions model (greedy by default, as registered models are), and served by the stock
`mlflow models serve -m models:/bench@challenger --env-manager local` on a free 127.0.0.1 port
(steps.serve.serve_command: what `llmpipe serve` and the smoke check start).
- latency: `--requests` requests one after another, each a `--tokens`-token completion (32) of
  the README's prompt at temperature 0 (its curl example), through HTTP, against as many
  in-process generations of the same prompt (steps.chat_serving.generate_reply: `generate`,
  greedy, the same token budget) by the logged model loaded here as the server loads it (before
  any timer, while the server idles). p50 of each; goal: served / in-process <= 1.2. Both sides
  generate the same tokens: the served text must equal the in-process one (checked).
- concurrency: 1, 4 and 8 client threads each sending `--requests` requests (the same body) at
  once: requests per second and errors (an HTTP error, a time-out, or an answer that differs
  from the in-process one); goal: 0 errors at every level.
Server start-up (loading the model) is outside every timer. `--quick` sends 6 requests per
measurement instead of 20. Ends with one JSON line; exits 1 only when it could not measure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.workloads import MeasureError, print_checks  # noqa: E402  (after the path)

PROMPT = "In Python, the for statement"  # the README's curl example
CLIENTS = (1, 4, 8)
GOALS = {"p50_latency_served_vs_in_process": "<=1.2"}
GOALS.update({f"errors_at_{n}_clients": "<=0" for n in CLIENTS})


def register(model_dir: Path, uri: str) -> str:
    """Log and register `model_dir` as the register step does (completions); its models:/ URI."""
    from mlflow import MlflowClient

    from steps.registry import COMPLETIONS_TASK, log_and_register

    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("bench-serving"))
    os.environ.update(MLFLOW_TRACKING_URI=uri, MLFLOW_RUN_ID=run.info.run_id)
    try:
        mv = log_and_register(uri, "bench", model_dir, {}, task=COMPLETIONS_TASK)
    finally:
        os.environ.pop("MLFLOW_RUN_ID", None)
        client.set_terminated(run.info.run_id)
    return f"models:/bench/{mv.version}"


def timed(call, n: int) -> tuple[list[float], list]:
    """n calls one after another: each one's seconds and result."""
    seconds, results = [], []
    for _ in range(n):
        start = time.perf_counter()
        results.append(call())
        seconds.append(time.perf_counter() - start)
    return seconds, results


def under_load(url: str, clients: int, requests: int, tokens: int, expected: str) -> dict:
    """`clients` threads each sending `requests` requests at once: requests/s and errors."""
    from steps.chat_serving import ask

    errors: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(requests):
            try:
                answer = ask(url, PROMPT, tokens)
                wrong = None if answer == expected else f"answer {answer!r} != {expected!r}"
            except Exception as e:  # an HTTP error or a time-out counts as an error
                wrong = f"{type(e).__name__}: {e}"
            if wrong:
                with lock:
                    errors.append(wrong)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    return {"requests_per_s": clients * requests / seconds, "seconds": seconds, "errors": errors}


def main(argv: list[str] | None = None) -> int:
    import torch

    from benchmarks.train import resolve_model
    from steps.environment import quiet_offline_env
    from steps.serve import download_model, load_logged, scoring_server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 requests per measurement")
    parser.add_argument("--model", help="model directory (default: the embedded SmolLM2-135M)")
    parser.add_argument("--requests", type=int, help="requests per measurement (20, quick 6)")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per completion")
    args = parser.parse_args(argv)
    n = args.requests or (6 if args.quick else 20)
    os.environ.update(quiet_offline_env())
    os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        model_dir = resolve_model(args.model)
        with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
            work = Path(tmp)
            uri = f"sqlite:///{work}/mlflow.db"
            model_uri = register(model_dir, uri)
            model, tokenizer = load_logged(download_model(model_uri, uri, work / "logged"))
            with scoring_server(model_uri, uri, work / "server.log") as server:
                result = measure(server.url, model, tokenizer, n, args.tokens)
    except (MeasureError, RuntimeError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    report(result, model_dir, n, args.tokens, torch.get_num_threads())
    return 0


def measure(url: str, model, tokenizer, n: int, tokens: int) -> dict:
    from steps.chat_serving import ask, generate_reply, served_form

    # one untimed request and generation each: the server's and this process's first call
    reply = generate_reply(model, tokenizer, PROMPT, tokens)
    expected = served_form(tokenizer, reply)
    if ask(url, PROMPT, tokens) != expected:
        raise MeasureError("the server's answer differs from in-process greedy generation")
    in_process, _ = timed(lambda: generate_reply(model, tokenizer, PROMPT, tokens), n)
    served, answers = timed(lambda: ask(url, PROMPT, tokens), n)
    if any(a != expected for a in answers):
        raise MeasureError("a served answer differs from in-process greedy generation")
    load = {c: under_load(url, c, n, tokens, expected) for c in CLIENTS}
    return {
        "in_process": in_process,
        "served": served,
        "new_tokens": len(reply.new_ids),
        "answer": expected,
        "load": load,
    }


def report(r: dict, model_dir: Path, n: int, tokens: int, threads: int) -> None:
    p50 = {side: statistics.median(r[side]) for side in ("in_process", "served")}
    print(
        f"model {model_dir}; {threads} torch threads here; prompt {PROMPT!r}, {tokens} new tokens "
        f"at most, greedy: {r['new_tokens']} generated ({r['answer'][:60]!r}...); server start-up "
        "outside every timer"
    )
    for side, label in (("in_process", "in-process generate"), ("served", "scoring server")):
        times = sorted(r[side])
        print(
            f"{label}: {n} requests one after another, p50 {p50[side] * 1000:.0f} ms "
            f"(min {times[0] * 1000:.0f}, max {times[-1] * 1000:.0f})"
        )
    ratios = {"p50_latency_served_vs_in_process": p50["served"] / p50["in_process"]}
    for clients, load in r["load"].items():
        print(
            f"{clients} concurrent client(s), {n} requests each: {load['requests_per_s']:.2f} "
            f"requests/s over {load['seconds']:.1f} s, {len(load['errors'])} errors"
            + (f" (first: {load['errors'][0]})" if load["errors"] else "")
        )
        ratios[f"errors_at_{clients}_clients"] = float(len(load["errors"]))
    print_checks("serving", ratios, GOALS)


if __name__ == "__main__":
    from benchmarks.workloads import run_benchmark

    run_benchmark(main)
