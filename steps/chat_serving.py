"""Requests to MLflow's scoring server, in-process generation, and the parity check between them.

    checks = check_parity(url, model, tokenizer, prompts, max_tokens=64)   # server vs generate()
    ok, reason = parity_verdict(checks, max_tokens, end_of_turn_name(model, tokenizer))

A prompt is completion text (a str, for an llm/v1/completions model) or chat messages ending
before an assistant turn ([{"role": "user", "content": ...}], for an llm/v1/chat model). The
server is asked at temperature 0 and its answer must equal, character for character, what
`generate(do_sample=False)` makes in this process of the same prompt: chat messages through the
tokenizer's chat template (`apply_chat_template(..., add_generation_prompt=True)`), text through
the tokenizer as it is.
`generate_reply` is the one home of that generation: `llmpipe chat` answers with it too.

The in-process side can be made once, when the model is registered (`greedy_record`: the replies
keyed by prompt, the budget, and where they were generated), and kept in the logged model's MLmodel
metadata; the serving check then compares the server's answers with that record, and generates
here only the replies it lacks (steps/serve.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

Messages = list[dict[str, str]]
Prompt = str | Messages  # completion text, or chat messages that end before an assistant turn


def is_chat(prompt: Prompt) -> bool:
    return not isinstance(prompt, str)


def request_body(prompt: Prompt, max_tokens: int, temperature: float = 0.0) -> dict:
    """The OpenAI-style payload: {"messages": ...} for chat, {"prompt": ...} for completions."""
    key = "messages" if is_chat(prompt) else "prompt"
    return {key: prompt, "max_tokens": max_tokens, "temperature": temperature}


def answer_text(answer: dict | list) -> str:
    """The generated text of a scoring-server answer: choices[0].message.content (chat) or
    choices[0].text (completions), unwrapped from a list or {"predictions": ...}."""
    if isinstance(answer, dict) and "predictions" in answer:
        answer = answer["predictions"]
    if isinstance(answer, list):
        answer = answer[0]
    choice = answer["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def ask(url: str, prompt: Prompt, max_tokens: int, temperature: float = 0.0) -> str:
    """POST one chat or completion request to `url`/invocations; the generated text."""
    body = json.dumps(request_body(prompt, max_tokens, temperature)).encode()
    req = urllib.request.Request(
        f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=300) as resp:
        return answer_text(json.loads(resp.read()))


def prompt_label(prompt: Prompt) -> str:
    """A prompt as one short line: the text, or the last message's content."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


# -- in-process generation -----------------------------------------------------------------------


def end_of_turn_ids(model, tokenizer) -> set[int]:
    """The ids generate() stops at: the generation config's EOS id(s) and the tokenizer's EOS
    (`<|im_end|>` for a ChatML model)."""
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def end_of_turn_name(model, tokenizer) -> str:
    return "/".join(tokenizer.convert_ids_to_tokens(sorted(end_of_turn_ids(model, tokenizer))))


def prompt_ids(tokenizer, prompt: Prompt) -> dict:
    """Model inputs (input_ids, attention_mask) of a prompt: chat messages through the chat
    template with the assistant turn opened, text tokenized as the scoring server does."""
    if is_chat(prompt):
        return tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
    return tokenizer(prompt, return_tensors="pt")


@dataclass(frozen=True)
class Reply:
    text: str  # the new tokens decoded without special tokens
    prompt_ids: list[int]
    new_ids: list[int]  # the end-of-turn token included, when it came
    ended: bool  # stopped at an end-of-turn token (False: it ran into the token budget)


def served_form(tokenizer, reply: Reply) -> str:
    """The reply as MLflow's server returns it (llm_inference_utils._get_completions_text): the
    whole sequence decoded, the decoded prompt's length cut off, leading whitespace stripped."""
    kwargs = {"skip_special_tokens": True, "clean_up_tokenization_spaces": True}
    whole = tokenizer.decode(reply.prompt_ids + reply.new_ids, **kwargs)
    return whole[len(tokenizer.decode(reply.prompt_ids, **kwargs)) :].lstrip()


def generate_reply(
    model,
    tokenizer,
    prompt: Prompt,
    max_new_tokens: int,
    temperature: float = 0.0,
    on_text: Callable[[str], None] | None = None,
) -> Reply:
    """Generate an answer to `prompt`: greedy at temperature 0 (do_sample=False, reproducible),
    sampled at `temperature` above it; `on_text` receives the text as it is generated."""
    import torch

    device = next(model.parameters()).device
    inputs = prompt_ids(tokenizer, prompt).to(device)
    sampling = {"temperature": temperature} if temperature > 0 else {}
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            streamer=None if on_text is None else text_relay(tokenizer, on_text),
            **sampling,
        )[0].tolist()
    n_prompt = inputs["input_ids"].shape[1]
    new = out[n_prompt:]
    return Reply(
        text=tokenizer.decode(new, skip_special_tokens=True),
        prompt_ids=out[:n_prompt],
        new_ids=new,
        ended=bool(new) and new[-1] in end_of_turn_ids(model, tokenizer),
    )


