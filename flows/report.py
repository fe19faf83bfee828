"""The run report: a Prefect markdown artifact on each flow run, readable in the Prefect UI."""

from __future__ import annotations

import json
from pathlib import Path

from steps.servers import LOOPBACK, MLFLOW_UI_PORT
from steps.stages import STAGE


def stages_text(stages: list[dict]) -> str:
    """'corpus cached · train 412s · ...': what ran and what DVC skipped."""
    return " · ".join(
        s["name"] + (" cached" if s["skipped"] else f" {s['seconds']:.0f}s") for s in stages
    )


def data_card_lines(card: dict) -> list[str]:
    """The data card (metrics/data.json) as a markdown table: what each split kept and removed."""
    splits = card["splits"]
    lines = [
        f"{card['records_in']} records in; {card['exact_duplicates_removed']} exact duplicates "
        f"removed; {card['near_duplicates_removed_from_train']} near duplicates of test records "
        f"removed from train (MinHash, Jaccard >= {card['near_duplicate_threshold']}).",
        "",
        "| split | records | truncated | dropped | tokens | supervised tokens | blocks |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("train", "validation", "test"):
        s = splits[name]
        cells = [s.get(k, "-") for k in ("records", "truncated", "dropped", "tokens")]
        cells += [s.get("supervised_tokens", "-"), s.get("blocks", "-")]
        lines.append(f"| {name} | " + " | ".join(str(c) for c in cells) + " |")
    histogram = splits["train"].get("length_histogram", {})
    if histogram:
        lines += [
            "",
            "Train lengths (tokens): " + ", ".join(f"{k}: {v}" for k, v in histogram.items()),
        ]
    return ["## Data card", "", *lines]


def report_markdown(summary: dict, project: Path) -> str:
    m, reg, promotion = summary["metrics"], summary["register"], summary["promotion"]
    stats = json.loads((project / STAGE["prepare"].path("out") / "stats.json").read_text())
    ui = f"http://{LOOPBACK}:{MLFLOW_UI_PORT}"
    lineage = summary.get("lineage", {})
    lines = [
        "# llmpipe finetune run",
        "",
        "## Data",
        f"- file `{stats['data']}` ({stats['format']}), DVC hash "
        f"`{lineage.get('data_hash', '?')}`, test split hash `{m['test_split_hash'][:12]}`",
        f"- stages: {stages_text(summary['stages'])}",
        "",
        *data_card_lines(stats),
        "",
        f"## Metrics (held-out test split, {m.get('scored', 'documents')}; lower is better)",
        "| | base | tuned |",
        "| --- | --- | --- |",
        f"| perplexity | {m['base_perplexity']:.3f} | {m['perplexity']:.3f} |",
        f"| 95% interval | {m['base_perplexity_ci_low']:.3f} - {m['base_perplexity_ci_high']:.3f} "
        f"| {m['perplexity_ci_low']:.3f} - {m['perplexity_ci_high']:.3f} |",
        f"| bits per byte | {m['base_bits_per_byte']:.4f} | {m['bits_per_byte']:.4f} |",
        f"| reference (general text) | {m['base_reference_perplexity']:.3f} "
        f"| {m['reference_perplexity']:.3f} |",
        "",
        f"Measured with window {m['measured']['window']}, stride {m['measured']['stride']}, "
        f"{m['measured']['precision']} on {m['measured']['device']}, tokenizer "
        f"`{m['measured']['tokenizer_hash']}` (a champion measured otherwise is re-scored).",
        "",
        "## Promotion",
        f"**{'promoted to champion' if promotion['promoted'] else 'not promoted'}** "
        f"({reg['model_name']} version {reg['version']}, "
        f"aliases: {', '.join(reg['aliases']) or 'none'})",
        *[f"- {reason}" for reason in promotion["reasons"]],
        "",
        "## Links",
        f"- MLflow run `{summary['mlflow_run_id']}` in experiment `llmpipe` "
        f"(`mlflow ui --backend-store-uri {summary['tracking_uri']}`, then "
        f"{ui}/#/experiments/{summary.get('experiment_id', '')}"
        f"/runs/{summary['mlflow_run_id']})",
        f"- model version: {ui}/#/models/{reg['model_name']}/versions/{reg['version']}",
    ]
    return "\n".join(lines)
