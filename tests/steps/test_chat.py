"""Chat rendering, assistant-only labels and packing that keeps conversations apart."""

from __future__ import annotations

import pytest
import torch

from steps.chat import (
    IGNORE,
    check_chat_template,
    fit,
    pack,
    packed_batch,
    plan_blocks,
    render,
    supervised,
)
from steps.errors import UserError

pytestmark = pytest.mark.unit

CONVERSATION = [
    {"role": "system", "content": "You answer questions about Python."},
    {"role": "user", "content": "What is a for statement?"},
    {"role": "assistant", "content": "The for statement is used to iterate."},
    {"role": "user", "content": "And while?"},
    {"role": "assistant", "content": "A while statement repeats as long as an expression is true."},
]


@pytest.fixture(scope="module")
def chat(tiny_chat_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir, attn_implementation="sdpa")
    return model.eval(), AutoTokenizer.from_pretrained(tiny_chat_model_dir)


def test_labels_are_exactly_the_assistant_turns_and_their_end_of_turn_tokens(chat):
    _, tok = chat
    ids, labels = render(CONVERSATION, tok)
    assert ids == tok(tok.apply_chat_template(CONVERSATION, tokenize=False))["input_ids"]
    expected = []
    for m in CONVERSATION:
        if m["role"] == "assistant":
            content = tok(m["content"], add_special_tokens=False)["input_ids"]
            expected += [*content, tok.eos_token_id]
    assert [t for t in labels if t != IGNORE] == expected
    assert supervised(labels) == len(expected)
    # the prompt side (system, user turns, role headers) carries no loss
    prompt = tok.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True)["input_ids"]
    assert len(prompt) > 20 and ids[: len(prompt)] == prompt
    assert all(t == IGNORE for t in labels[: len(prompt)]) and labels[len(prompt)] != IGNORE


def test_a_model_without_a_chat_template_is_refused(tiny_model):
    _, tok = tiny_model
    with pytest.raises(UserError, match="has no chat template"):
        check_chat_template(tok, "data/chat.jsonl")


def per_token_losses(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits[: len(ids) - 1], torch.tensor(ids[1:]), reduction="none"
    )


def conversations(tok) -> list[tuple[list[int], list[int]]]:
    convs = [
        CONVERSATION,
        CONVERSATION[1:3],
        [{"role": "user", "content": "Exceptions?"}, {"role": "assistant", "content": "Raised."}],
    ]
    return [render(c, tok) for c in convs]


def packed_losses(model, seqs, block_size: int, **forward) -> list[torch.Tensor]:
    block = pack(seqs, block_size, pad_id=0)
    batch = packed_batch([block])
    if forward:
        batch.update(forward)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0].float()
    out, offset = [], 0
    for ids, _ in seqs:
        out.append(per_token_losses(logits[offset : offset + len(ids)], ids))
        offset += len(ids)
    return out


def test_packed_conversations_score_exactly_as_alone(chat):
    """Each conversation's per-token losses among others equal its losses alone (fp32, 1e-5)."""
    model, tok = chat
    seqs = conversations(tok)
    block_size = sum(len(ids) for ids, _ in seqs) + 5  # and some padding at the end
    alone = []
    for ids, _ in seqs:
        with torch.no_grad():
            alone.append(per_token_losses(model(torch.tensor([ids])).logits[0].float(), ids))
    packed = packed_losses(model, seqs, block_size)
    for a, p in zip(alone, packed, strict=True):
        torch.testing.assert_close(p, a, atol=1e-5, rtol=0)


def test_position_ids_alone_leak_across_conversations_with_the_default_cache(chat):
    """Why packed_batch turns the cache off: with it, transformers skips its packed-sequence mask
    and later conversations attend to earlier ones (measured: losses move by far more than 1e-5)."""
    model, tok = chat
    seqs = conversations(tok)
    block_size = sum(len(ids) for ids, _ in seqs)
    isolated = packed_losses(model, seqs, block_size)
    leaky = packed_losses(model, seqs, block_size, use_cache=True)
    assert (leaky[1] - isolated[1]).abs().max() > 1e-3


def test_packed_labels_never_ask_a_conversation_to_predict_the_next_one(chat):
    _, tok = chat
    seqs = conversations(tok)
    block = pack(seqs, 200, pad_id=0)
    starts = [i for i, p in enumerate(block["position_ids"]) if p == 0]
    assert all(block["labels"][i] == IGNORE for i in starts)
    assert len(block["input_ids"]) == len(block["labels"]) == len(block["position_ids"]) == 200
    assert sum(supervised(labels) for _, labels in seqs) == sum(
        1 for t in block["labels"] if t != IGNORE
    )


def test_the_plan_places_every_sequence_once_within_the_block():
    lengths = [5, 9, 3, 7, 1, 10, 4, 4]
    plan = plan_blocks(lengths, 10)
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in plan)
    assert len(plan) == 5  # 43 tokens need at least 5 blocks of 10
    assert plan == plan_blocks(lengths, 10)


def test_an_overlong_conversation_is_truncated_or_dropped_by_the_param():
    ids, labels = list(range(12)), [IGNORE] * 6 + list(range(6, 12))
    kept = fit(ids, labels, 8, "truncate")
    assert kept.truncated and kept.ids == ids[:8] and kept.labels == labels[:8]
    assert fit(ids, labels, 8, "drop") is None
    assert not fit(ids, labels, 12, "drop").truncated


def test_response_perplexity_scores_assistant_tokens_only(chat):
    """The metric's perplexity is exp(mean NLL of the assistant tokens given their prompts),
    computed here by hand with one forward pass per conversation."""
    import json
    import math

    from steps.scoring import load_metric

    model, tok = chat
    convs = [CONVERSATION, CONVERSATION[1:3]]
    nll, count, text = 0.0, 0, ""
    for messages in convs:
        ids, labels = render(messages, tok)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        for p in range(len(ids) - 1):
            if labels[p + 1] != IGNORE:
                nll -= logp[p, ids[p + 1]].item()
                count += 1
        text += tok.decode([t for t in labels if t != IGNORE], skip_special_tokens=True)

    result = load_metric("chat").compute(
        predictions=[json.dumps(m) for m in convs],
        model=model,
        tokenizer=tok,
        window=512,
        precision="fp32",  # the reference above is float32
    )
    assert result["tokens"] == count == sum(supervised(render(m, tok)[1]) for m in convs)
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(
        nll / math.log(2) / len(text.encode()), rel=1e-5
    )
    assert result["ci_low"] <= result["perplexity"] <= result["ci_high"]
    assert result["truncated"] == 0
    # a window shorter than the conversation cuts it (3 tokens into the first answer), and says so
    prompt = tok.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True)["input_ids"]
    window = len(prompt) + 3
    short = load_metric("chat").compute(
        predictions=[json.dumps(CONVERSATION)], model=model, tokenizer=tok, window=window
    )
    assert short["truncated"] == 1 and short["tokens"] == 3
