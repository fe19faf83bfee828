"""Move `champion` to a version that passed the gate and the serving check: compare-and-set.

    python -m steps.promote --params params.yaml --version 3 --expected-champion 2   # flow task

The gate (steps/register.py) decides on numbers; the smoke check (steps/serve.py) proves the version
serves; only then does this step move the alias, and only if `champion` still points where it did
when the gate decided (`--expected-champion`, `none` for no champion). If another run moved it in
between, nothing changes and the run says so. MLflow has no atomic compare-and-set for aliases: the
check and the move are two calls, a window of milliseconds; runs in one project never overlap (the
workspace lock), so only runs of other projects sharing the registry could meet in it.
"""

from __future__ import annotations

import time

from steps.arguments import stage_arguments
from steps.outcome import run_step
from steps.params import load_params
from steps.registry import CHAMPION, champion_version
from steps.tracking import tracking_uri

NO_CHAMPION = "none"


HISTORY_TAG = "champion_history"  # registered-model tag: the last HISTORY_LINES moves, newest last
HISTORY_LINES = 40


def record_move(client, name: str, line: str) -> None:
    """Append one line ('<time> champion <from> -> <to> (<how>)') to the model's history tag."""
    model = client.get_registered_model(name)
    lines = [x for x in model.tags.get(HISTORY_TAG, "").split("\n") if x]
    client.set_registered_model_tag(name, HISTORY_TAG, "\n".join([*lines, line][-HISTORY_LINES:]))


def promote(uri: str, name: str, version: str, expected: str, how: str = "run", tags=None) -> dict:
    """Point `champion` at `version` if it still points at `expected`; say what happened.

    `how` (run, cli, forced, rollback) goes into the history; `tags` onto the version. A rollback
    keeps the version's own `promoted_over`, so rolling back again goes one further back."""
    from mlflow import MlflowClient

    current = champion_version(uri, name)
    now = NO_CHAMPION if current is None else str(current.version)
    if now != expected:
        return {
            "promoted": False,
            "reasons": [
                f"champion moved from {expected} to {now} while this run was deciding; "
                f"version {version} is not promoted (re-run to compare against the new champion)"
            ],
        }
    client = MlflowClient(uri)
    client.set_registered_model_alias(name, CHAMPION, version)
    at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    stamp = {"rolled_back_to_at": at} if how == "rollback" else {
        "promoted_over": expected, "promoted_at": at, "promoted_by": how}  # fmt: skip
    for key, value in {**stamp, **(tags or {})}.items():
        client.set_model_version_tag(name, version, key, value)
    record_move(client, name, f"{at} champion {expected} -> {version} ({how})")
    return {"promoted": True, "reasons": [f"champion moved from {expected} to version {version}"]}


def main() -> dict:
    args = stage_arguments(text=("version", "expected_champion"))
    name = load_params(args.params).registry.model_name
    uri = tracking_uri(args.params.resolve().parent)
    outcome = promote(uri, name, args.version, args.expected_champion)
    print("promote: " + "; ".join(outcome["reasons"]))
    return outcome


if __name__ == "__main__":
    run_step(main)
