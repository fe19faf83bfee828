"""Greedy completions of prompts cut from held-out documents: base and tuned side by side."""

from __future__ import annotations

PROMPT_CHARS = 160  # characters of a held-out document's opening used as a generation prompt


def sample_prompts(texts: list[str], n: int) -> list[str]:
    """The openings of the first n held-out documents, cut at a word boundary."""
    prompts = []
    for text in texts[:n]:
        head = text[:PROMPT_CHARS]
        prompts.append(head.rsplit(" ", 1)[0] if len(text) > PROMPT_CHARS and " " in head else head)
    return prompts


def complete_prompts(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy completions, one prompt at a time (no padding, so no padding side to get wrong)."""
    from steps.chat_serving import generate_reply

    return [generate_reply(model, tokenizer, p, max_new_tokens).text for p in prompts]


def chat_prompts(conversations: list[list[dict]], n: int) -> list[list[dict]]:
    """The first n held-out conversations up to (not including) their last assistant turn."""
    prompts = []
    for messages in conversations[:n]:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompts.append(messages[:last])
    return prompts


def answer_chats(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy answers through the model's chat template, stopping at its end-of-turn token."""
    from steps.chat_serving import generate_reply

    return [generate_reply(model, tokenizer, p, max_new_tokens).text for p in prompts]
