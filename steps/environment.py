"""The process environment llmpipe runs in: the machine-wide cache and the quiet/offline variables.

The network is closed to everything but package indexes, so no library may phone home, and progress
bars (which redraw with \\r) would turn into one log line per frame in Prefect's and DVC's logs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

QUIET_OFFLINE = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "MLFLOW_ENABLE_TELEMETRY": "false",
    "TOKENIZERS_PARALLELISM": "false",  # forked DataLoader workers would warn and deadlock
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "PYTHONUNBUFFERED": "1",  # a stage's lines reach the flow's log as they are printed
}


def quiet_offline_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: os.environ) with QUIET_OFFLINE filled in where not already set."""
    env = dict(os.environ if base is None else base)
    for key, value in QUIET_OFFLINE.items():
        env.setdefault(key, value)
    return env


def cache_dir() -> Path:
    """Machine-wide cache for downloads and the default DVC remote ($LLMPIPE_CACHE, else
    ~/.cache/llmpipe)."""
    return Path(os.environ.get("LLMPIPE_CACHE", Path.home() / ".cache" / "llmpipe"))