def text_relay(tokenizer, on_text: Callable[[str], None]):
    """A transformers TextStreamer that hands each finished piece of the answer to `on_text`."""
    from transformers import TextStreamer

    class Relay(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                on_text(text)

    return Relay(tokenizer, skip_prompt=True, skip_special_tokens=True)


def serving_device() -> str:
    """The device MLflow's scoring server generates on: GPU 0 when there is one, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def serving_place() -> dict[str, str | None]:
    """Where replies are generated, as far as it decides their numerics: the host and the GPUs it
    may use. Replies recorded at one place are not the reference for a server at another."""
    return {
        "host": socket.gethostname(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def prompt_key(prompt: Prompt) -> str:
    """A prompt's key in a record of replies: the SHA-256 of its canonical JSON."""
    return hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).hexdigest()


def greedy_record(model, tokenizer, prompts: list[Prompt], max_tokens: int) -> dict:
    """In-process greedy replies to `prompts` in the server's form (served_form), keyed by
    prompt_key, with the budget, the end-of-turn token and the place they were made at: what the
    server's answers at temperature 0 must equal."""
    replies = {}
    for prompt in prompts:
        reply = generate_reply(model, tokenizer, prompt, max_tokens)
        replies[prompt_key(prompt)] = {"text": served_form(tokenizer, reply), "ended": reply.ended}
    return {
        "max_tokens": max_tokens,
        "end_token": end_of_turn_name(model, tokenizer),
        "place": serving_place(),
        "replies": replies,
    }


def merge_records(first: dict | None, second: dict) -> dict:
    """`second` with the replies of `first` (made with the same budget) it lacks."""
    if first is None:
        return second
    return {**second, "replies": {**first["replies"], **second["replies"]}}


# -- parity --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParityCheck:
    prompt: Prompt
    served: list[str]  # the server's answers to this prompt at temperature 0 (one or more)
    expected: str  # in-process greedy generation, in the server's form (served_form)
    ended: bool  # the greedy reply stopped at an end-of-turn token within the budget

    @property
    def equal(self) -> bool:
        return all(answer == self.expected for answer in self.served)


def check_parity(
    url: str, model, tokenizer, prompts: list[Prompt], max_tokens: int
) -> list[ParityCheck]:
    """Ask the running server each prompt at temperature 0 and generate it greedily here."""
    served = [[ask(url, prompt, max_tokens)] for prompt in prompts]
    return parity_checks(prompts, served, greedy_record(model, tokenizer, prompts, max_tokens))


def parity_checks(
    prompts: list[Prompt], served: list[list[str]], record: dict
) -> list[ParityCheck]:
    """The server's answers (per prompt) beside the greedy replies of `record` (greedy_record) to
    the same prompts; a KeyError for a prompt it lacks."""
    checks = []
    for prompt, answers in zip(prompts, served, strict=True):
        reply = record["replies"][prompt_key(prompt)]
        checks.append(ParityCheck(prompt, answers, reply["text"], reply["ended"]))
    return checks


def short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


def parity_verdict(
    checks: list[ParityCheck], max_tokens: int, end_token: str, require_end: bool = False
) -> tuple[bool, str]:
    """Whether the served answers equal in-process greedy generation, and one line that says so
    (and how many answers ran into the `max_tokens` budget before `end_token`). An answer that
    hits the budget is reported, and fails the check only with `require_end`."""
    n = len(checks)
    differ = [i for i, c in enumerate(checks) if not c.equal]
    if differ:
        c = checks[differ[0]]
        other = next(a for a in c.served if a != c.expected)
        return False, (
            f"served answers differ from in-process greedy generation for {len(differ)} of {n} "
            f"prompts; prompt {differ[0] + 1} {short(prompt_label(c.prompt), 40)}: served "
            f"{short(other)}, expected {short(c.expected)}"
        )
    cut = sum(not c.ended for c in checks)
    ending = (
        f"all ended at {end_token} within {max_tokens} tokens"
        if not cut
        else f"{cut} of {n} hit the {max_tokens}-token budget before {end_token}"
    )
    reason = f"served answers equal in-process greedy generation for {n} of {n} prompts; {ending}"
    return not (cut and require_end), reason
