"""One run per workspace: an exclusive lock on <project>/.llmpipe.lock for the whole flow run.

A second run in the same project waits for the first (logging who holds the lock) and gives up with
a clear error after `timeout` seconds; it never interleaves with the first run's edits of
params.yaml, dvc.lock, the data or the registry. The OS releases the lock if the holder dies.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".llmpipe.lock"


class WorkspaceBusy(Exception):
    """Another run held the workspace for longer than we were willing to wait."""


@contextmanager
def workspace_lock(
    project: Path, timeout: float, log: Callable[[str], None] = print, poll: float = 1.0
) -> Iterator[None]:
    path = project / LOCK_FILE
    with path.open("a+") as f:
        deadline, said = time.monotonic() + timeout, 0.0
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another run"
                if time.monotonic() >= deadline:
                    raise WorkspaceBusy(
                        f"{project} is busy: {holder} still holds {LOCK_FILE} after "
                        f"{timeout:.0f}s; wait for it to finish or run in another checkout"
                    ) from None
                if time.monotonic() - said >= 60 or not said:
                    log(f"waiting for the workspace: {holder} holds {path}")
                    said = time.monotonic()
                time.sleep(poll)
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)
