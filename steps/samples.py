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
    import torch

    device = next(model.parameters()).device
    outputs = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
            new = model.generate(
                **ids,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )[0, ids["input_ids"].shape[1] :]
            outputs.append(tokenizer.decode(new, skip_special_tokens=True))
    return outputs
