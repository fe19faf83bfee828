"""Duplicates across splits: exact ones by content hash, near ones by MinHash (datasketch).

A training record that nearly repeats a held-out one would let the model memorise the test: such
records are removed from train (never from test), and the data card counts them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

NUM_PERM = 128  # MinHash permutations: the Jaccard estimate's standard error is <= 0.045
SHINGLE = 5  # words per shingle


def shingles(text: str) -> set[bytes]:
    """Word 5-grams of the lower-cased text (the whole text when it has fewer words)."""
    words = re.findall(r"\w+", text.lower())
    if len(words) < SHINGLE:
        return {" ".join(words).encode()} if words else set()
    return {" ".join(words[i : i + SHINGLE]).encode() for i in range(len(words) - SHINGLE + 1)}


def minhash(text: str):
    from datasketch import MinHash

    m = MinHash(num_perm=NUM_PERM, seed=1)
    m.update_batch(list(shingles(text)))
    return m


def near_duplicates(train: Iterable[str], test: list[str], threshold: float) -> list[int]:
    """Indices of `train` texts whose estimated Jaccard similarity to some `test` text is at least
    `threshold` (MinHash LSH over word 5-grams)."""
    from datasketch import MinHashLSH

    if not test or threshold > 1:
        return []
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    held_out = [minhash(text) for text in test]
    for i, m in enumerate(held_out):
        lsh.insert(str(i), m)
    found = []
    for i, text in enumerate(train):
        m = minhash(text)  # LSH finds candidates; their estimated similarity decides
        if any(m.jaccard(held_out[int(k)]) >= threshold for k in lsh.query(m)):
            found.append(i)
    return found
