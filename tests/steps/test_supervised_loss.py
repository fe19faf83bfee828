"""steps/supervised_loss.py: the same loss and gradients as the stock causal-LM loss, computed only
where a label is, a chunk of positions at a time."""

from __future__ import annotations

import pytest
import torch

from steps import supervised_loss as sl
from steps.chat import IGNORE, pack, packed_batch, render

pytestmark = pytest.mark.unit

TURNS = [
    [
        {"role": "user", "content": "What does a for statement do?"},
        {"role": "assistant", "content": "It iterates over the items of a sequence."},
        {"role": "user", "content": "And while?"},
        {"role": "assistant", "content": "It repeats while an expression is true."},
    ],
    [{"role": "user", "content": "Exceptions?"}, {"role": "assistant", "content": "Raised."}],
    [{"role": "user", "content": "pass?"}, {"role": "assistant", "content": "Does nothing."}],
]


def chat_batch(tokenizer) -> dict:
    """Two packed blocks of rendered conversations: prompts, assistant turns and padding."""
    seqs = [render(t, tokenizer) for t in TURNS]
    size = max(len(seqs[0][0]), len(seqs[1][0]) + len(seqs[2][0])) + 3
    return packed_batch([pack(seqs[:1], size, 0), pack(seqs[1:], size, 0)])


def stock_loss(model, batch: dict, num_items=None) -> torch.Tensor:
    extra = {"num_items_in_batch": num_items} if num_items is not None else {}
    return model(**batch, **extra).loss


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_linear_cross_entropy_equals_the_unfused_loss_and_gradients(monkeypatch):
    monkeypatch.setattr(sl, "HEAD_CHUNK", 3)  # 10 positions: chunks of 3, 3, 3 and 1
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 8, generator=gen, requires_grad=True)
    weight = torch.randn(50, 8, generator=gen, requires_grad=True)
    targets = torch.randint(0, 50, (10,), generator=gen)

    fused = sl.LinearCrossEntropy.apply(hidden, weight, targets)
    (0.5 * fused).backward()
    ours = fused.detach(), hidden.grad.clone(), weight.grad.clone()
    hidden.grad, weight.grad = None, None
    ref = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    (0.5 * ref).backward()
    assert ours[0] == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(ours[1], hidden.grad, atol=1e-6)
    assert torch.allclose(ours[2], weight.grad, atol=1e-6)


def test_a_frozen_head_gets_no_gradient_and_the_hidden_states_still_do():
    hidden = torch.randn(5, 4, requires_grad=True)
    weight = torch.randn(7, 4)  # frozen, as lm_head is under LoRA
    sl.LinearCrossEntropy.apply(hidden, weight, torch.tensor([0, 1, 2, 3, 6])).backward()
    assert weight.grad is None and hidden.grad is not None and hidden.grad.abs().sum() > 0


@pytest.fixture
def chat_model(tiny_chat_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir, attn_implementation="sdpa")
    return model, AutoTokenizer.from_pretrained(tiny_chat_model_dir)


def test_loss_and_gradients_equal_the_stock_loss_on_packed_chat_blocks(chat_model, monkeypatch):
    """The Trainer's loss: sum of supervised NLLs / num_items_in_batch, as the stock model's."""
    model, tokenizer = chat_model
    monkeypatch.setattr(sl, "HEAD_CHUNK", 7)
    batch = chat_batch(tokenizer)
    supervised = int((batch["labels"][:, 1:] != IGNORE).sum())
    positions = batch["labels"][:, 1:].numel()
    assert 0 < supervised < positions // 2  # most positions are prompt and padding: skipped
    num_items = torch.tensor(supervised + 11)  # as if the accumulated step had more tokens

    backbone, head = sl.backbone_and_head(model)
    features = {k: v for k, v in batch.items() if k != "labels"}
    ours = sl.nll_sum(backbone(**features).last_hidden_state, head, batch["labels"]) / num_items
    ours.backward()
    our_grads = grads(model)
    model.zero_grad(set_to_none=True)
    theirs = stock_loss(model, batch, num_items)
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    their_grads = grads(model)
    assert our_grads.keys() == their_grads.keys()  # the tied embedding/head included
    for name, g in their_grads.items():
        assert torch.allclose(our_grads[name], g, atol=1e-6), name


