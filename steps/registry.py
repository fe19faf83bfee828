"""MLflow model registry I/O: look versions up by alias or tag, log and register a model.

A model whose tokenizer has a chat template is logged as `llm/v1/chat` (OpenAI chat payloads:
`messages` in, `choices[0].message.content` out), any other as `llm/v1/completions`. Both are logged
with an inference config that makes the stock scoring server decode greedily (see
SERVING_INFERENCE_CONFIG).

Only "this alias is not set" (or "this model is not registered yet") means there is no champion; any
other MLflow error (a locked database, a refused request) propagates, so it can never read as "no
champion" and let a run promote over one it failed to see.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

from steps.tracking import inside_flow_run

CHAMPION, CHALLENGER = "champion", "challenger"
SERVING_PACKAGES = ("mlflow", "transformers", "torch", "accelerate", "safetensors", "tokenizers")
COMPLETIONS_TASK, CHAT_TASK = "llm/v1/completions", "llm/v1/chat"
INPUT_EXAMPLES = {
    COMPLETIONS_TASK: {"prompt": "The for statement", "max_tokens": 32, "temperature": 0.0},
    CHAT_TASK: {
        "messages": [{"role": "user", "content": "What does the for statement do?"}],
        "max_tokens": 32,
        "temperature": 0.0,
    },
}
# The logged pyfunc's model_config: the defaults of every generate() the scoring server runs.
# MLflow's server builds a transformers text-generation pipeline, whose own defaults (transformers
# pipelines/text_generation.py: do_sample=True, temperature=0.7, max_new_tokens=256) apply where
# the model's generation_config.json is silent, and it passes a request's `temperature` through
# unchanged: the same prompt got different answers, and temperature 0 was an error ("`temperature`
# (=0.0) has to be a strictly positive float"). do_sample=False makes every request greedy, the
# default of `generate()` itself; a request's temperature is then ignored (a transformers warning in
# the server's log), since the stock server cannot map temperature > 0 to sampling per request.
SERVING_INFERENCE_CONFIG = {"do_sample": False}
# MLflow renders messages with apply_chat_template(tokenize=False) and the pipeline tokenizes that
# text again: without this a tokenizer that adds BOS would put a second one before the template's.
CHAT_INFERENCE_CONFIG = {**SERVING_INFERENCE_CONFIG, "add_special_tokens": False}


# The logged model's MLmodel metadata key of its greedy replies to the smoke check's prompts,
# recorded at registration (steps/chat_serving.py greedy_record; read by steps/serve.py).
RECORDED_REPLIES = "llmpipe_greedy_replies"

MEASURED = "measured_"  # version tags measured_<key>: how its perplexity was measured


def measurement_tags(measured: dict[str, str]) -> dict[str, str]:
    """A measurement record (steps/scoring.py measurement) as version tags."""
    return {MEASURED + key: str(value) for key, value in measured.items()}


def measured_from_tags(tags: dict[str, str]) -> dict[str, str]:
    """The measurement record stored on a version (keys it lacks are simply absent)."""
    return {k[len(MEASURED) :]: v for k, v in tags.items() if k.startswith(MEASURED)}


def is_unset_alias(err: Exception) -> bool:
    """True for MLflow's answer to an alias that is not set or a model never registered."""
    code = getattr(err, "error_code", "")
    message = str(getattr(err, "message", err))
    if code == "RESOURCE_DOES_NOT_EXIST":
        return True
    return code == "INVALID_PARAMETER_VALUE" and "alias" in message and "not found" in message


def alias_version(client, name: str, alias: str):
    """The model version behind `alias`, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if is_unset_alias(err):
            return None
        raise


def champion_version(uri: str, name: str):
    """The registered version behind alias `champion` in the registry at `uri`, or None."""
    from mlflow import MlflowClient

    return alias_version(MlflowClient(uri), name, CHAMPION)


def find_version_by_tag(client, name: str, key: str, value: str):
    """The first version of `name` whose tag `key` equals `value` (None for an empty value)."""
    if not value:
        return None
    for mv in client.search_model_versions(f"name='{name}'"):
        if mv.tags.get(key) == value:
            return mv
    return None


def pip_requirements() -> list[str]:
    """Exact versions of what the scoring server needs (MLflow's inference trips on torchvision)."""
    return [f"{pkg}=={version(pkg).split('+')[0]}" for pkg in SERVING_PACKAGES]


def serving_task(tokenizer) -> str:
    """llm/v1/chat for a tokenizer with a chat template, else llm/v1/completions."""
    return CHAT_TASK if getattr(tokenizer, "chat_template", None) else COMPLETIONS_TASK


def inference_config(task: str) -> dict:
    """The generation defaults logged with a model of `task` (the scoring server's model_config)."""
    return dict(CHAT_INFERENCE_CONFIG if task == CHAT_TASK else SERVING_INFERENCE_CONFIG)


def log_and_register(
    uri: str,
    name: str,
    model_dir: Path,
    tags: dict[str, str],
    task: str | None = None,
    replies_to: Callable[[str], tuple[list, int]] | None = None,
):
    """Log `model_dir` into the flow's run (transformers flavor; OpenAI-style chat when its
    tokenizer has a chat template, else completions; greedy by default), register it as a new
    version of `name` with `tags`, and point `challenger` at it. `task` overrides the choice
    (register serves a model fine-tuned on raw text as completions, template or not).
    `replies_to(task)`: (prompts, max_tokens) whose greedy replies, generated here on the server's
    device by the model being logged, go into its MLmodel metadata (RECORDED_REPLIES), so the
    serving check need not load the model again.

    The tags are set in the call that creates the version, so a retry after a crash finds the
    version by its model_hash tag instead of registering an untagged duplicate."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import Model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Components, not a checkpoint path: MLflow's path mode breaks on
    # transformers 5's task registry.
    components = {
        "model": AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True),
        "tokenizer": AutoTokenizer.from_pretrained(model_dir),
    }
    task = task or serving_task(components["tokenizer"])
    metadata = None
    if replies_to is not None:
        from steps.chat_serving import greedy_record, serving_device

        prompts, max_tokens = replies_to(task)
        model = components["model"].to(serving_device())
        record = greedy_record(model, components["tokenizer"], prompts, max_tokens)
        metadata = {RECORDED_REPLIES: record}
    with inside_flow_run():
        # mlflow.transformers.log_model() is this call with validate_serving_input on: MLflow
        # would reload the model and complete the input example in-process (12-17 s of the
        # register step for SmolLM2-135M on 2 CPU cores, against ~2 s for the logging itself).
        # smoke_serve checks more than that: the registered version served by the stock server.
        info = Model.log(
            artifact_path=None,
            flavor=mlflow.transformers,
            validate_serving_input=False,
            transformers_model=components,
            name="model",
            task=task,
            model_config=inference_config(task),
            pip_requirements=pip_requirements(),
            input_example=INPUT_EXAMPLES[task],
            metadata=metadata,
        )
        mv = mlflow.register_model(info.model_uri, name, tags=tags)
    MlflowClient(uri).set_registered_model_alias(name, CHALLENGER, mv.version)
    return mv
