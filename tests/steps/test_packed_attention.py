"""Packed blocks attended one conversation at a time (steps/packed_attention.py): the same numbers
as transformers' block-diagonal mask, forward and backward, and used only where it applies."""

from __future__ import annotations

import json

import pytest
import torch

from steps import packed_attention
from steps.chat import pack, packed_batch
from steps.packed_attention import ATTENTION, segments, use_for_packed_blocks
from tests.steps.test_chat import conversations, per_token_losses

pytestmark = pytest.mark.unit


@pytest.fixture
def models(tiny_chat_model_dir):
    """The tiny chat Llama twice, in fp32: stock SDPA (block-diagonal mask) and llmpipe's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stock = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir, attn_implementation="sdpa")
    ours = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir, attn_implementation="sdpa")
    assert use_for_packed_blocks(ours)
    assert ours.config._attn_implementation == ATTENTION
    return stock, ours, AutoTokenizer.from_pretrained(tiny_chat_model_dir)


def packed(tok, extra_rows: int = 1) -> dict:
    """Two blocks of the test conversations in different orders, padding at the end of each."""
    seqs = conversations(tok)
    size = sum(len(ids) for ids, _ in seqs) + 7
    rows = [pack(seqs, size, pad_id=0), pack(seqs[::-1], size, pad_id=0)][: 1 + extra_rows]
    return packed_batch(rows)


def test_segments_are_the_runs_of_consecutive_positions():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    assert segments(positions) == [[(0, 3), (3, 5), (5, 9)], [(0, 9)]]


@pytest.mark.parametrize("math_below", [0, 10**6], ids=["flash-kernel", "math-kernel"])
def test_loss_and_gradients_equal_the_block_diagonal_mask(models, monkeypatch, math_below):
    """A training step on packed blocks: same loss and same gradient of every weight (fp32, 1e-5)
    as stock SDPA with its mask, whichever torch kernel runs the pieces."""
    monkeypatch.setattr(packed_attention, "MATH_BELOW", math_below)
    stock, ours, tok = models
    batch = packed(tok)
    results = []
    for model in (stock, ours):
        model.train()
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-4, msg=name)


def test_each_conversation_scores_as_alone(models):
    """The isolation property of steps/chat.py, under this implementation: per-token losses packed
    among others equal the conversation's losses alone (fp32, 1e-5)."""
    stock, ours, tok = models
    seqs = conversations(tok)
    batch = packed(tok, extra_rows=0)
    with torch.no_grad():
        logits = ours(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        offset = 0
        for ids, _ in seqs:
            alone = per_token_losses(stock(torch.tensor([ids])).logits[0], ids)
            got = per_token_losses(logits[offset : offset + len(ids)], ids)
            torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)
            offset += len(ids)


def test_padded_and_unpacked_batches_take_the_stock_path(models):
    """With a padding mask (generation, scoring) or one sequence per row, the same logits as
    stock SDPA: the mask is honoured, not cut by positions."""
    stock, ours, _ = models
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 7, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        for kwargs in ({"attention_mask": mask}, {}):
            torch.testing.assert_close(
                ours(ids, **kwargs).logits, stock(ids, **kwargs).logits, atol=1e-6, rtol=0
            )


def test_train_uses_it_for_packed_blocks_on_cpu_only_and_saves_stock_config(
    tiny_chat_model_dir, tmp_path
):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from steps.params import TrainParams
    from steps.train import make_trainer, training_arguments

    args = training_arguments(TrainParams(max_steps=1), tmp_path / "ckpt")
    block = {"input_ids": [1, 2], "labels": [1, 2], "position_ids": [0, 1]}
    chat_blocks = Dataset.from_list([block])
    text_blocks = Dataset.from_list([{"input_ids": [1, 2]}])
    for data, expected in ((chat_blocks, ATTENTION), (text_blocks, "sdpa")):
        model = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir)
        trainer = make_trainer(model, args, data)
        assert trainer.model.config._attn_implementation == expected
    trainer.model.set_attn_implementation(ATTENTION)
    trainer.save_model(str(tmp_path / "saved"))
    assert "llmpipe" not in json.dumps(json.loads((tmp_path / "saved" / "config.json").read_text()))
