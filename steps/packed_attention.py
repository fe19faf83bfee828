"""Attention over packed blocks, one conversation at a time.

    steps.train uses it on CPU when the training blocks are packed (steps/chat.py's packed_batch)

A packed block holds several conversations back to back, each with positions restarting at 0.
transformers keeps them apart with a block-diagonal causal mask ([batch, 1, T, T]); torch's CPU
attention kernels honour an arbitrary mask by scoring every query against every key, so a block
of 256 positions holding three conversations of ~85 tokens pays for 256 x 256 scores where each
conversation needs its own causal triangle: ~1/6 of them.

Here the block is cut where the positions restart and each piece runs through transformers' own
SDPA attention with `is_causal=True`, which is exactly what the conversation computes alone (the
isolation test in tests/steps/test_chat.py checks per-token losses packed vs alone to 1e-5 in fp32,
under this implementation too). Batches that are not packed, or that carry a padding mask or a
cache offset, take the stock SDPA path unchanged.

Registered once under the name ATTENTION, for the attention kernels and for the mask builder
(which then builds no [T, T] mask when there is no padding to express).
"""

from __future__ import annotations

from typing import ClassVar

import torch

ATTENTION = "llmpipe_packed_sdpa"
# Below this many positions torch's math attention (scores materialised, [heads, T, T] per piece)
# beats its CPU flash kernel forward + backward: 2.5x at 100 positions, even at 256, 0.87x at 512
# (2 cores AMD EPYC, bf16, SmolLM2's 9 query / 3 key-value heads of 64); the flash kernel's
# backward pass costs about the same per call at 16 positions as at 60.
MATH_BELOW = 256


def segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the [start, end) runs of consecutive positions (a packed sequence each)."""
    breaks = torch.ones_like(position_ids, dtype=torch.bool)
    breaks[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    length = position_ids.shape[1]
    runs = []
    for row in breaks.cpu():
        starts = row.nonzero().flatten().tolist()
        runs.append(list(zip(starts, [*starts[1:], length], strict=True)))
    return runs


class _LastSegments:
    """The segments of the last position_ids seen: every layer of one forward pass gets the same
    tensor, so they are computed once per pass, not once per layer."""

    position_ids: torch.Tensor | None = None
    runs: ClassVar[list[list[tuple[int, int]]]] = []

    @classmethod
    def of(cls, position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
        if position_ids is not cls.position_ids:
            cls.runs, cls.position_ids = segments(position_ids), position_ids
        return cls.runs


def piece_attention(module, query, key, value, kwargs: dict) -> torch.Tensor:
    """One sequence's causal attention, [1, T, heads, dim]: torch's math kernel below
    MATH_BELOW positions, its flash kernel above (what SDPA picks on CPU by default)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    backend = SDPBackend.MATH if query.shape[2] < MATH_BELOW else SDPBackend.FLASH_ATTENTION
    with sdpa_kernel(backend):
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)[0]


def packed_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' attention-function signature: query [batch, heads, T, dim], key and value
    [batch, kv_heads, T, dim]; returns ([batch, T, heads, dim], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.pop("position_ids", None)
    same_length = query.shape[2] == key.shape[2]
    if attention_mask is not None or position_ids is None or not same_length:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    runs = _LastSegments.of(position_ids.expand(query.shape[0], -1))
    if all(len(row) == 1 for row in runs):
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)
    kwargs["is_causal"] = True
    # split (not slicing) keeps the backward pass to one concatenation per split
    rows = []
    for q, k, v, row in zip(query.split(1), key.split(1), value.split(1), runs, strict=True):
        sizes = [end - start for start, end in row]
        pieces = [
            piece_attention(module, qs, ks, vs, kwargs)
            for qs, ks, vs in zip(
                q.split(sizes, dim=2), k.split(sizes, dim=2), v.split(sizes, dim=2), strict=True
            )
        ]
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows, dim=0), None


def packed_sdpa_mask(*args, attention_mask=None, **kwargs):
    """No [T, T] mask without padding (the attention above cuts the block instead); with a padding
    mask, the stock SDPA mask (and the stock attention path above)."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Make ATTENTION a valid `attn_implementation` (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, packed_sdpa_attention)
    AttentionMaskInterface.register(ATTENTION, packed_sdpa_mask)
    return ATTENTION


def use_for_packed_blocks(model) -> bool:
    """Switch a model (or the model inside a peft wrapper) that attends with stock SDPA to
    ATTENTION; True if it did. Models on another implementation (eager, flash, a custom one) are
    left alone. The name is not saved with the model (config.json never records it)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(inner.config, "_attn_implementation", None) != "sdpa":
        return False
    inner.set_attn_implementation(register())
    return True
