"""Register the fine-tuned model in MLflow and decide whether it becomes the champion.

    python -m steps.register --params params.yaml --tuned-model models/tuned \\
        --metrics metrics/eval.json --prepared data/prepared [--no-promote]   # the flow's task

Logs the tuned model with the MLflow transformers flavor as `llm/v1/completions` (OpenAI-style
payloads; `llm/v1/chat` when it was tuned on chat data) into the flow's run, registers a new version
tagged with its lineage, and points `challenger` at it. While the model is loaded for logging, its
greedy replies to the smoke check's prompts are generated and kept in its MLmodel metadata, the
reference smoke_serve compares the server's answers with.
Then it applies the gate (steps/gate.py): the upper end of the new model's 95% bootstrap interval
must beat the base model's and the current champion's perplexity on the same test split, by
`register.min_improvement`; a champion measured on another split is re-scored through
steps/scoring.py, exactly as the candidate was. It does not move `champion`: the flow serves the
candidate first (smoke_serve) and only then promotes it (steps/promote.py), against the champion
this step saw. A model already registered (same DVC hash of the tuned model) is not registered
twice.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from steps.arguments import stage_arguments
from steps.card import model_card
from steps.errors import UserError
from steps.gate import Decision, Reference, promotion_decision
from steps.lineage import git_sha, stage_lineage
from steps.outcome import run_step
from steps.params import EvaluateParams, Params, load_params
from steps.promote import NO_CHAMPION
from steps.registry import (
    CHAMPION,
    CHAT_TASK,
    COMPLETIONS_TASK,
    alias_version,
    find_version_by_tag,
    log_and_register,
    measured_from_tags,
    measurement_tags,
)
from steps.scoring import (
    differences,
    heldout,
    load_metric,
    load_model,
    measurement,
    score_heldout,
)
from steps.serve import SMOKE_TOKENS, smoke_prompts
from steps.tracking import flow_run


def served_as(prepared: Path) -> str:
    """Chat data makes a chat model (llm/v1/chat); a model tuned on raw text is served as a text
    completer (llm/v1/completions), even when its base has a chat template."""
    stats = json.loads((prepared / "stats.json").read_text())
    return CHAT_TASK if stats.get("format") == "chat" else COMPLETIONS_TASK


def lineage_tags(project: Path, params: Params, metrics: dict, run_id: str) -> dict[str, str]:
    """What a model version records about where it came from."""
    return {
        "data_path": params.prepare.data,
        **stage_lineage(project, params.model_dump(by_alias=True)),
        "base_model": params.base_model.source,
        "git_sha": git_sha(project),
        "params": json.dumps(params.model_dump(by_alias=True), sort_keys=True),
        "perplexity": f"{metrics['perplexity']:.6f}",
        "base_perplexity": f"{metrics['base_perplexity']:.6f}",
        "perplexity_ci_high": f"{metrics['perplexity_ci_high']:.6f}",
        "forgetting": f"{metrics['forgetting']:.6f}",
        "bits_per_byte": f"{metrics['bits_per_byte']:.6f}",
        "bits_per_byte_ci_high": f"{metrics['bits_per_byte_ci_high']:.6f}",
        "test_split_hash": metrics["test_split_hash"],
        **measurement_tags(metrics["measured"]),
        "mlflow_run_id": run_id,
        "prefect_flow_run_id": os.environ.get("LLMPIPE_FLOW_RUN_ID", ""),
    }


def champion_reference(champion, name: str, prepared: Path, metrics: dict, params) -> Reference:
    """The champion's score, measured like the candidate's: its stored perplexity when every
    measurement key matches (steps/scoring.py MEASUREMENT_KEYS), else re-scored here on this test
    split with these settings; in bits per byte when its tokenizer differs from the candidate's."""
    ours, theirs = metrics["measured"], measured_from_tags(champion.tags)
    diffs = differences(ours, theirs)
    if not diffs and "perplexity" in champion.tags:
        stored = float(champion.tags["perplexity"])
        note = f"v{champion.version}'s stored perplexity, measured alike"
        return Reference(stored, metrics["perplexity_ci_high"], note=note)
    print(f"register: re-scoring champion v{champion.version}: " + ", ".join(diffs))
    held = heldout(prepared)
    model, tokenizer = load_model(f"models:/{name}/{champion.version}")
    scored = score_heldout(load_metric(held.kind), model, tokenizer, held, params)
    now = measurement(model, tokenizer, params, metrics["test_split_hash"], held.kind)
    note = f"v{champion.version} re-scored here; it was measured with " + ", ".join(diffs)
    if now["tokenizer_hash"] != ours["tokenizer_hash"]:
        return Reference(
            scored["bits_per_byte"],
            metrics["bits_per_byte_ci_high"],
            unit="bits per byte",
            note=note + " (another tokenizer: perplexities are not comparable)",
        )
    return Reference(scored["perplexity"], metrics["perplexity_ci_high"], note=note)


