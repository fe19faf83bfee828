"""One run per workspace: a second run waits, then fails clearly; a dead holder frees the lock."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from flows.lock import LOCK_FILE, WorkspaceBusy, workspace_lock

pytestmark = pytest.mark.unit

HOLD = """
import sys, time
from pathlib import Path
from flows.lock import workspace_lock
with workspace_lock(Path(sys.argv[1]), timeout=5):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold_lock(project, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(project), str(seconds)],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_fails_clearly_when_the_first_holds_too_long(tmp_path):
    holder = hold_lock(tmp_path, 30)
    messages = []
    try:
        with (
            pytest.raises(WorkspaceBusy, match=f"busy: .*pid.*{holder.pid}"),
            workspace_lock(tmp_path, timeout=1.5, log=messages.append, poll=0.1),
        ):
            pytest.fail("acquired a held lock")
    finally:
        holder.kill()
        holder.wait()
    assert messages and "waiting for the workspace" in messages[0]


def test_second_run_waits_and_then_proceeds(tmp_path):
    holder = hold_lock(tmp_path, 1.0)
    started = time.monotonic()
    with workspace_lock(tmp_path, timeout=30, log=lambda m: None, poll=0.1):
        waited = time.monotonic() - started
    holder.wait()
    assert waited > 0.3  # it really waited for the holder
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released and cleared


def test_a_killed_holder_releases_the_lock(tmp_path):
    holder = hold_lock(tmp_path, 60)
    holder.kill()
    holder.wait()
    with workspace_lock(tmp_path, timeout=2, log=lambda m: None, poll=0.1):
        pass
