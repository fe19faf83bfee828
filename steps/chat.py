"""Conversations as training sequences: the base model's chat template, assistant-only labels, and
packing that keeps conversations apart.

- render(): one conversation -> token ids through the tokenizer's own chat template, and labels that
  keep the assistant's tokens (each turn's text and its end-of-turn token) and mark everything else
  -100, so the loss covers what the model should say, never the prompt.
- pack(): conversations -> blocks of `block_size` tokens (first fit, longest first). Inside a
  block each conversation's positions restart at 0, and packed_batch() hands the model those
  position ids with no attention mask and no cache: transformers then builds a block-diagonal
  mask, so no token attends across a conversation boundary (tests/steps/test_chat.py measures it:
  each conversation's per-token losses packed among others equal its losses alone). Position ids
  with the model's default `use_cache=True` are not enough: the cache disables the packed-sequence
  detection and the conversations see each other (measured there too). On a CPU, steps.train
  swaps the mask for attention cut at the position restarts (steps/packed_attention.py): the
  same numbers, without scoring every position of a block against every other (1.39x per step
  at block 1024 holding ten 100-token conversations, ~3% at 256 holding three).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from steps.errors import UserError

IGNORE = -100  # label of a token the loss skips (the Trainer's and torch's convention)


def check_chat_template(tokenizer, where: str) -> None:
    """Chat data needs the model's own template: say so before anything is tokenized."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{where}: the base model has no chat template, so chat records cannot be rendered; "
            "use an instruct/chat model (base_model.source) or set prepare.format: text"
        )


def assistant_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    A turn's span runs from the end of the prompt the template renders before it
    (add_generation_prompt=True) to the end of the conversation rendered up to that turn, minus
    trailing whitespace: the turn's text and its end-of-turn token, which teaches the model to stop.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(
            messages[:i], tokenize=False, add_generation_prompt=True
        )
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(upto) and upto.startswith(before)):
            raise UserError(
                "the chat template renders a conversation differently from its prefixes, so the "
                "assistant turns cannot be located; use another chat model or prepare.format: text"
            )
        end = len(upto.rstrip())
        if end > len(before):
            spans.append((len(before), end))
    return text, spans


def render(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation: labels are the ids of the assistant's tokens (a
    token belongs to a turn when it starts inside the turn's span) and IGNORE elsewhere."""
    text, spans = assistant_spans(messages, tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = enc["input_ids"]
    labels = [IGNORE] * len(ids)
    for k, (start, _end) in enumerate(enc["offset_mapping"]):
        if any(a <= start < b for a, b in spans):
            labels[k] = ids[k]
    return ids, labels


@dataclass
class Fitted:
    """How a conversation fits a block: kept whole, truncated to the block, or dropped."""

    ids: list[int]
    labels: list[int]
    truncated: bool


def fit(ids: list[int], labels: list[int], block_size: int, overlong: str) -> Fitted | None:
    """A conversation cut to `block_size` tokens ('truncate') or None ('drop') when longer."""
    if len(ids) <= block_size:
        return Fitted(ids, labels, False)
    if overlong == "drop":
        return None
    return Fitted(ids[:block_size], labels[:block_size], True)


def supervised(labels: Iterable[int]) -> int:
    """Tokens that carry a loss. The first label of a sequence never does: nothing predicts it."""
    labels = list(labels)
    return sum(1 for t in labels[1:] if t != IGNORE)


def plan_blocks(lengths: list[int], block_size: int) -> list[list[int]]:
    """Indices of sequences per block: first fit, longest first (ties in input order), so the plan
    is the same on every machine. Every length must be <= block_size."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    blocks: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                blocks[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            blocks.append([i])
            room.append(block_size - lengths[i])
    return blocks


def pack(sequences: list[tuple[list[int], list[int]]], block_size: int, pad_id: int) -> dict:
    """One block: the planned sequences back to back, each with positions from 0 and its first
    label IGNORE; the rest is padding (its own position run, labels IGNORE)."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for ids_i, labels_i in sequences:
        ids += ids_i
        labels += [IGNORE, *labels_i[1:]]
        positions += range(len(ids_i))
    pad = block_size - len(ids)
    return {
        "input_ids": ids + [pad_id] * pad,
        "labels": labels + [IGNORE] * pad,
        "position_ids": positions + list(range(pad)),
        "sequences": len(sequences),
    }


def blocks(tokenized, block_size: int, pad_id: int) -> Iterator[dict]:
    """Packed blocks of a dataset with `input_ids` and `labels` columns (each row <= block_size)."""
    for plan in plan_blocks([len(x) for x in tokenized["input_ids"]], block_size):
        rows = tokenized[plan]
        yield pack(list(zip(rows["input_ids"], rows["labels"], strict=True)), block_size, pad_id)


def packed_batch(features: list[dict]):
    """Collate packed blocks: position ids and no attention mask or cache, so the model keeps every
    conversation in its own block-diagonal part of the attention (see the module docstring)."""
    import torch

    def stack(key: str) -> torch.Tensor:
        return torch.tensor([f[key] for f in features], dtype=torch.long)

    return {
        "input_ids": stack("input_ids"),
        "labels": stack("labels"),
        "position_ids": stack("position_ids"),
        "use_cache": False,
    }
