"""The `llmpipe` command; each subcommand runs in the project directory (params.yaml, dvc.yaml).

llmpipe run [-S section.key=value ...]        # the finetune flow (what `make run` does)
llmpipe serve [--host H] [--port P]           # serve models:/llmpipe@champion with MLflow
llmpipe perplexity --model M --input FILE     # score any model on any .txt/.jsonl file
llmpipe chat [--model M] [--system TEXT]      # talk to a chat model (default: the champion)
llmpipe sweep -S section.key=v1,v2 ...        # a grid of runs; only the best may be champion
llmpipe models [--json]                       # registered versions, metrics, aliases, lineage
llmpipe promote VERSION [--force --reason R]  # gate + serving check, then move champion
llmpipe rollback                              # champion back to the version it replaced
llmpipe deploy [--pool NAME]                  # the Prefect deployments, on PREFECT_API_URL
llmpipe up                                    # Prefect server + UI, runner, MLflow UI
llmpipe data add FILE [--remote DIR|URL]      # validate, copy to data/raw, dvc add, dvc push
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from flows.chat import add_arguments as add_chat_arguments
from flows.report import stages_text
from flows.stack import PrefectServerUnavailable, prefect_server_for_run
from steps.environment import quiet_offline_env
from steps.errors import USER_ERROR_EXIT, UserError
from steps.outcome import exit_fast
from steps.servers import LOOPBACK, MLFLOW_UI_PORT, PREFECT_PORT
from steps.tracking import RegistryUnavailable


def promotion_text(promotion: dict) -> str:
    verdict = "promoted to champion" if promotion["promoted"] else "not promoted"
    return f"{verdict}: " + "; ".join(promotion["reasons"])


def format_summary(summary: dict, seconds: float) -> str:
    if "skipped" in summary:
        return f"llmpipe run: {summary['skipped']}"
    m, reg = summary["metrics"], summary["register"]
    stages = stages_text(summary["stages"])
    change = m["perplexity"] / m["base_perplexity"] - 1
    tasks = [*summary["stages"], *(summary.get(k, {}) for k in ("register", "serve", "promotion"))]
    inside = sum(t.get("seconds", 0.0) for t in tasks)
    retried = sum(t.get("retried_seconds", 0.0) for t in tasks)
    overhead = seconds - inside - retried
    lines = [
        # Time between the stages only: DVC's and MLflow's work inside a stage counts as the
        # stage's (benchmarks/orchestration.py measures those shares too)
        f"llmpipe run finished in {seconds / 60:.1f} min "
        f"({overhead:.0f} s = {overhead / seconds:.1%} between the stages; "
        + (f"failed attempts and their retries {retried:.0f} s; " if retried >= 0.5 else "")
        + "the rest inside them, DVC's and MLflow's work there included)",
        f"  stages      {stages}",
        f"  perplexity  base {m['base_perplexity']:.3f} -> tuned {m['perplexity']:.3f}"
        f" ({change:+.1%})"
        + (
            f" on the answers of {m['documents']} held-out conversations, {m['tokens']} tokens"
            if m.get("scored") == "responses"
            else f" on {m['documents']} held-out documents, {m['tokens']} tokens"
        )
        + f" (tuned 95% interval {m['perplexity_ci_low']:.3f}-{m['perplexity_ci_high']:.3f})",
        f"  general     reference-text perplexity {m['base_reference_perplexity']:.3f} -> "
        f"{m['reference_perplexity']:.3f} ({m['forgetting']:+.1%}, the forgetting guard)",
        f"  registry    {reg['model_name']} version {reg['version']}"
        f"{' (new)' if reg['new_version'] else ' (already registered; nothing new)'}"
        f" aliases: {', '.join(reg['aliases']) or 'none'}",
        f"  promotion   {promotion_text(summary['promotion'])}",
    ]
    serve = summary.get("serve")
    if serve and "completion" in serve:
        lines.append(
            f"  served      {serve['model_uri']}: {serve['prompt']!r} -> "
            f"{serve['completion'].strip()[:120]!r} (p50 {serve['p50_ms']:.0f} ms, "
            f"p95 {serve['p95_ms']:.0f} ms over {serve['requests']} requests)"
        )
    elif serve:
        lines.append(f"  served      skipped: {serve['skipped']}")
    uri = summary["tracking_uri"]
    lines += [
        "  next        mlflow ui --backend-store-uri " + uri + "   (runs, loss curve, versions)",
        "              dvc metrics show                 (metrics/eval.json, metrics/train.json)",
        f"              llmpipe serve                    (champion on http://{LOOPBACK}:"
        f"{summary.get('serve_port', '')})",
    ]
    return "\n".join(lines)


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def unwind_on_signals() -> None:
    """SIGTERM (a service manager, `timeout`, `kill`) and SIGHUP (a closed terminal or SSH session)
    unwind like Ctrl-C: the running stage's process group is killed, the MLflow run ends FAILED,
    the workspace lock is released and the temporary Prefect server stops (at exit)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def stopped(err: KeyboardInterrupt) -> int:
    how = str(err) or "SIGINT"
    print(f"error: llmpipe stopped by {how}; the running stage was killed", file=sys.stderr)
    return 128 + getattr(signal, how, signal.SIGINT)