def test_a_lora_model_trains_the_same_adapter_gradients(chat_model):
    from steps.lora import wrap
    from steps.params import TrainParams

    model, tokenizer = chat_model
    peft_model = wrap(model, TrainParams(method="lora", lora_r=4))
    batch = chat_batch(tokenizer)
    assert sl.backbone_and_head(peft_model) is not None
    backbone, head = sl.backbone_and_head(peft_model)
    features = {k: v for k, v in batch.items() if k != "labels"}
    (sl.nll_sum(backbone(**features).last_hidden_state, head, batch["labels"]) / 5).backward()
    ours = grads(peft_model)
    peft_model.zero_grad(set_to_none=True)
    stock_loss(peft_model, batch, torch.tensor(5)).backward()
    theirs = grads(peft_model)
    assert ours.keys() == theirs.keys() and all("lora_" in n for n in ours)
    for name, g in theirs.items():
        assert torch.allclose(ours[name], g, atol=1e-6), name


def train_losses(
    trainer_class, model_dir, dataset, collate, tmp_path, accumulation=1, bf16=False, seen=None
):
    """Per-step losses of 4 steps; `seen` collects the dtypes of one MLP projection's outputs."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    if seen is not None:
        proj = model.model.layers[0].mlp.down_proj
        proj.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    args = TrainingArguments(
        bf16=bf16,
        use_cpu=bf16 and not torch.cuda.is_available(),
        output_dir=str(tmp_path / trainer_class.__name__),
        max_steps=4,
        per_device_train_batch_size=2 // accumulation,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=3,
        data_seed=3,
    )
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, data_collator=collate)
    trainer.train()
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_training_follows_the_stock_trainer_step_for_step(
    tiny_chat_model_dir, tmp_path, monkeypatch, accumulation
):
    """Four optimizer steps on packed chat blocks: the same per-step losses as transformers'
    own Trainer (so the same updates), with and without gradient accumulation."""
    from datasets import Dataset
    from transformers import AutoTokenizer, Trainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    seqs = [render(t, tokenizer) for t in TURNS * 3]
    blocks = [pack([s], 40, 0) for s in seqs]  # one conversation per block, cut to fit
    blocks = [{k: v[:40] for k, v in b.items() if k != "sequences"} for b in blocks]
    data = Dataset.from_list(blocks)
    calls, real = [], sl.nll_sum
    monkeypatch.setattr(sl, "nll_sum", lambda *a: calls.append(1) or real(*a))
    ours = train_losses(
        sl.supervised_trainer_class(), tiny_chat_model_dir, data, packed_batch, tmp_path,
        accumulation,
    )  # fmt: skip
    theirs = train_losses(Trainer, tiny_chat_model_dir, data, packed_batch, tmp_path, accumulation)
    assert len(ours) == len(theirs) == 4
    assert len(calls) == 4 * accumulation  # every micro-batch took the supervised-only path
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert ours[-1] < ours[0]  # it learns


def test_under_bf16_the_backbone_runs_in_the_trainers_autocast(tiny_chat_model_dir, tmp_path):
    """The loss calls the backbone itself, outside the forward the Trainer wraps in autocast: it
    must enter the same autocast, so bf16 training computes in bf16 like the stock Trainer's."""
    from datasets import Dataset
    from transformers import AutoTokenizer, Trainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    blocks = [pack([render(t, tokenizer)], 40, 0) for t in TURNS * 3]
    data = Dataset.from_list(
        [{k: v[:40] for k, v in b.items() if k != "sequences"} for b in blocks]
    )
    runs = {}
    for name, cls, bf16 in [
        ("ours-bf16", sl.supervised_trainer_class(), True),
        ("stock-bf16", Trainer, True),
        ("ours-fp32", sl.supervised_trainer_class(), False),
    ]:
        seen: list = []
        losses = train_losses(cls, tiny_chat_model_dir, data, packed_batch, tmp_path, 1, bf16, seen)
        runs[name] = losses, set(seen)
    assert runs["ours-bf16"][1] == runs["stock-bf16"][1] == {torch.bfloat16}
    assert runs["ours-fp32"][1] == {torch.float32}
    assert runs["ours-bf16"][0] != runs["ours-fp32"][0]  # different arithmetic
    assert runs["ours-bf16"][0] == pytest.approx(runs["stock-bf16"][0], rel=2e-2)


def test_models_whose_logits_are_not_a_plain_head_keep_the_stock_loss(chat_model):
    model, _ = chat_model
    assert sl.backbone_and_head(torch.nn.Linear(2, 2)) is None
    model.config.final_logit_softcapping = 30.0
    assert sl.backbone_and_head(model) is None