def decide(client, name: str, mv, metrics: dict, prepared: Path, params: Params):
    """The gate's decision on version `mv`, and the champion it was compared with (or None)."""
    champion = alias_version(client, name, CHAMPION)
    if champion is not None and champion.version == mv.version:
        return Decision(False, [f"version {mv.version} is already the champion"]), champion
    ev: EvaluateParams = params.evaluate
    reference = (
        None if champion is None else champion_reference(champion, name, prepared, metrics, ev)
    )
    decision = promotion_decision(
        metrics["perplexity_ci_high"],
        metrics["base_perplexity"],
        reference,
        params.registry.min_improvement,
        metrics.get("forgetting"),
        params.registry.max_forgetting,
    )
    return decision, champion


def log_adapter(client, run_id: str, tuned_model: Path) -> bool:
    """A LoRA run's adapter alone (<tuned>/adapter) as the run's artifact `adapter/`; the model
    registered is still the merged one. False when there is none (full fine-tuning)."""
    adapter = tuned_model / "adapter"
    if not adapter.is_dir():
        return False
    client.log_artifact(run_id, str(adapter))
    return True


def register(
    params: Params,
    project: Path,
    tuned_model: Path,
    metrics_file: Path,
    prepared: Path,
    promote: bool = True,
) -> dict:
    """Register `tuned_model` (unless already registered) and apply the promotion gate (the alias
    moves later, in steps/promote.py)."""
    import mlflow
    from mlflow import MlflowClient

    run = flow_run()
    if run is None:
        raise UserError("MLFLOW_RUN_ID is not set; registration runs inside `llmpipe run`")
    if not metrics_file.is_file() or not tuned_model.is_dir():
        raise UserError(f"{metrics_file} or {tuned_model} missing; run the pipeline stages first")
    uri, run_id = run
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    name = params.registry.model_name
    metrics = json.loads(metrics_file.read_text())
    tags = lineage_tags(project, params, metrics, run_id)
    mv = find_version_by_tag(client, name, "model_hash", tags["model_hash"])
    new = mv is None
    if new:
        mv = log_and_register(
            uri,
            name,
            tuned_model,
            tags,
            task=served_as(prepared),
            replies_to=lambda task: (smoke_prompts(task, prepared), SMOKE_TOKENS),
        )
        print(f"register: {name} version {mv.version} (challenger)")
    else:
        print(f"register: this model is already {name} version {mv.version}; nothing registered")
    log_adapter(client, run_id, tuned_model)
    champion = alias_version(client, name, CHAMPION)
    if promote:
        decision, champion = decide(client, name, mv, metrics, prepared, params)
    else:
        decision = Decision(False, ["sweep candidate: the best of the sweep is promoted after it"])
    client.set_model_version_tag(name, mv.version, "gate", "; ".join(decision.reasons))
    if new:  # a re-confirmed version keeps the card of the run that registered it
        card = model_card(tags, metrics, decision.reasons, decision.promote)
        client.update_model_version(name, mv.version, description=card)
    aliases = client.get_model_version(name, mv.version).aliases
    print(f"register: gate passed={decision.promote}: " + "; ".join(decision.reasons))
    return {
        "model_name": name,
        "version": str(mv.version),
        "new_version": new,
        "aliases": sorted(aliases),
        "champion_before": NO_CHAMPION if champion is None else str(champion.version),
        **asdict(decision),
        "tags": tags,
    }


def main() -> dict:
    args = stage_arguments(flags=("--no-promote",))
    # The model is local: stop MLflow looking for a model card and license on the Hub.
    os.environ["HF_HUB_OFFLINE"] = "1"
    return register(
        load_params(args.params),
        args.params.resolve().parent,
        args.tuned_model,
        args.metrics,
        args.prepared,
        promote=not args.no_promote,
    )


if __name__ == "__main__":
    run_step(main)
