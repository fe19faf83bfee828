"""Bring new data: `llmpipe data add PATH`.

    llmpipe data add notes.jsonl [--remote DIR|URL]

Validates the file (exists, text, UTF-8, every JSONL line parses, not empty), copies it under
data/raw/, tracks it with `dvc add`, pushes it to the DVC remote (a local directory by default, or
whatever `dvc remote add -d` configured: a directory, or object storage through DVC's plugins, see
README "Remote storage") and points `prepare.data` at it, so the next run trains on it. It holds
the workspace lock (never in the middle of a run), refuses to replace a different file of the same
name without --force (and never replaces the corpus stage's output), prints remote URLs without
their credentials, and undoes the copy and the tracking when `dvc add` or `dvc push` fails.
Nothing is copied, tracked or edited when the file is rejected.
"""

from __future__ import annotations

import re
import subprocess
import urllib.parse
from pathlib import Path

import yaml

from flows.lock import workspace_lock
from flows.runner import dvc_executable, stage_env
from steps.environment import cache_dir
from steps.errors import UserError
from steps.outputs import copy_file, write_bytes
from steps.params import EMBEDDED_DATA, PrepareParams, apply_overrides, load_params
from steps.records import read_records

RAW_DIR = Path("data/raw")
BINARY_SNIFF_BYTES = 8192  # a NUL byte in the first 8 KiB means "not a text file"
LOCK_WAIT_S = 600  # how long `data add` waits for a run in the project to finish


class DataAddFailed(Exception):
    """DVC could not track or push the file; everything `data add` did was undone."""


CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)


def without_credentials(text: str) -> str:
    """`text` (a remote URL, or a message quoting one) with every URL's user:password@ removed,
    and a lone URL's query string (where tokens travel), so it is safe to print or log."""
    text = CREDENTIALS.sub(r"\g<scheme>", text)
    parts = urllib.parse.urlsplit(text)
    if parts.scheme and parts.query and " " not in text:
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    return text


def default_remote() -> Path:
    """Where `data add` pushes when no DVC remote is configured: a machine-wide local directory."""
    return cache_dir() / "dvc-remote"


def validate_text_file(path: Path, params: PrepareParams) -> int:
    """Number of records (documents or conversations) in a .txt/.jsonl file; UserError naming the
    file (and line) otherwise."""
    if not path.is_file():
        raise UserError(f"{path}: no such file; give the path of a .txt or .jsonl file")
    if path.suffix not in (".txt", ".jsonl"):
        raise UserError(f"{path}: unsupported file type {path.suffix!r}; use .txt or .jsonl")
    with path.open("rb") as f:
        if b"\0" in f.read(BINARY_SNIFF_BYTES):
            raise UserError(f"{path}: looks binary (NUL bytes); give a UTF-8 text file")
    return len(read_records(path, params).dataset)


def dvc(project: Path, *args: str) -> str:
    done = subprocess.run([dvc_executable(), *args], cwd=project, env=stage_env({}),
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        # DVC ends a failure with a support footer; its own reason is the last "ERROR:" line
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        errors = [
            line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR:")
        ]
        reason = (errors or lines or ["(no output)"])[-1]
        raise RuntimeError(without_credentials(f"dvc {' '.join(args)} failed: {reason}"))
    return done.stdout


def configured_remotes(project: Path) -> tuple[dict[str, str], str]:
    """The project's DVC remotes (name -> URL, every config level) and the default one's name."""
    # `dvc config --list` prints key=value lines; `dvc remote list` wraps long paths over lines
    config = dict(
        line.split("=", 1) for line in dvc(project, "config", "--list").splitlines() if "=" in line
    )
    remotes = {
        key.removeprefix("remote.").removesuffix(".url"): url
        for key, url in config.items()
        if key.startswith("remote.") and key.endswith(".url")
    }
    return remotes, config.get("core.remote", "")


def ensure_remote(project: Path, remote: str | None) -> str:
    """The default DVC remote's URL, creating a local one when none is configured.

    `--remote URL` of a remote already configured makes that remote the default and keeps its
    options (an S3-compatible store's `endpointurl`, a region, a profile): adding it again under
    another name would lose them (`dvc remote add --force` replaces the whole section)."""
    remotes, default = configured_remotes(project)
    if remote:
        same = [name for name, url in remotes.items() if url.rstrip("/") == remote.rstrip("/")]
        if default in same:
            return remote
        if same:
            dvc(project, "remote", "default", same[0])
            return remote
        dvc(project, "remote", "add", "--default", "--force", "llmpipe", remote)
        return remote
    if remotes:  # the default one, else the first
        return remotes.get(default, next(iter(remotes.values())))
    target = default_remote()
    target.mkdir(parents=True, exist_ok=True)
    dvc(project, "remote", "add", "--default", "llmpipe", str(target))
    return str(target)


def add_data(source: Path, project: Path, remote: str | None = None, force: bool = False) -> dict:
    params = load_params(project / "params.yaml")
    documents = validate_text_file(source, params.prepare)
    dest = project / RAW_DIR / source.name
    relative = str(dest.relative_to(project))
    if relative in EMBEDDED_DATA:
        raise UserError(f"{relative}: is the output of a stage (embedded data); rename your file")
    same = dest.is_file() and dest.read_bytes() == source.read_bytes()
    if dest.exists() and not same and not force:
        raise UserError(
            f"{relative}: already exists with other content; rename your file, or pass --force "
            "to replace it"
        )
    with workspace_lock(project, LOCK_WAIT_S, print):
        previous = dest.read_bytes() if dest.is_file() else None
        dvc_file = project / f"{relative}.dvc"
        previous_dvc = dvc_file.read_bytes() if dvc_file.is_file() else None
        if source.resolve() != dest.resolve():
            copy_file(source, dest)
        try:
            dvc(project, "add", relative)
            md5 = yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"]
            url = ensure_remote(project, remote)
            dvc(project, "push", f"{relative}.dvc")
        except RuntimeError as err:
            undo(dest, previous, dvc_file, previous_dvc)
            raise DataAddFailed(f"{err}; nothing was added") from None
        apply_overrides(project / "params.yaml", [f"prepare.data={relative}"])
    return {"path": relative, "documents": documents, "md5": md5,
            "remote": without_credentials(url)}  # fmt: skip


def undo(dest: Path, previous: bytes | None, dvc_file: Path, previous_dvc: bytes | None) -> None:
    """Put the data file and its .dvc file back as they were before `data add`."""
    for path, content in ((dest, previous), (dvc_file, previous_dvc)):
        if content is None:
            path.unlink(missing_ok=True)
        else:
            write_bytes(path, content)
