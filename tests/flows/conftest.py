"""Fixtures of the integration tier: the golden project, run once per session and never changed."""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks.workloads import make_project
from steps.servers import free_port

PG_USER = "llmpipe"


def wait_until(
    ready: Callable[[], bool], proc: subprocess.Popen, log: Path, timeout: float, what: str
) -> None:
    """Poll ready() every 0.5 s until it holds. Fails with the end of `log` when `proc` exits
    first or after `timeout` seconds; a ready() that raises OSError or AssertionError (a server
    not listening yet, a request refused) counts as not ready yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{what}: exited {proc.returncode}: " + log_tail(log)
        try:
            if ready():
                return
        except (OSError, AssertionError):
            pass
        time.sleep(0.5)
    pytest.fail(f"{what}: not after {timeout:.0f} s: " + log_tail(log))


def request(
    url: str, body: dict | None = None, headers: dict | None = None, method: str | None = None
) -> tuple[int, object]:
    """(status, JSON body) of one HTTP call; an error status is returned, not raised.

    A 503 is asked again, as Prefect's own client does (prefect.client.base retries 429, 502 and
    503): the server answers 503 when its SQLite database stayed busy, after rolling back, so the
    call did nothing and may be repeated (seen once in CI, on create_flow_run, with 2 busy cores).
    """
    data = None if body is None else json.dumps(body).encode()
    waits = [1, 2, 4, 8]  # then the fifth answer stands, whatever it is
    while True:
        req = urllib.request.Request(
            url,
            data=data,
            method=method or ("POST" if data else "GET"),
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            status, answer = err.code, json.loads(err.read() or b"null")
        if status != 503 or not waits:
            return status, answer
        time.sleep(waits.pop(0))


def log_tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.is_file() else f"({log} missing)"


@pytest.fixture(scope="session")
def golden(tmp_path_factory, tiny_model_dir, prefect_server) -> tuple[Path, dict]:
    """A project after one full run (stages, register, smoke-serve): (directory, summary)."""
    from flows.finetune import finetune

    root = make_project(
        tmp_path_factory.mktemp("golden") / "project",
        {
            "base_model": {"source": str(tiny_model_dir)},
            "prepare": {"block_size": 32},
            "train": {"max_steps": 8, "learning_rate": 3.0e-3, "save_steps": 4},
            "evaluate": {"window": 64, "stride": 32, "batch_size": 8},
        },
    )
    return root, finetune(project_dir=str(root))


@pytest.fixture
def project(golden, tmp_path) -> Path:
    """A private copy of the golden project (git, DVC cache, mlflow.db) for a test to change."""
    return Path(shutil.copytree(golden[0], tmp_path / "project", symlinks=True))


@pytest.fixture
def first_run(golden) -> dict:
    return golden[1]


def postgres_bin() -> Path | None:
    """Debian keeps PostgreSQL's server programs off PATH, in /usr/lib/postgresql/<major>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(dirs[-1]).parent if dirs else None


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL cluster in a temporary directory on 127.0.0.1:<free port>, password login for
    user llmpipe, databases mlflow and prefect; stopped and removed at the end of the session."""
    bin_dir, root = postgres_bin(), os.geteuid() == 0
    if bin_dir is None:
        if root:
            pytest.fail("PostgreSQL is not installed: `make postgresql` installs Debian's")
        pytest.skip("PostgreSQL's initdb not found and not root: apt-get install postgresql")
    as_owner: list[str] = ["runuser", "-u", "postgres", "--"] if root else []
    home = Path(tempfile.mkdtemp(prefix="llmpipe-pg-"))  # /tmp: the postgres user can reach it
    password, port = secrets.token_hex(16), free_port()
    (home / "pw").write_text(password + "\n")
    if root:
        shutil.chown(home, "postgres")
        shutil.chown(home / "pw", "postgres")

    def pg(*args: str) -> None:
        subprocess.run([*as_owner, *args], check=True, capture_output=True, timeout=120)

    pg(str(bin_dir / "initdb"), "-D", f"{home}/data", "-U", PG_USER, "-A", "scram-sha-256",
       f"--pwfile={home}/pw", "-E", "UTF8", "--no-sync")  # fmt: skip
    # fsync off: a throwaway cluster; the socket in our directory, not /var/run/postgresql
    options = f"-F -h 127.0.0.1 -p {port} -k {home}"
    pg(str(bin_dir / "pg_ctl"), "-D", f"{home}/data", "-l", f"{home}/log", "-o", options, "-w",
       "start")  # fmt: skip
    try:
        import psycopg

        url = f"postgresql://{PG_USER}:{password}@127.0.0.1:{port}"
        with psycopg.connect(f"{url}/postgres", autocommit=True) as db:
            for name in ("mlflow", "prefect"):
                db.execute(f"CREATE DATABASE {name}")
        yield {"port": port, "password": password, "url": url}
    finally:
        pg(str(bin_dir / "pg_ctl"), "-D", f"{home}/data", "-m", "fast", "-w", "stop")
        shutil.rmtree(home, ignore_errors=True)
