"""`llmpipe up`: the whole local stack on 127.0.0.1, stopped together by Ctrl-C (or SIGTERM, or
SIGHUP when its terminal closes).

    llmpipe up [--prefect-port 4200] [--mlflow-port 5000]      # defaults: steps/servers.py
               [--mlflow-database-url URL [--artifacts-destination DIR]]
               [--prefect-database-url URL]     # the team's servers on PostgreSQL:
                                                # flows/shared_servers.py
               [--no-runner]                    # servers only: flows run on work pools

1. a Prefect server with its UI (the UI is told its API's URL, so a non-default port works), behind
   basic auth and CSRF protection: every API call needs the `user:password` login, and every write
   a CSRF token besides (so neither another local process nor a web page reaching loopback can
   start a run);
2. a runner (`python -m flows.deploy`) that registers the deployments and executes their runs
   (not with --no-runner: the deployments then live on a work pool, `llmpipe deploy --pool`);
3. the MLflow UI on the project's tracking store (or, with --mlflow-database-url, an MLflow server
   with a login and proxied artifacts on PostgreSQL; the runner then tracks into it), started
   before the runner, so that its store is created or migrated before any run can start.

The login is $LLMPIPE_UI_AUTH (`user:password`), or, when that is not set, generated and written
once to the controlling terminal (never to stdout, which may be a log file). Only the server and the
runner get it, through Prefect's own settings (PREFECT_SERVER_API_AUTH_STRING on the server,
PREFECT_API_AUTH_STRING for the clients); the MLflow UI and the pipeline's stages do not.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from flows import shared_servers
from flows.shared_servers import SharedServers
from steps.environment import quiet_offline_env
from steps.errors import UserError
from steps.executables import interpreter_bin
from steps.servers import LOOPBACK as HOST
from steps.servers import (
    MLFLOW_UI_PORT,
    PREFECT_PORT,
    free_port,
    stop_process_group,
    wait_http,
)
from steps.tracking import tracking_uri

AUTH_ENV = "LLMPIPE_UI_AUTH"  # user:password for the Prefect UI and API; generated when unset
GENERATED_USER = "llmpipe"
# Prefect's own settings: what the server checks, and what its clients (the runner, the flow runs)
# send. Neither is inherited from the caller's environment: `up` sets them.
SERVER_AUTH, CLIENT_AUTH = "PREFECT_SERVER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING"
UI_WORKERS = 2
SECRET_VARS = (AUTH_ENV, SERVER_AUTH, CLIENT_AUTH)


def ui_auth(environ: Mapping[str, str] = os.environ) -> tuple[str, bool]:
    """The login as `user:password`, and whether it was generated (LLMPIPE_UI_AUTH unset)."""
    given = environ.get(AUTH_ENV)
    if given is None:
        return f"{GENERATED_USER}:{secrets.token_urlsafe(18)}", True
    user, sep, password = given.partition(":")
    if not (sep and user and password and given.isascii() and given.isprintable()) or " " in given:
        raise UserError(
            f"{AUTH_ENV} must be user:password (both non-empty, printable ASCII, no spaces), "
            f"e.g. {AUTH_ENV}=operator:$(openssl rand -hex 16); unset it to have one generated"
        )
    return given, False


def open_terminal() -> TextIO | None:
    """The controlling terminal (where `up` was typed) for writing, or None when there is none."""
    try:
        return open("/dev/tty", "w")
    except OSError:
        return None


def stack_env(project: Path, prefect_port: int) -> dict[str, str]:
    """What every child gets: quiet, offline, the Prefect API's URL; no credentials."""
    api = f"http://{HOST}:{prefect_port}/api"
    env = {
        **quiet_offline_env(),
        "PREFECT_API_URL": api,
        "PREFECT_UI_API_URL": api,  # the browser calls this URL; it must match the port
        "PREFECT_SERVER_API_HOST": HOST,
        "PREFECT_SERVER_API_PORT": str(prefect_port),
        "MLFLOW_TRACKING_URI": tracking_uri(project),
        # on a terminal, `prefect server start` would otherwise stop to ask about profiles
        "PREFECT_CLI_PROMPT": "false",
        # MLflow 3's server starts a job runner (huey consumers, for GenAI jobs llmpipe never
        # submits) beside its UI: 8 more processes, ~2 GB of memory measured here
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    for name in SECRET_VARS:
        env.pop(name, None)
    return env


def server_env(base: dict[str, str], auth: str) -> dict[str, str]:
    """The server checks the login on every call but its health probe, and a CSRF token (one per
    client, from GET /api/csrf-token?client=ID) on every write; its own services call it too."""
    return {
        **base,
        SERVER_AUTH: auth,
        CLIENT_AUTH: auth,
        "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED": "true",
    }


def runner_env(base: dict[str, str], auth: str) -> dict[str, str]:
    """The runner and its flow runs: Prefect's client sends the login and fetches CSRF tokens."""
    return {**base, CLIENT_AUTH: auth, "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED": "true"}


def start(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """`cmd` in its own session; it shares our output but never reads the terminal's input."""
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, start_new_session=True)


class PrefectServerUnavailable(Exception):
    """The temporary Prefect server of a run did not start."""


# Prefect's own setting for its temporary server's start (it allows 20 s; cli.main sets 120)
STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


def die_with_parent() -> None:
    """In a child between fork and exec: SIGTERM it when the process that started it dies, even
    by SIGKILL (Linux's PR_SET_PDEATHSIG; elsewhere nothing)."""
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def prefect_server_for_run(project: Path) -> str:
    """The Prefect API that `llmpipe run` or `llmpipe sweep` reports to: the configured one
    (PREFECT_API_URL, in the environment or Prefect's profile) once it answers, else a temporary
    one started here (temporary_prefect_server). A configured server that does not answer is one
    line (PrefectServerUnavailable), not Prefect's traceback from deep inside the flow's start."""
    from prefect.settings import PREFECT_API_URL

    configured = PREFECT_API_URL.value()
    if not configured:
        return temporary_prefect_server(project)
    try:
        with urllib.request.urlopen(f"{configured.rstrip('/')}/health", timeout=15):
            pass
    except urllib.error.HTTPError:
        pass  # it answers (a login it wants, say): Prefect's client takes it from here
    except (urllib.error.URLError, OSError) as err:
        why = getattr(err, "reason", err)
        raise PrefectServerUnavailable(
            f"the Prefect server at PREFECT_API_URL ({configured}) does not answer ({why}); "
            "start it (`llmpipe up`), or unset PREFECT_API_URL for a temporary one"
        ) from None
    return configured


def temporary_prefect_server(project: Path) -> str:
    """For `llmpipe run` and `llmpipe sweep` when no Prefect server is configured: start one for
    this process, point PREFECT_API_URL at it and return that URL.

    It is the server Prefect would start by itself (its ephemeral mode: the API without the UI, on
    PREFECT_HOME's database), but in a session of its own. Prefect starts its own in llmpipe's
    process group, so a terminal's Ctrl-C, or a service manager's SIGTERM to the whole group,
    stopped it together with llmpipe, which then spent minutes retrying a dead server to report
    the run crashed, printed its tracebacks and exited 1. Now the signal reaches llmpipe alone: it
    stops the stage, reports the crash to a server still up, and exits 128 + N. The server stops
    at exit, after Prefect's log and event workers have drained (they drain in threading's exit
    hooks, before atexit's), and with llmpipe if llmpipe is killed outright (die_with_parent)."""
    from prefect.context import refresh_global_settings_context

    port = free_port()
    api = f"http://{HOST}:{port}/api"
    fd, name = tempfile.mkstemp(prefix="llmpipe-prefect-server-", suffix=".log")
    os.close(fd)
    log = Path(name)
    env = {
        **os.environ,
        "PREFECT__SERVER_EPHEMERAL": "1",  # what Prefect sets for its temporary server
        "PREFECT_CLI_PROMPT": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    cmd = [str(interpreter_bin() / "prefect"), "server", "start", "--host", HOST,
           "--port", str(port), "--no-ui", "--log-level", "error"]  # fmt: skip
    with log.open("w") as err:
        server = subprocess.Popen(cmd, env=env, cwd=project, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                  preexec_fn=die_with_parent)  # fmt: skip
    atexit.register(stop_temporary_server, server, log)
    print(f"llmpipe: a temporary Prefect server on {api}, stopped at exit (`llmpipe up` keeps "
          "one, with its UI; or set PREFECT_API_URL)", file=sys.stderr, flush=True)  # fmt: skip
    timeout = float(os.environ.get(STARTUP_TIMEOUT_ENV) or 120)
    try:
        wait_http(f"{api}/health", server, "the temporary Prefect server", timeout, log)
    except RuntimeError as err:
        raise PrefectServerUnavailable(
            f"{err} (within {timeout:.0f} s; more: {STARTUP_TIMEOUT_ENV}=N)"
        ) from None
    os.environ["PREFECT_API_URL"] = api  # for this process's Prefect client, and its children
    os.environ["PREFECT_UI_URL"] = ""  # it serves no UI: no "View at" link to a page that is not
    refresh_global_settings_context()  # Prefect read its settings at import: read them again
    return api


def stop_temporary_server(server: subprocess.Popen, log: Path) -> None:
    stop_process_group(server, grace=10)
    log.unlink(missing_ok=True)


def mlflow_ui_cmd(bin_dir: Path, uri: str, port: int) -> list[str]:
    """Today's default: the MLflow UI on the project's tracking store, no login; 2 web workers for
    one person's browser (MLflow's default, 4, holds ~0.25 GB each)."""
    mlflow = str(bin_dir / "mlflow")
    return [
        mlflow, "ui", "--backend-store-uri", uri, "--host", HOST, "--port", str(port),
        "--workers", str(UI_WORKERS),
    ]  # fmt: skip


def start_mlflow(
    procs: list[subprocess.Popen], cmd: list[str], env: dict[str, str], project: Path, url: str
) -> None:
    """`cmd` (the UI or the server), added to `procs`, once it answers its health probe."""
    proc = start(cmd, env, project)
    procs.append(proc)
    wait_http(f"{url}/health", proc, "mlflow " + cmd[1])


def up(
    project: Path,
    prefect_port: int = PREFECT_PORT,
    mlflow_port: int = MLFLOW_UI_PORT,
    shared: SharedServers | None = None,
    runner: bool = True,
) -> int:
    """Start the stack; `runner=False` (`--no-runner`): the servers only, for a team whose flows
    run on work pools (`llmpipe deploy --pool`), where a runner serving the same deployments
    would take them back from the pool's workers."""
    auth, generated = ui_auth()
    shared = shared or SharedServers()
    # a database that does not answer stops us before anything starts
    if shared.mlflow_db:
        shared_servers.check_reachable("--mlflow-database-url", shared.mlflow_db)
    if shared.prefect_db:
        shared_servers.check_reachable("--prefect-database-url", shared.prefect_db)
    terminal = open_terminal() if generated else None
    if generated and terminal is None:
        raise UserError(
            f"{AUTH_ENV} is not set and there is no terminal to show a generated login on "
            f"(it is never printed to a log); set {AUTH_ENV}=user:password"
        )
    env = stack_env(project, prefect_port)
    mlflow_url, auth_config = f"http://{HOST}:{mlflow_port}", None
    if shared.mlflow_db:
        # the flows track into the server (artifacts through its proxy); only the runner, below,
        # gets the MLflow login
        for name in shared_servers.MLFLOW_SECRETS:
            env.pop(name, None)
        env["MLFLOW_TRACKING_URI"] = mlflow_url
    prefect_env, runner_vars = server_env(env, auth), runner_env(env, auth)
    if shared.prefect_db:
        prefect_env["PREFECT_API_DATABASE_CONNECTION_URL"] = shared.prefect_db
    if shared.mlflow_db:
        runner_vars.update(shared_servers.client_login())
    if shared.mlflow_db or shared.prefect_db:
        runner_vars.pop("PGPASSWORD", None)  # only the servers talk to PostgreSQL
    bin_dir = Path(sys.executable).parent
    procs: list[subprocess.Popen] = []
    # SIGTERM (a service manager, `timeout`) and SIGHUP (the terminal closed) must stop the
    # children too: make them unwind like Ctrl-C.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda signum, frame: sys.exit(0))
    try:
        if shared.mlflow_db:  # first: a login it refuses stops us before Prefect starts
            auth_config = shared_servers.write_auth_config(shared.mlflow_db)
            mlflow_cmd = shared_servers.mlflow_server_cmd(bin_dir, shared, HOST, mlflow_port)
            mlflow_env = shared_servers.mlflow_server_env(env, auth_config)
            start_mlflow(procs, mlflow_cmd, mlflow_env, project, mlflow_url)
            shared_servers.check_login(mlflow_url)
        server = start(
            [
                str(bin_dir / "prefect"),
                "server",
                "start",
                "--host",
                HOST,
                "--port",
                str(prefect_port),
            ],
            prefect_env,
            project,
        )
        procs.append(server)
        wait_http(f"http://{HOST}:{prefect_port}/api/health", server, "prefect server")
        if not shared.mlflow_db:
            # before the runner: the MLflow UI creates or migrates mlflow.db as it starts, and a
            # run started from the Prefect UI meanwhile (the deployments appear with the runner)
            # migrated the same fresh file at the same time and failed (alembic: "Online migration
            # expected to match one row")
            mlflow_cmd = mlflow_ui_cmd(bin_dir, env["MLFLOW_TRACKING_URI"], mlflow_port)
            start_mlflow(procs, mlflow_cmd, env, project, mlflow_url)
        if runner:
            procs.append(start([sys.executable, "-m", "flows.deploy"], runner_vars, project))
        login = "the user:password below" if generated else f"the user:password in ${AUTH_ENV}"
        deployments = (
            "deployments: finetune/manual, finetune/retrain-on-new-data"
            if runner
            else "no runner: `llmpipe deploy --pool NAME`, and workers run the flows"
        )
        print(
            f"llmpipe is up (Ctrl-C stops everything):\n"
            f"  Prefect UI  http://{HOST}:{prefect_port}  ({deployments})\n"
            f"              log in with {login}\n"
            f"  MLflow UI   {mlflow_url}{mlflow_note(shared)}\n"
            f"  serve the champion with: llmpipe serve",
            flush=True,
        )
        if terminal is not None:
            with contextlib.suppress(OSError):  # the terminal may be gone already
                terminal.write(
                    f"  Prefect UI login (type it whole): {auth}\n"
                    f"  (shown only here, once; set {AUTH_ENV}=user:password to choose one)\n"
                )
                terminal.close()
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        dead = next(p for p in procs if p.poll() is not None)
        print(
            f"error: {' '.join(map(str, dead.args[:3]))} exited with {dead.returncode}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("\nstopping llmpipe ...", flush=True)
        return 0
    finally:
        # a second Ctrl-C or signal must not cut the clean-up short and leave servers behind
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        if terminal is not None:
            with contextlib.suppress(OSError):
                terminal.close()
        # last started, first stopped: the runner still reaches the server while it shuts down
        for proc in reversed(procs):
            stop_process_group(proc, grace=20)
        if auth_config is not None:
            auth_config.unlink(missing_ok=True)


def mlflow_note(shared: SharedServers) -> str:
    if not shared.mlflow_db:
        return ""
    return (
        f"  (a server: every call needs a login; artifacts stored in {shared.artifacts})\n"
        f"              clients: MLFLOW_TRACKING_URI=<this URL>, ${shared_servers.USER} and "
        f"${shared_servers.PASSWORD}"
    )
