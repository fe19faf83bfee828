"""A step's command line: the paths dvc.yaml's `cmd` passes (`--base-model models/base ...`).

    args = stage_arguments()          # in a step's main(): args.base_model, args.out, args.params

The stage table (steps/stages.py) writes each command; this parser accepts any `--name PATH` pair,
so a step does not import the table (a change to one stage's row must not re-run every stage). A
step reads the names its run() needs; one missing from the command line is a one-line error.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from steps.errors import UserError
from steps.params import PARAMS_FILE


class StageArguments:
    """Paths by option name (`--tuned-model` -> .tuned_model), and on/off flags."""

    def __init__(self, values: dict[str, Path | bool]) -> None:
        self._values = values

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            option = "--" + name.replace("_", "-")
            raise UserError(
                f"{option} missing from the command line; run the stage as dvc.yaml writes it "
                "(python -m steps.stages prints it)"
            ) from None


def stage_arguments(
    argv: Sequence[str] | None = None, flags: Sequence[str] = (), text: Sequence[str] = ()
) -> StageArguments:
    """Parse `--name PATH` pairs (and the given `flags`); `--params` defaults to params.yaml.
    Options named in `text` (a model version, a models:/ URI) keep their value as a string."""
    tokens = list(sys.argv[1:] if argv is None else argv)
    values: dict[str, Path | bool | str] = {"params": Path(PARAMS_FILE)}
    values |= {flag[2:].replace("-", "_"): False for flag in flags}
    while tokens:
        token = tokens.pop(0)
        if not token.startswith("--") or len(token) < 3:
            raise UserError(f"unexpected argument {token!r}; expected --name PATH pairs")
        name = token[2:].replace("-", "_")
        if token in flags:
            values[name] = True
        elif not tokens or tokens[0].startswith("--"):
            raise UserError(f"{token} needs a value")
        else:
            value = tokens.pop(0)
            values[name] = value if name in text else Path(value)
    return StageArguments(values)
