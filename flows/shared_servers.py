"""The team's servers on PostgreSQL, for `llmpipe up` (flows/stack.py):

    llmpipe up --mlflow-database-url postgresql://llmpipe@127.0.0.1:5432/mlflow \\
               --prefect-database-url postgresql+asyncpg://llmpipe@127.0.0.1:5432/prefect \\
               [--artifacts-destination DIR]

MLflow: `mlflow server` on its database instead of `mlflow ui` on sqlite, with MLflow's basic-auth
app (every call needs a user; registry writes too) and proxied artifacts (clients send files
through the server, which stores them under DIR, default the project's mlartifacts/; runs record
`mlflow-artifacts:` URIs). Prefect: its server keeps flow runs, deployments and logs in its
database.

Logins come from the environment only and reach only the process that needs them:
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (the runner's MLflow client); the MLflow admin
created on the server's first start, MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD
(default: the tracking pair), written only to a 0600 temporary file (MLFLOW_AUTH_CONFIG_PATH) that
`up` deletes when it stops. The databases' password belongs in PGPASSWORD or ~/.pgpass, not in the
URL (a command line is visible to every local user).
"""

from __future__ import annotations

import base64
import os
import secrets
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from steps.errors import UserError

MLFLOW_SCHEMES = ("postgresql", "postgresql+psycopg")  # SQLAlchemy 2.1: psycopg 3 for both
PREFECT_SCHEMES = ("postgresql+asyncpg",)  # Prefect's server is async: asyncpg only
USER, PASSWORD = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
ADMIN_USER, ADMIN_PASSWORD = "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"
MLFLOW_SECRETS = (USER, PASSWORD, ADMIN_USER, ADMIN_PASSWORD)
MIN_PASSWORD = 12  # MLflow's basic-auth refuses a shorter password for a user it creates
CONNECT_TIMEOUT_S = 5


@dataclass(frozen=True)
class SharedServers:
    """What `up` was given; None for a server that keeps its local default."""

    mlflow_db: str | None = None
    prefect_db: str | None = None
    artifacts: Path | None = None  # where the MLflow server stores proxied artifacts


