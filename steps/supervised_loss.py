"""The training loss over supervised tokens only, without materialising the logits.

    python -m steps.train ...    # steps.train's Trainer computes its loss here (the DVC stage)

The stock causal-LM loss runs the vocabulary projection (lm_head) at every position of a batch,
then a log-softmax over a [batch, length, vocab] tensor, then drops the positions labelled -100.
On chat data most positions are prompt, system text or padding (~60% of a packed SmolLM2 block of
the embedded QA data), and SmolLM2's head is ~23% of its matrix work per position; its [8, 256,
49152] float32 logits, their log-softmax and their gradient are ~1.2 GB of a step's memory.

Here the backbone runs as usual, its last hidden states are gathered at the positions whose next
token carries a label, and LinearCrossEntropy computes the head, the cross-entropy and their
gradients a chunk of positions at a time, keeping only the gradients of the hidden states (and of
the head's weight, when it trains): the idea of Liger's fused linear cross-entropy, written here in
plain torch because Liger's kernels are Triton (GPU only) and torch has no such op.
The loss is the stock one: the sum of token NLLs divided by the Trainer's `num_items_in_batch`
(the supervised tokens of the whole accumulated step), so it equals the stock loss to float
rounding (tests/steps/test_supervised_loss.py). A model whose logits are not plain
lm_head(hidden) (soft-capping, logit scale, a head with bias) keeps the stock loss.
"""

from __future__ import annotations

from typing import Any

import torch

from steps.chat import IGNORE

HEAD_CHUNK = 1024  # positions per head matmul: a [1024, 49152] float32 block is 200 MB


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i -log softmax(hidden_i @ weight.T)[target_i], with both gradients computed in the
    forward pass chunk by chunk, so no [positions, vocab] tensor outlives its chunk."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        for start in range(0, hidden.shape[0], HEAD_CHUNK):
            h = hidden[start : start + HEAD_CHUNK]
            t = targets[start : start + HEAD_CHUNK]
            logits = torch.mm(h, weight.t()).float()  # under autocast: a bf16 matmul
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            # d(sum NLL)/d(logits) = softmax - one_hot(target), built in place of the logits
            probs = logits.sub_(lse[:, None]).exp_()
            probs[torch.arange(len(t), device=t.device), t] -= 1.0
            if want_hidden:
                grad_hidden[start : start + HEAD_CHUNK] = torch.mm(probs.to(weight.dtype), weight)
            if want_weight:
                grad_weight.addmm_(probs.t(), h.float())
        ctx.save_for_backward(
            grad_hidden if want_hidden else None,
            grad_weight.to(weight.dtype) if want_weight else None,
        )
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            None if grad_hidden is None else grad_hidden * grad_output.to(grad_hidden.dtype),
            None if grad_weight is None else grad_weight * grad_output.to(grad_weight.dtype),
            None,
        )


def nll_sum(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor) -> torch.Tensor:
    """Sum of NLLs of every supervised token: position p predicts labels[p + 1] where that label
    is not IGNORE (the stock causal-LM shift), from hidden states [batch, length, width]."""
    keep = labels[:, 1:] != IGNORE
    picked = hidden[:, :-1][keep]
    targets = labels[:, 1:][keep]
    if torch.is_grad_enabled() and (picked.requires_grad or head.weight.requires_grad):
        return LinearCrossEntropy.apply(picked, head.weight, targets)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, picked.shape[0], HEAD_CHUNK):
        logits = head(picked[start : start + HEAD_CHUNK]).float()
        total += torch.nn.functional.cross_entropy(
            logits, targets[start : start + HEAD_CHUNK], reduction="sum"
        )
    return total


def backbone_and_head(model) -> tuple[Any, torch.nn.Linear] | None:
    """(backbone, lm_head) of a causal LM, or of the model inside a peft wrapper, when its logits
    are exactly lm_head(last hidden state) with a bias-free head; None otherwise."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None):
        return None
    if getattr(config, "logit_scale", None):
        return None
    head = inner.get_output_embeddings()
    backbone = getattr(inner, "base_model", None)
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return None
    if backbone is None or backbone is inner:
        return None
    return backbone, head


def supervised_trainer_class():
    """transformers' Trainer with compute_loss() over supervised tokens (imported lazily: a step
    that never trains does not import the Trainer)."""
    from transformers import Trainer

    class SupervisedTokensTrainer(Trainer):
        """The stock Trainer; its loss skips the head at unsupervised positions (module doc)."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            # compute_loss() below takes num_items_in_batch whatever the model's forward accepts,
            # so the Trainer counts it and does not rescale the loss for gradient accumulation
            self.model_accepts_loss_kwargs = True

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # A model wrapped for several devices (DataParallel, DDP) must be called through its
            # wrapper, which gathers gradients: it keeps the stock loss
            wrapped = self.accelerator.unwrap_model(model) is not model
            parts = None if wrapped else backbone_and_head(model)
            if parts is None or "labels" not in inputs or self.label_smoother is not None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            backbone, head = parts
            features = {k: v for k, v in inputs.items() if k != "labels"}
            labels = inputs["labels"]
            # Given a count, it is every process's supervised tokens (the Trainer gathers them);
            # the loss is scaled back by the process count as the stock compute_loss scales it
            # (DDP averages the gradients; the evaluation loop averages the losses)
            scale = 1
            if num_items_in_batch is None:
                num_items_in_batch = (labels[:, 1:] != IGNORE).sum()
            elif self.args.average_tokens_across_devices:
                scale = self.accelerator.num_processes
            # The Trainer's mixed precision wraps the model's own forward; the backbone and head
            # called here bypass it, so they enter the same autocast themselves (bf16 or none)
            with self.accelerator.autocast():
                hidden = backbone(**features).last_hidden_state
                loss = nll_sum(hidden, head, labels) / num_items_in_batch * scale
            return (loss, {"loss": loss}) if return_outputs else loss

    return SupervisedTokensTrainer
