"""Atomic outputs: a stage's files appear whole or not at all.

Each writer goes through a temporary sibling and a rename, so a reader (DVC, the flow, a user) never
sees half a file, and a killed stage leaves the previous version in place. A full disk is a
DiskFull (a UserError: one line naming the path, not retried), with the temporary sibling removed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from steps.errors import UserError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(UserError):
    """No space left (or the quota is spent) where an output was being written."""


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS


def disk_full(path: str | Path | None) -> DiskFull:
    """The one-line error for a full disk at `path` (None: a write that did not say where)."""
    if path is None:
        return DiskFull("no space left on device; free some space and run again")
    return DiskFull(f"{path}: no space left on device; free some space there and run again")


def _sibling(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(err):
            raise disk_full(final) from None
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


@contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path that replaces `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(final)
    try:
        yield tmp
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if is_disk_full(err):
            raise disk_full(final) from None
        raise
    tmp.replace(final)


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def copy_file(source: str | Path, dest: str | Path) -> None:
    with atomic_file(dest) as tmp:
        shutil.copyfile(source, tmp)