def masked(url: str) -> str:
    """`url` with its password, if any, replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def shared_servers(
    project: Path,
    mlflow_db: str | None,
    prefect_db: str | None,
    artifacts: str | None,
    environ: Mapping[str, str] = os.environ,
) -> SharedServers | None:
    """Check the options and the environment they need; every problem in one UserError."""
    problems = []
    for option, url, schemes in (
        ("--mlflow-database-url", mlflow_db, MLFLOW_SCHEMES),
        ("--prefect-database-url", prefect_db, PREFECT_SCHEMES),
    ):
        scheme = urlsplit(url).scheme if url else None
        if url is not None and scheme not in schemes:
            problems.append(
                f"{option} must start with {' or '.join(s + '://' for s in schemes)} "
                f"(got {masked(url)!r}), e.g. {schemes[0]}://USER@127.0.0.1:5432/DBNAME"
            )
    if artifacts is not None and mlflow_db is None:
        problems.append("--artifacts-destination needs --mlflow-database-url")
    if artifacts is not None and "://" in artifacts:
        problems.append(f"--artifacts-destination must be a directory (got {artifacts!r})")
    if mlflow_db is not None:
        problems += login_problems(environ)
    if problems:
        raise UserError("; ".join(problems))
    if mlflow_db is None and prefect_db is None:
        return None
    where = None
    if mlflow_db is not None:
        where = Path(artifacts).resolve() if artifacts else Path(project).resolve() / "mlartifacts"
    return SharedServers(mlflow_db, prefect_db, where)


def login_problems(environ: Mapping[str, str]) -> list[str]:
    missing = [name for name in (USER, PASSWORD) if not environ.get(name)]
    if missing:
        return [
            f"--mlflow-database-url needs {' and '.join(missing)} set: the MLflow login that "
            f"the runner uses (and, on the server's first start, its admin unless "
            f"{ADMIN_USER}/{ADMIN_PASSWORD} are set)"
        ]
    _, password = admin_login(environ)
    if len(password) < MIN_PASSWORD or "\n" in password:
        which = ADMIN_PASSWORD if environ.get(ADMIN_PASSWORD) else PASSWORD
        return [f"{which} must be one line of at least {MIN_PASSWORD} characters (MLflow's rule)"]
    return []


def admin_login(environ: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """The admin MLflow creates on its first start: MLFLOW_AUTH_ADMIN_*, else the tracking login."""
    return (
        environ.get(ADMIN_USER) or environ[USER],
        environ.get(ADMIN_PASSWORD) or environ[PASSWORD],
    )


def check_reachable(option: str, url: str) -> None:
    """UserError naming `option` unless the database at `url` accepts a connection."""
    import psycopg

    rest = url.split("://", 1)[1]  # libpq's URL: no SQLAlchemy driver name
    try:
        psycopg.connect(f"postgresql://{rest}", connect_timeout=CONNECT_TIMEOUT_S).close()
    except psycopg.Error as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[-1]
        raise UserError(
            f"{option}: cannot connect to {masked(url)} ({reason}); start PostgreSQL, create "
            f"the database, or fix the URL (the password goes in PGPASSWORD or ~/.pgpass)"
        ) from None


def write_auth_config(database_url: str, environ: Mapping[str, str] = os.environ) -> Path:
    """MLflow's basic-auth settings in a new 0600 file: users live in the MLflow database (tables
    of their own), every user may read, the admin is created on the first start."""
    user, password = admin_login(environ)

    def ini(value: str) -> str:  # configparser reads % as interpolation
        return value.replace("%", "%%")

    fd, name = tempfile.mkstemp(prefix="llmpipe-mlflow-auth-", suffix=".ini")  # mode 0600
    with os.fdopen(fd, "w") as f:
        f.write(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = {ini(database_url)}\n"
            f"admin_username = {ini(user)}\n"
            f"admin_password = {ini(password)}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
    return Path(name)


def mlflow_server_cmd(bin_dir: Path, shared: SharedServers, host: str, port: int) -> list[str]:
    assert shared.mlflow_db is not None and shared.artifacts is not None
    return [
        str(bin_dir / "mlflow"),
        "server",
        "--backend-store-uri",
        shared.mlflow_db,
        "--serve-artifacts",
        "--artifacts-destination",
        str(shared.artifacts),
        "--app-name",
        "basic-auth",
        "--host",
        host,
        "--port",
        str(port),
    ]


def mlflow_server_env(base: Mapping[str, str], auth_config: Path) -> dict[str, str]:
    """The server reads its admin from `auth_config` only; no client login reaches it."""
    env = {k: v for k, v in base.items() if k not in MLFLOW_SECRETS}
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_config)
    # signs the UI's CSRF tokens; one per `up` (the workers share it through the environment)
    env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_hex(32)
    return env


def client_login(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    return {USER: environ[USER], PASSWORD: environ[PASSWORD]}


def check_login(url: str, environ: Mapping[str, str] = os.environ) -> None:
    """UserError unless the MLflow server at `url` accepts the tracking login (it may not: the
    admin was created on the server's first start, with the password of that day)."""
    token = base64.b64encode(f"{environ[USER]}:{environ[PASSWORD]}".encode()).decode()
    request = urllib.request.Request(
        f"{url}/api/2.0/mlflow/experiments/search?max_results=1",
        headers={"Authorization": f"Basic {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30):
            return
    except urllib.error.HTTPError as err:
        if err.code not in (401, 403):
            raise
    raise UserError(
        f"the MLflow server refuses {USER}/{PASSWORD}: give a user it knows (its admin was "
        f"created on its first start from {ADMIN_USER}/{ADMIN_PASSWORD}, else from those two)"
    )
