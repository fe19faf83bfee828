"""Duplicates across splits: exact ones by content hash, near ones by MinHash (datasketch).

A training record that nearly repeats a held-out one would let the model memorise the test: such
records are removed from train (never from test), and the data card counts them.

A record is a near duplicate when MinHash LSH over word 5-grams finds a test record whose
estimated Jaccard similarity to it is at least the threshold. Computing a MinHash (128 hashes per
shingle) costs ~4x tokenizing the same text, so it is computed only where it can matter: a train
record whose Jaccard similarity to a test record B is J shares at least J x |A| of its distinct
shingles with B, so a record sharing fewer than (threshold - SLACK) x |A| shingles with every test
record cannot reach the threshold unless the estimate errs by more than SLACK (> 5 standard
errors at 128 permutations; the probability is below 1e-7). Shared shingles are counted on 64-bit
shingle hashes, first through a bitmap that can only over-count, then exactly for the records it
lets through (a hash collision only adds work, never hides a duplicate).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator

import numpy as np

NUM_PERM = 128  # MinHash permutations: the Jaccard estimate's standard error is <= 0.045
SHINGLE = 5  # words per shingle
SLACK = 0.25  # how far below the threshold a shared-shingle share still gets a MinHash
_WORD = re.compile(r"\w+")
_HIGH = np.uint64(0xFFFFFFFF00000000)
_LOW = np.uint64(0xFFFFFFFF)
_MULTIPLIERS = np.array(
    [
        0x9E3779B97F4A7C15,
        0xC2B2AE3D27D4EB4F,
        0x165667B19E3779F9,
        0x27D4EB2F165667C5,
        0xFF51AFD7ED558CCD,
    ],
    dtype=np.uint64,
)  # one odd 64-bit constant per position in the shingle


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def shingles(text: str) -> set[bytes]:
    """Word 5-grams of the lower-cased text (the whole text when it has fewer words)."""
    ws = words(text)
    if len(ws) < SHINGLE:
        return {" ".join(ws).encode()} if ws else set()
    return {" ".join(ws[i : i + SHINGLE]).encode() for i in range(len(ws) - SHINGLE + 1)}


def minhash(text: str):
    from datasketch import MinHash

    m = MinHash(num_perm=NUM_PERM, seed=1)
    m.update_batch(list(shingles(text)))
    return m


class _WordHashes:
    """A stable 64-bit hash per word (the same in every process), remembered per word."""

    def __init__(self, limit: int = 1_000_000) -> None:
        self.known: dict[str, int] = {}
        self.limit = limit

    def __call__(self, ws: list[str]) -> np.ndarray:
        known = self.known
        if len(known) > self.limit:
            known.clear()
        hs = list(map(known.get, ws))
        if None in hs:
            for i, h in enumerate(hs):
                if h is None:
                    w = ws[i]
                    digest = hashlib.blake2b(w.encode(), digest_size=8).digest()
                    hs[i] = known[w] = int.from_bytes(digest)
        return np.array(hs, dtype=np.uint64)


def shingle_hashes(text: str, word_hashes: _WordHashes) -> np.ndarray:
    """The distinct 64-bit hashes of the text's shingles (those of shingles(): a text with
    fewer words than a shingle is one shingle), sorted."""
    ws = words(text)
    if not ws:
        return np.empty(0, dtype=np.uint64)
    h = word_hashes(ws)
    if len(ws) < SHINGLE:
        return np.array([np.bitwise_xor.reduce(h * _MULTIPLIERS[: len(ws)])], dtype=np.uint64)
    n = len(ws) - SHINGLE + 1
    combined = h[:n] * _MULTIPLIERS[0]
    for k in range(1, SHINGLE):
        combined ^= h[k : k + n] * _MULTIPLIERS[k]
    combined.sort()  # distinct values by sorting: np.unique hashes, ~5x slower on these sizes
    keep = np.empty(n, dtype=bool)
    keep[0] = True
    np.not_equal(combined[1:], combined[:-1], out=keep[1:])
    return combined[keep]


class _HeldOut:
    """The test records' shingle hashes: a bitmap of their low bits, and their high 32 bits
    sorted with the record each belongs to (one uint64 key each, high bits above the record's
    number, sorted in place: ~8 bytes per shingle, the texts themselves not kept)."""

    def __init__(self, test: Iterable[str], word_hashes: _WordHashes) -> None:
        per_text = [shingle_hashes(t, word_hashes) for t in test]
        self.size = len(per_text)
        total = sum(len(h) for h in per_text)
        # A bitmap of the hashes' low bits, 16 or more bits per hash: a lookup is one memory
        # access (a binary search over millions of hashes is ~22), and a hash it wrongly reports
        # shared (~1 in 16) only makes a record a candidate sooner, never hides one.
        bits = max(20, min(32, int(np.ceil(np.log2(max(total, 1) * 16)))))
        self.mask = np.uint64((1 << bits) - 1)
        self.bitmap = np.zeros(1 << (bits - 3), dtype=np.uint8)
        self.keys = np.empty(total, dtype=np.uint64)
        at = 0
        for k, h in enumerate(per_text):
            low = h & self.mask
            bit = np.left_shift(1, low & np.uint64(7)).astype(np.uint8)
            np.bitwise_or.at(self.bitmap, low >> np.uint64(3), bit)
            self.keys[at : at + len(h)] = (h & _HIGH) | np.uint64(k)
            at += len(h)
            per_text[k] = None  # each text's hashes go as soon as they are in the keys
        self.keys.sort()

    def shared_counts(self, per_text: list[np.ndarray]) -> np.ndarray:
        """For each text's distinct shingle hashes, about how many some test record has too (an
        upper bound: see the bitmap), looked up for a whole batch of texts at once."""
        if not per_text:
            return np.zeros(0, dtype=np.int64)
        low = np.concatenate(per_text) & self.mask
        hit = (self.bitmap[low >> np.uint64(3)] >> (low & np.uint64(7)).astype(np.uint8)) & 1
        running = np.concatenate([[0], np.cumsum(hit, dtype=np.int64)])
        sizes = np.array([len(h) for h in per_text], dtype=np.int64)
        ends = np.cumsum(sizes)
        return running[ends] - running[ends - sizes]

    def partners(self, hashes: np.ndarray, need: float) -> np.ndarray:
        """The test records that share at least `need` of `hashes` (counted on the hashes' high
        32 bits: a collision there only over-counts)."""
        high = np.unique(hashes & _HIGH)
        lo = np.searchsorted(self.keys, high, side="left")
        hi = np.searchsorted(self.keys, high | _LOW, side="right")
        found = hi > lo
        spans = [self.keys[a:b] & _LOW for a, b in zip(lo[found], hi[found], strict=True)]
        if not spans:
            return np.empty(0, dtype=np.int64)
        owners, counts = np.unique(np.concatenate(spans), return_counts=True)
        return owners[counts >= need].astype(np.int64)


BATCH = 512  # train texts whose shingles are looked up in the held-out ones at once


def near_duplicates(
    train: Iterable[str],
    test: Iterable[str],
    threshold: float,
    test_text: Callable[[int], str] | None = None,
) -> list[int]:
    """Indices of `train` texts whose estimated Jaccard similarity to some `test` text is at least
    `threshold` (MinHash LSH over word 5-grams; MinHashes only where the shared shingles allow
    the threshold, as the module docstring says). `test` is read once; the few test texts a
    MinHash is needed for come from `test_text(k)` when given (so a large test split need not be
    held), else from `test` itself, which must then be a sequence."""
    from datasketch import MinHashLSH

    if threshold > 1:
        return []
    word_hashes = _WordHashes()
    held_out = _HeldOut(test, word_hashes)
    if not held_out.size:
        return []
    test_text = test_text or test.__getitem__
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    test_minhashes: dict[int, object] = {}
    floor = threshold - SLACK
    found = []
    for first, texts in _batches(train, BATCH):
        per_text = [shingle_hashes(t, word_hashes) for t in texts]
        shared = held_out.shared_counts(per_text)
        for j, hashes in enumerate(per_text):
            if not len(hashes) or not shared[j] or shared[j] < floor * len(hashes):
                continue
            partners = held_out.partners(hashes, floor * len(hashes))
            if not len(partners):
                continue
            for k in partners.tolist():
                if k not in test_minhashes:
                    test_minhashes[k] = minhash(test_text(k))
                    lsh.insert(str(k), test_minhashes[k])
            m = minhash(texts[j])  # LSH finds candidates; their estimated similarity decides
            if any(m.jaccard(test_minhashes[int(k)]) >= threshold for k in lsh.query(m)):
                found.append(first + j)
    return found


def _batches(items: Iterable[str], size: int) -> Iterator[tuple[int, list[str]]]:
    batch: list[str] = []
    first = 0
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield first, batch
            first += size
            batch = []
    if batch:
        yield first, batch
