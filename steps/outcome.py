"""The outcome record a step leaves for the flow: ran or failed, seconds, the user error, its facts.

    LLMPIPE_OUTCOME=/tmp/x/train.json python -m steps.train ...   # what the flow's task runs

A step's main() returns the facts it knows (counts, metrics, lineage) and `run_main` writes them,
with how long the step took, to the file named by $LLMPIPE_OUTCOME. A UserError is recorded as data
(status "user_error" with its one-line message) and the step exits 2 (so does a full disk: freeing
space is the user's to do, a retry would not help); a crash is recorded with its last line. When
DVC finds a stage up to date it runs nothing, so no record appears: the flow reads that as
"cached". Without $LLMPIPE_OUTCOME (`dvc repro` alone) nothing is written.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from steps.errors import USER_ERROR_EXIT, UserError
from steps.outputs import disk_full, is_disk_full, write_json
from steps.overhead import process_age

OUTCOME_ENV = "LLMPIPE_OUTCOME"
# what the step asks the flow to log into its MLflow run (steps.tracking.log_to_flow_run)
_FOR_THE_FLOW: dict[str, Any] = {"metrics": {}, "params": {}, "artifacts": [], "tables": []}


def leave_for_the_flow(request: dict[str, Any]) -> bool:
    """Keep a logging request for the outcome record when the flow's runner reads one (True);
    False when nothing will read it (the caller logs it itself)."""
    if not os.environ.get(OUTCOME_ENV):
        return False
    for key, value in request.items():
        if isinstance(value, dict):
            _FOR_THE_FLOW[key].update(value)
        else:
            _FOR_THE_FLOW[key].extend(value)
    return True


def _record(status: str, started: float, **fields: Any) -> None:
    path = os.environ.get(OUTCOME_ENV)
    if path:
        record = {
            "status": status,
            "seconds": time.perf_counter() - started,  # inside main()
            # since the process was created: its interpreter's start and its imports too
            "process_seconds": process_age(),
            **fields,
        }
        write_json(path, record)


def exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM (the flow stopping this stage) unwinds: `finally` blocks run, so a server the step
    started is stopped rather than orphaned."""
    raise SystemExit(128 + signum)


def run_main(main: Callable[[], dict[str, Any] | None]) -> None:
    """Run a step's main(); record its outcome; a UserError becomes one line on stderr, exit 2."""
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    started = time.perf_counter()
    try:
        facts = main() or {}
    except Exception as err:
        if is_disk_full(err):  # a library's own write (steps.outputs raises DiskFull itself)
            err = disk_full(err.filename)
        if not isinstance(err, UserError):
            _record("crashed", started, message=f"{type(err).__name__}: {err}".splitlines()[0])
            raise
        _record("user_error", started, message=str(err))
        print(f"error: {err}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
    asked = {key: value for key, value in _FOR_THE_FLOW.items() if value}
    _record("ran", started, facts=facts, **({"log": asked} if asked else {}))


def run_step(main: Callable[[], dict[str, Any] | None]) -> NoReturn:
    """A step's process, as each step module's `__main__` runs it: run_main(main), then
    exit_fast(). A crash keeps the stock exit: its traceback, then the interpreter's teardown."""
    try:
        run_main(main)
    except SystemExit as stop:  # a user error (exit 2) or SIGTERM (128 + 15)
        exit_fast(stop.code)
    exit_fast(0)


def exit_fast(code: int | str | None) -> NoReturn:
    """End the process as sys.exit(code) would, less the interpreter's teardown.

    Tearing down an interpreter that imported torch, transformers or MLflow (freeing every module
    and object one by one) took 1.1-1.4 s after the evaluate step's last line on the tiny model
    (2 cores), and DVC and the flow wait for it after every step of every run (the `llmpipe`
    command's own: ~1.2 s after `llmpipe models` printed its table). What that teardown does that
    matters runs first: the exit handlers (logging's flush, MLflow's, Prefect's, the cleanup of
    temporary directories, the overhead sampler's profile) and a flush of stdout and stderr; files
    are closed by their `with` blocks (steps/outputs.py writes atomically)."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): the message on stderr, status 1
        print(code, file=sys.stderr)
        status = 1
    # What the interpreter's exit runs, in its order (private names, CPython 3.9+): threading's
    # own exit hooks (Prefect drains its log and event workers there, while its temporary server
    # still runs) and the wait for non-daemon threads, then the atexit handlers
    threading._shutdown()
    dynamo = sys.modules.get("torch._dynamo.utils")
    if dynamo is not None and not dynamo.log.isEnabledFor(logging.INFO):
        # its handler tabulates the compile times only to log them at INFO, here not shown:
        # ~0.27 s of a process that imported torch (tabulate's first number checks)
        atexit.unregister(dynamo.dump_compile_times)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def read_outcome(path: Path) -> dict[str, Any] | None:
    """The record a step wrote at `path`, or None when it wrote none (it did not run)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
