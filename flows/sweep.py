"""A small grid of fine-tuning runs, compared side by side in MLflow; only the best may be champion.

    llmpipe sweep -S train.learning_rate=1e-4,3e-4 [-S train.max_steps=20,40 ...]

Each combination is one `finetune` subflow (its own Prefect flow run and MLflow run, tagged with the
sweep's id) that registers its model without promoting it. The combination with the lowest held-out
perplexity is then run once more: DVC's run cache restores its outputs instantly, the workspace
(params.yaml, dvc.lock, models/) ends on the best combination, and only that model meets the
promotion gate.
"""

from __future__ import annotations

import itertools
import uuid

from prefect import flow, get_run_logger

from flows.finetune import finetune
from steps.errors import UserError
from steps.params import parse_override


def expand_grid(axes: list[str]) -> list[list[str]]:
    """['train.learning_rate=1e-4,3e-4', 'train.max_steps=20']
    -> one override list per combination."""
    keys, values = [], []
    for axis in axes:
        (section, key), _ = parse_override(axis)  # checks the key's shape
        raw = axis.partition("=")[2]
        choices = [v.strip() for v in raw.split(",") if v.strip()]
        if not choices:
            raise UserError(f"-S {axis!r}: give one or more comma-separated values")
        keys.append(f"{section}.{key}")
        values.append(choices)
    if not keys:
        raise UserError("sweep: give at least one -S section.key=v1,v2")
    return [
        [f"{k}={v}" for k, v in zip(keys, combo, strict=True)]
        for combo in itertools.product(*values)
    ]


@flow(name="sweep", log_prints=True)
def sweep(project_dir: str = ".", grid: list[str] | None = None, serve_check: bool = True) -> dict:
    """Run every combination of the grid, then promote (at most) the best one.

    Args:
        project_dir: directory holding params.yaml and dvc.yaml.
        grid: axes as `section.key=v1,v2,...`; the runs are their cartesian product.
        serve_check: smoke-serve the champion after the final run.
    """
    logger = get_run_logger()
    combos = expand_grid(grid or [])
    sweep_id = uuid.uuid4().hex[:8]
    logger.info("sweep %s: %d runs", sweep_id, len(combos))
    runs = []
    for combo in combos:
        summary = finetune(
            project_dir=project_dir,
            overrides=combo,
            promote=False,
            keep_edits=True,
            serve_check=False,
            run_tags={"sweep": sweep_id},
        )
        runs.append(
            {
                "overrides": combo,
                "perplexity": summary["metrics"]["perplexity"],
                "version": summary["register"]["version"],
            }
        )
        logger.info("sweep %s: %s -> perplexity %.4f", sweep_id, combo, runs[-1]["perplexity"])
    best = min(runs, key=lambda r: r["perplexity"])
    final = finetune(
        project_dir=project_dir,
        overrides=best["overrides"],
        keep_edits=True,
        serve_check=serve_check,
        run_tags={"sweep": sweep_id, "sweep_best": "true"},
    )
    return {"sweep_id": sweep_id, "runs": runs, "best": best, "final": final}
