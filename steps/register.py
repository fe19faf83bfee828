"""Register the fine-tuned model in MLflow and decide whether it becomes the champion.

    python -m steps.register --report PATH      # the flow's `register` task (needs MLFLOW_RUN_ID)

Logs models/tuned with the MLflow transformers flavor as `llm/v1/completions` (OpenAI-style payloads)
into the flow's run, registers a new version tagged with its lineage, and points `challenger` at it.
`champion` moves only when the upper end of the new model's 95% bootstrap interval beats the base
model's and the current champion's perplexity on the same test split, by `register.min_improvement`
(the champion is re-scored when it was measured on another split). A model DVC
already registered (same hash of models/tuned) is not registered twice.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

from steps.errors import UserError, run_main
from steps.lineage import dvc_lock_hash, git_sha
from steps.outputs import write_json
from steps.params import EvaluateParams, Params, load_params
from steps.paths import BASE_MODEL_DIR, EVAL_METRICS, PREPARED_DIR, TUNED_MODEL_DIR
from steps.tracking import flow_run_id, tracking_uri

CHAMPION, CHALLENGER = "champion", "challenger"
SERVING_PACKAGES = ("mlflow", "transformers", "torch", "accelerate", "safetensors", "tokenizers")
INPUT_EXAMPLE = {"prompt": "The for statement", "max_tokens": 32}


@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)


def promotion_decision(
    tuned_upper: float,
    base: float,
    champion: float | None,
    min_improvement: float,
    forgetting: float | None = None,
    max_forgetting: float = float("inf"),
) -> Decision:
    """Promote only if the upper end of the tuned model's 95% interval is below the base model's
    and the champion's perplexity by the relative margin `min_improvement`, and its perplexity on
    general reference text rose by no more than `max_forgetting` (relative)."""
    reasons, promote = [], True
    if forgetting is not None:
        if forgetting <= max_forgetting:
            reasons.append(f"reference perplexity {forgetting:+.1%} (limit +{max_forgetting:.0%})")
        else:
            promote = False
            reasons.append(
                f"forgets too much: reference perplexity {forgetting:+.1%} > +{max_forgetting:.0%}"
            )
    for label, ref in (("base model", base), ("champion", champion)):
        if ref is None:
            reasons.append(f"no current {label}")
            continue
        bar = ref * (1 - min_improvement)
        if tuned_upper < bar:
            reasons.append(f"beats the {label}: upper bound {tuned_upper:.3f} < {bar:.3f}")
        else:
            promote = False
            reasons.append(f"does not beat the {label}: upper bound {tuned_upper:.3f} >= {bar:.3f}")
    return Decision(promote, reasons)


def pip_requirements() -> list[str]:
    """Exact versions of what the scoring server needs (MLflow's inference trips on torchvision)."""
    return [f"{name}=={version(name).split('+')[0]}" for name in SERVING_PACKAGES]


def lineage_tags(params: Params, metrics: dict) -> dict[str, str]:
    return {
        "data_path": params.prepare.data,
        "data_hash": dvc_lock_hash("prepare", params.prepare.data, "deps"),
        "base_model": params.base_model.source,
        "base_model_hash": dvc_lock_hash("base_model", str(BASE_MODEL_DIR)),
        "model_hash": dvc_lock_hash("train", str(TUNED_MODEL_DIR)),
        "git_sha": git_sha(),
        "params": json.dumps(params.model_dump(by_alias=True), sort_keys=True),
        "perplexity": f"{metrics['perplexity']:.6f}",
        "base_perplexity": f"{metrics['base_perplexity']:.6f}",
        "perplexity_ci_high": f"{metrics['perplexity_ci_high']:.6f}",
        "forgetting": f"{metrics['forgetting']:.6f}",
        "test_split_hash": metrics["test_split_hash"],
        "mlflow_run_id": flow_run_id() or "",
        "prefect_flow_run_id": os.environ.get("LLMPIPE_FLOW_RUN_ID", ""),
    }


def find_version_by_tag(client, name: str, key: str, value: str):
    if not value:
        return None
    for mv in client.search_model_versions(f"name='{name}'"):
        if mv.tags.get(key) == value:
            return mv
    return None


def alias_version(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def champion_perplexity(champion, name: str, split_hash: str, params: EvaluateParams) -> float:
    """The champion's perplexity on this test split: from its tags, or re-scored when they differ."""
    if champion.tags.get("test_split_hash") == split_hash and "perplexity" in champion.tags:
        return float(champion.tags["perplexity"])
    import mlflow

    from steps.evaluate import heldout_texts, load_metric

    print(f"register: re-scoring champion v{champion.version} on the current test split")
    texts, _ = heldout_texts(PREPARED_DIR)
    parts = mlflow.transformers.load_model(
        f"models:/{name}/{champion.version}", return_type="components"
    )
    result = load_metric().compute(
        predictions=texts,
        model=parts["model"],
        tokenizer=parts["tokenizer"],
        window=params.window,
        stride=params.stride,
        batch_size=params.batch_size,
    )
    return result["perplexity"]


def log_and_register(client, params: Params, tags: dict[str, str]):
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = params.registry.model_name
    # Components, not a checkpoint path: MLflow's path mode breaks on transformers 5's task registry.
    components = {
        "model": AutoModelForCausalLM.from_pretrained(TUNED_MODEL_DIR, use_safetensors=True),
        "tokenizer": AutoTokenizer.from_pretrained(TUNED_MODEL_DIR),
    }
    with mlflow.start_run(run_id=flow_run_id()):
        info = mlflow.transformers.log_model(
            transformers_model=components,
            name="model",
            task="llm/v1/completions",
            pip_requirements=pip_requirements(),
            input_example=INPUT_EXAMPLE,
            registered_model_name=name,
        )
    mv = client.get_model_version(name, str(info.registered_model_version))
    for key, value in tags.items():
        client.set_model_version_tag(name, mv.version, key, value)
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    return mv


def decide(client, name: str, mv, metrics: dict, params: Params) -> Decision:
    """Apply the promotion gate to version `mv`, and move `champion` to it if it passes."""
    champion = alias_version(client, name, CHAMPION)
    if champion is not None and champion.version == mv.version:
        return Decision(False, [f"version {mv.version} is already the champion"])
    champ_ppl = (
        None
        if champion is None
        else champion_perplexity(champion, name, metrics["test_split_hash"], params.evaluate)
    )
    decision = promotion_decision(
        metrics["perplexity_ci_high"],
        metrics["base_perplexity"],
        champ_ppl,
        params.registry.min_improvement,
        metrics.get("forgetting"),
        params.registry.max_forgetting,
    )
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, mv.version)
    return decision


def register(params: Params, promote: bool = True) -> dict:
    import mlflow
    from mlflow import MlflowClient

    if flow_run_id() is None:
        raise UserError("MLFLOW_RUN_ID is not set; registration runs inside `llmpipe run`")
    if not EVAL_METRICS.is_file() or not TUNED_MODEL_DIR.is_dir():
        raise UserError(
            f"{EVAL_METRICS} or {TUNED_MODEL_DIR} missing; run the pipeline stages first"
        )
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    name = params.registry.model_name
    metrics = json.loads(EVAL_METRICS.read_text())
    tags = lineage_tags(params, metrics)
    mv = find_version_by_tag(client, name, "model_hash", tags["model_hash"])
    new = mv is None
    if new:
        mv = log_and_register(client, params, tags)
        print(f"register: {name} version {mv.version} (challenger)")
    else:
        print(f"register: this model is already {name} version {mv.version}; nothing registered")
    if promote:
        decision = decide(client, name, mv, metrics, params)
    else:
        decision = Decision(False, ["sweep candidate: the best of the sweep is promoted after it"])
    aliases = client.get_model_version(name, mv.version).aliases
    print(f"register: promote={decision.promote}: " + "; ".join(decision.reasons))
    return {
        "model_name": name,
        "version": str(mv.version),
        "new_version": new,
        "aliases": sorted(aliases),
        **asdict(decision),
        "tags": tags,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, help="write the outcome as JSON here")
    parser.add_argument("--no-promote", action="store_true", help="register only (sweep runs)")
    args = parser.parse_args()
    # The model is local: stop MLflow looking for a model card and license on the Hub.
    os.environ["HF_HUB_OFFLINE"] = "1"
    report = register(load_params(), promote=not args.no_promote)
    if args.report:
        write_json(args.report, report)


if __name__ == "__main__":
    run_main(main)
