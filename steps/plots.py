"""The evaluate stage's pictures: perplexity bars for `dvc plots show`, one PNG for MLflow."""

from __future__ import annotations

import csv
from pathlib import Path

from steps.outputs import atomic_file


def perplexity_rows(result: dict) -> list[tuple[str, float]]:
    return [
        ("base, held-out", result["base_perplexity"]),
        ("tuned, held-out", result["perplexity"]),
        ("base, reference", result["base_reference_perplexity"]),
        ("tuned, reference", result["reference_perplexity"]),
    ]


def write_perplexity_csv(result: dict, path: Path) -> None:
    with atomic_file(path) as tmp, tmp.open("w", newline="") as f:
        csv.writer(f).writerows([("model", "perplexity"), *perplexity_rows(result)])


def write_figure(result: dict, loss_curve: Path, path: Path) -> None:
    """Training loss (left) and perplexity bars (right) in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = perplexity_rows(result)
    fig, (loss_ax, bar_ax) = plt.subplots(1, 2, figsize=(11, 4))
    if loss_curve.is_file():
        with loss_curve.open() as f:
            curve = list(csv.DictReader(f))
        loss_ax.plot([int(r["step"]) for r in curve], [float(r["loss"]) for r in curve])
    loss_ax.set(title="training loss", xlabel="step", ylabel="cross-entropy (nats/token)")
    bar_ax.barh([r[0] for r in rows], [r[1] for r in rows], color=["#999", "#1f77b4"] * 2)
    bar_ax.set(title="perplexity (lower is better)", xlabel="perplexity")
    bar_ax.invert_yaxis()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