def cmd_run(args: argparse.Namespace) -> int:
    from flows.finetune import check_inputs, finetune
    from flows.lock import WorkspaceBusy
    from flows.runner import UserInputError
    from steps.tracking import check_registry, tracking_uri

    started = time.monotonic()
    check_inputs(Path.cwd(), args.set or [])  # fail fast, before Prefect starts
    unwind_on_signals()
    try:
        check_registry(tracking_uri(Path.cwd()))
        prefect_server_for_run(Path.cwd())  # PREFECT_API_URL's, once it answers, or a temporary one
        summary = finetune(
            project_dir=".",
            overrides=args.set or [],
            serve_check=not args.no_serve_check,
            only_if_data_changed=args.only_if_data_changed,
            keep_edits=True,
        )
    except (UserError, UserInputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR_EXIT
    except (WorkspaceBusy, RegistryUnavailable, PrefectServerUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        return stopped(err)
    print(format_summary(summary, time.monotonic() - started))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from steps.params import load_params
    from steps.serve import serve_forever

    params = load_params()
    return serve_forever(
        Path.cwd(),
        args.host or params.serve.host,
        args.port or params.serve.port,
        params.registry.model_name,
    )


def cmd_perplexity(args: argparse.Namespace) -> int:
    import json

    from pydantic import ValidationError

    from steps.params import EvaluateParams
    from steps.perplexity import score_file

    os.environ.setdefault("TQDM_DISABLE", "1")  # keep stdout/stderr to the result
    stride = args.stride or args.window
    if stride > args.window:
        raise UserError(f"--stride ({stride}) must not exceed --window ({args.window})")
    try:
        params = EvaluateParams(
            window=args.window,
            stride=stride,
            batch_size=args.batch_size,
            precision=args.precision,
        )
    except ValidationError as err:
        first = err.errors()[0]
        raise UserError(f"--{first['loc'][0].replace('_', '-')}: {first['msg']}") from None
    result = score_file(args.model, Path(args.input), params, Path.cwd(), args.text_field)
    keys = [
        "model",
        "input",
        "texts",
        "tokens",
        "perplexity",
        "ci_low",
        "ci_high",
        "bits_per_byte",
        "skipped",
    ]
    out = {k: result[k] for k in keys}
    out["precision"] = result["precision"]
    if args.per_text:
        out["perplexities"] = result["perplexities"]
        out["mean_perplexity"] = result["mean_perplexity"]
    if args.json:
        print(json.dumps(out))
        return 0
    print(
        f"perplexity {out['perplexity']:.4f} (95% CI {out['ci_low']:.4f}-{out['ci_high']:.4f}) "
        f"on {out['texts']} texts, {out['tokens']} tokens; {out['bits_per_byte']:.4f} bits/byte "
        f"({out['precision']})"
    )
    if args.per_text:
        for i, ppl in enumerate(out["perplexities"]):
            print(
                f"  text {i}: " + ("skipped (fewer than 2 tokens)" if ppl is None else f"{ppl:.4f}")
            )
        print(f"  mean of per-text perplexities: {out['mean_perplexity']:.4f}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from flows.chat import run_chat

    return run_chat(args)


def cmd_data_add(args: argparse.Namespace) -> int:
    from flows.data import DataAddFailed, add_data
    from flows.lock import WorkspaceBusy

    try:
        added = add_data(Path(args.path), Path.cwd(), args.remote, args.force)
    except (DataAddFailed, WorkspaceBusy) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"added {added['path']} ({added['documents']} documents, md5 {added['md5']}), pushed to "
        f"{added['remote']}; prepare.data now points at it: `llmpipe run` trains on it"
    )
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from flows.runner import UserInputError
    from flows.sweep import expand_grid, sweep

    expand_grid(args.set or [])  # a malformed axis fails before Prefect starts
    unwind_on_signals()
    try:
        prefect_server_for_run(Path.cwd())  # PREFECT_API_URL's, once it answers, or a temporary one
        result = sweep(project_dir=".", grid=args.set, serve_check=not args.no_serve_check)
    except (UserError, UserInputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR_EXIT
    except PrefectServerUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        return stopped(err)
    for run in result["runs"]:
        print(
            f"  {' '.join(run['overrides']):<50} perplexity {run['perplexity']:.4f}"
            f"  (version {run['version']})"
        )
    best = result["best"]
    print(
        f"sweep {result['sweep_id']}: best {' '.join(best['overrides'])}; "
        + promotion_text(result["final"]["promotion"])
    )
    print(f"compare the runs in MLflow: filter on tags.sweep = '{result['sweep_id']}'")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from flows.models import list_models
    from steps.params import load_params

    print(list_models(Path.cwd(), load_params(), args.json))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from flows.models import promote_version
    from steps.params import load_params

    said = promote_version(Path.cwd(), load_params(), args.version, args.force, args.reason)
    print("\n".join(said))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from flows.models import rollback
    from steps.params import load_params

    print(rollback(Path.cwd(), load_params()))
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from flows.deploy import apply_deployments
    from steps.params import load_params

    if not os.environ.get("PREFECT_API_URL"):
        raise UserError(
            "PREFECT_API_URL is not set; point it at a Prefect server, or use `llmpipe up`"
        )
    if args.pool:
        from flows.pool import deploy_to_pool

        ids = deploy_to_pool(Path.cwd(), load_params(), args.pool)
        print(
            f"deployed finetune/manual and finetune/retrain-on-new-data on work pool "
            f"{args.pool!r} ({', '.join(ids)}); runs need a worker, in the project's clone on "
            "the machine that trains: "
            f"`LLMPIPE_PROJECT_DIR=$PWD prefect worker start --pool {args.pool}`"
        )
        return 0
    from flows.pool import check_not_on_a_pool

    check_not_on_a_pool()
    ids = apply_deployments(Path.cwd(), load_params())
    print(
        f"deployed finetune/manual and finetune/retrain-on-new-data ({', '.join(ids)}); "
        "runs need a runner: `python -m flows.deploy` in this directory (llmpipe up starts one)"
    )
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from flows.deploy import check_schedule
    from flows.shared_servers import shared_servers
    from flows.stack import up
    from steps.params import load_params

    shared = shared_servers(
        Path.cwd(), args.mlflow_database_url, args.prefect_database_url, args.artifacts_destination
    )
    check_schedule(load_params())  # a broken params.yaml should stop us before three servers start
    return up(Path.cwd(), args.prefect_port, args.mlflow_port, shared, runner=not args.no_runner)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmpipe", description="Fine-tune a causal LM on your text."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the finetune flow (DVC skips what is up to date)")
    run.add_argument(
        "-S",
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="edit params.yaml before the run, e.g. -S train.max_steps=100",
    )
    run.add_argument(
        "--no-serve-check",
        action="store_true",
        help="skip serving the candidate (then nothing is promoted)",
    )
    run.add_argument(
        "--only-if-data-changed",
        action="store_true",
        help="do nothing when the data is what the champion was trained on",
    )
    run.set_defaults(func=cmd_run)
    serve = sub.add_parser("serve", help="serve the champion with `mlflow models serve`")
    serve.add_argument("--host", help="bind address (default: serve.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: serve.port, 5001)")
    serve.set_defaults(func=cmd_serve)
    ppl = sub.add_parser("perplexity", help="score any model on any .txt/.jsonl file")
    ppl.add_argument("--model", required=True, help="model directory or models:/NAME@ALIAS")
    ppl.add_argument("--input", required=True, help=".txt (blank-line separated) or .jsonl file")
    ppl.add_argument("--text-field", default="text", help="JSONL key of the text (default: text)")
    ppl.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    ppl.add_argument("--stride", type=int, help="tokens a window advances (default: window)")
    ppl.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    ppl.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="auto: bf16 autocast where the device has native bf16, else fp32 (default auto)",
    )
    ppl.add_argument("--per-text", action="store_true", help="also each text's perplexity")
    ppl.add_argument("--json", action="store_true", help="print one JSON object")
    ppl.set_defaults(func=cmd_perplexity)
    chat = sub.add_parser("chat", help="talk to a chat model in the terminal (streamed)")
    add_chat_arguments(chat)
    chat.set_defaults(func=cmd_chat)
    sweep = sub.add_parser("sweep", help="a grid of runs; only the best can become champion")
    sweep.add_argument(
        "-S",
        "--set",
        action="append",
        required=True,
        metavar="SECTION.KEY=V1,V2",
        help="one axis of the grid",
    )
    sweep.add_argument("--no-serve-check", action="store_true", help="skip the final smoke_serve")
    sweep.set_defaults(func=cmd_sweep)
    models = sub.add_parser("models", help="registered versions: metrics, aliases, lineage")
    models.add_argument("--json", action="store_true", help="print one JSON object")
    models.set_defaults(func=cmd_models)
    prom = sub.add_parser("promote", help="make VERSION the champion (gate, serving check)")
    prom.add_argument("version", help="registered version number (see `llmpipe models`)")
    prom.add_argument("--force", action="store_true", help="skip the gate (needs --reason)")
    prom.add_argument("--reason", help="why the gate is skipped; recorded on the version")
    prom.set_defaults(func=cmd_promote)
    back = sub.add_parser("rollback", help="move champion back to the version it replaced")
    back.set_defaults(func=cmd_rollback)
    deploy = sub.add_parser("deploy", help="create the Prefect deployments (manual, scheduled)")
    deploy.add_argument(
        "--pool", help="place them on this Prefect work pool, for its workers (flows/pool.py)"
    )
    deploy.set_defaults(func=cmd_deploy)
    stack = sub.add_parser(
        "up",
        help="Prefect server (with a login) + runner + MLflow UI on 127.0.0.1",
        description="The Prefect UI and API need a login: LLMPIPE_UI_AUTH=user:password, or, "
        "when unset, one generated and shown once on this terminal.",
    )
    stack.add_argument("--prefect-port", type=int, default=PREFECT_PORT)
    stack.add_argument("--mlflow-port", type=int, default=MLFLOW_UI_PORT)
    # the team's servers on PostgreSQL (flows/shared_servers.py); unset: today's local stores
    stack.add_argument(
        "--mlflow-database-url",
        metavar="URL",
        help="run `mlflow server` on this PostgreSQL database (postgresql://USER@HOST:PORT/DB) "
        "with a login (MLFLOW_TRACKING_USERNAME/PASSWORD) and proxied artifacts",
    )
    stack.add_argument(
        "--artifacts-destination",
        metavar="DIR",
        help="where that server stores artifacts (default: the project's mlartifacts/)",
    )
    stack.add_argument(
        "--prefect-database-url",
        metavar="URL",
        help="keep the Prefect server's state in this PostgreSQL database "
        "(postgresql+asyncpg://USER@HOST:PORT/DB)",
    )
    stack.add_argument(
        "--no-runner",
        action="store_true",
        help="servers only: the flows run on a work pool's workers (llmpipe deploy --pool)",
    )
    stack.set_defaults(func=cmd_up)
    data = sub.add_parser("data", help="bring new data under DVC")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    add = data_sub.add_parser("add", help="validate, copy to data/raw, dvc add, dvc push")
    add.add_argument("path", help="a .txt or .jsonl file")
    add.add_argument("--remote", help="DVC remote URL or directory (default: the configured one)")
    add.add_argument(
        "--force", action="store_true", help="replace a different file of the same name"
    )
    add.set_defaults(func=cmd_data_add)
    return parser


# Prefect allows its temporary server 20 s to start; a busy laptop can take longer (the same
# setting bounds the start of the one llmpipe starts instead: flows/stack.py)
EPHEMERAL_STARTUP_S = "120"


def main(argv: list[str] | None = None) -> None:
    os.environ.update(quiet_offline_env())
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", EPHEMERAL_STARTUP_S)
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        code = USER_ERROR_EXIT
    except RegistryUnavailable as err:  # a locked or corrupt mlflow.db: a fault, in one line
        print(f"error: {err}", file=sys.stderr)
        code = 1
    if argv is None:  # the `llmpipe` command itself: no interpreter teardown to wait for
        exit_fast(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
