"""The executables installed beside llmpipe, and a PATH that finds them without an activated venv.

DVC runs `python -m steps...` from dvc.yaml and MLflow's scoring server execs `uvicorn`, both by
name: with this interpreter's bin/ first on PATH they are the project's own, so
`.venv/bin/llmpipe ...` works exactly as printed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path


def interpreter_bin() -> Path:
    """The directory of this Python's executables (the venv's bin/ when llmpipe runs from one)."""
    return Path(sys.executable).parent


def with_interpreter_on_path(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with interpreter_bin() first on PATH."""
    return {**env, "PATH": f"{interpreter_bin()}{os.pathsep}{env.get('PATH', '')}"}
