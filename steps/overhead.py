"""Where a process's wall time goes: Prefect, MLflow, llmpipe's own code, sampled from its stack.

    LLMPIPE_PROFILE_DIR=/tmp/p llmpipe run     # each llmpipe process writes /tmp/p/<pid>.json

benchmarks/orchestration.py sets LLMPIPE_PROFILE_DIR for a flow run; every process that imports
steps/ (the flow's own, each step's, each stage DVC starts) then samples its main thread's stack
every INTERVAL_S from a daemon thread, and at exit writes how many samples fell in each category.
A sample belongs to the innermost frame whose file is Prefect's, MLflow's or llmpipe's (steps/,
flows/): the flow body calling an MLflow client counts as MLflow, Prefect's engine calling the flow
body counts as llmpipe, a task body waiting for its stage's process counts as llmpipe (the stage's
own process says what happens there), a Prefect log handler called from a task counts as Prefect.
A sample in none of them (an interpreter's own start, a library called from none of them) is
"other". Wall time from the process's creation to the sampler's start, before any category could
be seen, is "startup".

A statistical profiler written here, not py-spy: py-spy reads another process's memory, which needs
ptrace rights that containers and CI runners often withhold. Without LLMPIPE_PROFILE_DIR nothing
starts and nothing is written.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

PROFILE_ENV = "LLMPIPE_PROFILE_DIR"
INTERVAL_S = 0.005
CATEGORIES = ("prefect", "mlflow", "llmpipe", "other")

_LLMPIPE_DIRS = tuple(
    str(Path(__file__).resolve().parents[1] / name) + os.sep for name in ("steps", "flows")
)
_LIBRARY_DIRS = {"prefect": f"{os.sep}prefect{os.sep}", "mlflow": f"{os.sep}mlflow{os.sep}"}
_started: Sampler | None = None


def process_age() -> float:
    """Seconds since this process was created, to 10 ms. On Linux from /proc: the kernel's start
    tick of the process against its uptime (psutil's create_time() adds the boot time, which
    /proc gives in whole seconds: up to 1 s off); elsewhere psutil's."""
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        import psutil

        return time.time() - psutil.Process().create_time()


def category(frame) -> str:
    """The category of a stack sample: its innermost frame in Prefect, MLflow or llmpipe."""
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(_LLMPIPE_DIRS):
            return "llmpipe"
        for name, marker in _LIBRARY_DIRS.items():
            if marker in path and "site-packages" in path:
                return name
        frame = frame.f_back
    return "other"


class Sampler:
    """Samples one thread's stack every `interval` seconds until the process exits."""

    def __init__(self, thread_id: int, interval: float = INTERVAL_S) -> None:
        self.thread_id = thread_id
        self.interval = interval
        self.counts: Counter[str] = Counter()
        self.started_at = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmpipe-profile", daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            frame = sys._current_frames().get(self.thread_id)
            self.counts[category(frame)] += 1

    def stop(self) -> dict:
        """Stop sampling and wait for the sampling thread to end (none may outlive the exit
        handlers: a thread still running while the interpreter finalises can abort a process
        whose libraries run their own threads, as torch's do); the profile: seconds per
        category, from process creation to now."""
        self._stop.set()
        ended_at = time.time()
        self._thread.join(timeout=5)
        created_at = ended_at - process_age()
        samples = sum(self.counts.values()) or 1
        sampled = ended_at - self.started_at
        seconds = {name: sampled * self.counts[name] / samples for name in CATEGORIES}
        return {
            "pid": os.getpid(),
            "argv": sys.argv,
            "outcome": os.environ.get("LLMPIPE_OUTCOME"),
            "created_at": created_at,
            "ended_at": ended_at,
            "wall_seconds": ended_at - created_at,
            "samples": sum(self.counts.values()),
            "seconds": {"startup": self.started_at - created_at, **seconds},
        }


def start_from_env() -> None:
    """Start sampling this process's main thread when LLMPIPE_PROFILE_DIR is set (once)."""
    global _started
    out = os.environ.get(PROFILE_ENV)
    if not out or _started is not None:
        return
    _started = Sampler(threading.main_thread().ident).start()
    atexit.register(_write, Path(out))


def _write(out: Path) -> None:
    if _started is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    profile = _started.stop()
    (out / f"{os.getpid()}.json").write_text(json.dumps(profile), encoding="utf-8")


def read_profiles(out: Path) -> list[dict]:
    """Every profile written under `out`, oldest process first."""
    profiles = [json.loads(p.read_text(encoding="utf-8")) for p in Path(out).glob("*.json")]
    return sorted(profiles, key=lambda p: p["created_at"])
