"""`llmpipe chat`: talk to a chat model in the terminal, each answer streamed as it is generated.

    llmpipe chat                                      # models:/<register.model_name>@champion
    llmpipe chat --model models/tuned --system "Answer in one sentence."
    echo "What is a for loop?" | llmpipe chat --model models/tuned   # one answer per input line

The conversation's history is kept: each answer sees every turn before it, through the model's
chat template. At --temperature 0 (the default) decoding is greedy, so the same conversation gets
the same answers, the ones the scoring server gives (steps/chat_serving.generate_reply is the one
home of that generation). EOF (Ctrl-D) ends; Ctrl-C ends with exit status 130.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from steps.errors import UserError

MAX_NEW_TOKENS = 256  # per answer; the scoring server's limit too, for a request without max_tokens
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", metavar="DIR|URI", help="model directory or models:/NAME@ALIAS (default: "
        "models:/<register.model_name>@champion)",
    )  # fmt: skip
    parser.add_argument("--system", metavar="TEXT", help="a system message opening the chat")
    parser.add_argument("--max-new-tokens", metavar="N", type=int, default=MAX_NEW_TOKENS,
                        help=f"tokens per answer at most (default {MAX_NEW_TOKENS})")  # fmt: skip
    parser.add_argument("--temperature", metavar="T", type=float, default=0.0,
                        help="0 (default): greedy, reproducible; above 0: sampled")  # fmt: skip


def model_source(model: str | None, project: Path) -> str:
    """The model to talk to: --model as given (checked), else the project's champion."""
    if model is not None and not model.startswith("models:/"):
        if not (Path(model) / "config.json").is_file():
            raise UserError(
                f"--model {model}: no config.json there; give a model directory or "
                "models:/NAME@ALIAS"
            )
        return model
    if model is not None and "@" not in model:
        return model  # models:/NAME/VERSION: MLflow says what is wrong with it, if anything
    from mlflow import MlflowClient

    from steps.params import load_params
    from steps.registry import CHAMPION, alias_version
    from steps.serve import no_champion
    from steps.tracking import check_registry, registry_exists, tracking_uri

    uri = tracking_uri(project)
    check_registry(uri)  # a locked or corrupt registry is a fault, not "no champion"
    if model is None:
        name = load_params(project / "params.yaml").registry.model_name
        model, missing = f"models:/{name}@{CHAMPION}", no_champion(name)
    else:
        missing = UserError(f"--model {model}: no such alias; see `llmpipe models`")
    name, alias = model[len("models:/") :].split("@", 1)
    if not registry_exists(uri) or alias_version(MlflowClient(uri), name, alias) is None:
        raise missing
    return model


def load_chat_model(source: str, project: Path):
    """(model, tokenizer) of a directory or models:/ URI; a UserError when it cannot chat (its
    tokenizer has no chat template)."""
    from steps.scoring import load_model

    if source.startswith("models:/"):
        import mlflow
        from mlflow.exceptions import MlflowException

        from steps.tracking import tracking_uri

        mlflow.set_tracking_uri(tracking_uri(project))
        try:
            model, tokenizer = load_model(source)
        except MlflowException as err:
            raise UserError(f"--model {source}: {err.message.splitlines()[0]}") from None
    else:
        model, tokenizer = load_model(source)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{source}: its tokenizer has no chat template, so it cannot chat "
            "(score it with `llmpipe perplexity`, or pick a chat model, e.g. an -Instruct one)"
        )
    return model.eval(), tokenizer


def typed_turns() -> Iterator[str]:
    """Lines typed at the terminal, until EOF (Ctrl-D)."""
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if line.strip():
            yield line


def piped_turns() -> Iterator[str]:
    """Each non-blank line of a non-terminal stdin, one user turn each, until EOF."""
    for line in sys.stdin:
        if line.strip():
            yield line.rstrip("\r\n")


def converse(
    model,
    tokenizer,
    turns: Iterator[str],
    write: Callable[[str], None],
    system: str | None,
    max_new_tokens: int,
    temperature: float,
) -> list[dict[str, str]]:
    """Answer each turn with the whole conversation so far, streaming the answer to `write`;
    returns the conversation."""
    from steps.chat_serving import generate_reply

    messages = [{"role": "system", "content": system}] if system else []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        reply = generate_reply(model, tokenizer, messages, max_new_tokens, temperature, write)
        write("\n")
        messages.append({"role": "assistant", "content": reply.text})
        if not reply.ended:
            print(
                f"(answer cut at --max-new-tokens {max_new_tokens} before the end of its turn)",
                file=sys.stderr,
            )
    return messages


def write_now(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_chat(args: argparse.Namespace) -> int:
    """`llmpipe chat`: the exit status (0 at EOF, 130 on Ctrl-C)."""
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be 0 (greedy) or more, not {args.temperature:g}")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    interactive = sys.stdin.isatty()
    try:
        source = model_source(args.model, Path.cwd())
        model, tokenizer = load_chat_model(source, Path.cwd())
        if interactive:
            how = "greedy" if args.temperature == 0 else f"temperature {args.temperature:g}"
            print(f"chatting with {source} ({how}); Ctrl-D ends", file=sys.stderr)
        turns = typed_turns() if interactive else piped_turns()
        converse(model, tokenizer, turns, write_now, args.system, args.max_new_tokens,
                 args.temperature)  # fmt: skip
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return INTERRUPTED
    return 0
