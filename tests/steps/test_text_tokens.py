"""steps/text_tokens.py: the ids of worker processes are the tokenizer's own, in order."""

from __future__ import annotations

import pytest

from steps.text_tokens import flat_ids, token_batches

pytestmark = pytest.mark.unit

TEXTS = [
    "The for statement iterates over a sequence.",
    "",
    "  leading spaces, unicode: naïve café — ½ 💡 and tabs\there",
    "def f(x):\n    return x ** 2\n",
    "x" * 300,
]


@pytest.mark.parametrize("num_proc", [1, 2])
def test_worker_ids_are_the_tokenizers_in_order(tiny_model, num_proc):
    _, tokenizer = tiny_model
    batches = [TEXTS[i : i + 2] for i in range(0, len(TEXTS), 2)] * 4  # more than in flight
    got = list(token_batches(iter(batches), tokenizer, num_proc))
    assert len(got) == len(batches)
    for texts, (flat, lengths) in zip(batches, got, strict=True):
        expected = tokenizer(texts, add_special_tokens=False)["input_ids"]
        assert lengths.tolist() == [len(x) for x in expected]
        assert flat.tolist() == [t for x in expected for t in x]
        assert str(flat.dtype) == "int32"


def test_flat_ids_of_empty_documents():
    flat, lengths = flat_ids([[], [5, 6], []])
    assert flat.tolist() == [5, 6] and lengths.tolist() == [0, 2, 0]
    flat, lengths = flat_ids([[], []])
    assert flat.tolist() == [] and lengths.tolist() == [0, 0]
