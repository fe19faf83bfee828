"""steps/dedup.py: near duplicates of held-out records, found as a full MinHash LSH finds them."""

from __future__ import annotations

import random

import pytest

from steps.dedup import NUM_PERM, _WordHashes, minhash, near_duplicates, shingle_hashes, shingles

pytestmark = pytest.mark.unit


def minhash_everything(train: list[str], test: list[str], threshold: float) -> list[int]:
    """The reference: a MinHash of every record, every test record in the LSH index."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    held_out = [minhash(t) for t in test]
    for i, m in enumerate(held_out):
        lsh.insert(str(i), m)
    found = []
    for i, text in enumerate(train):
        if not shingles(text):
            continue
        m = minhash(text)
        if any(m.jaccard(held_out[int(k)]) >= threshold for k in lsh.query(m)):
            found.append(i)
    return found


def corpus(seed: int = 0) -> tuple[list[str], list[str], list[float]]:
    """Random-word test records; train records that are fresh text, or a test record with a share
    of its words replaced (the planted similarity is roughly 1 - 2x that share), or very short."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(3000)]

    def text(n: int) -> list[str]:
        return [rng.choice(vocab) for _ in range(n)]

    test = [" ".join(text(rng.randint(20, 300))) for _ in range(150)]
    train, replaced = [], []
    for _ in range(450):
        kind = rng.random()
        if kind < 0.45:
            train.append(" ".join(text(rng.randint(20, 300))))
            replaced.append(1.0)
        elif kind < 0.95:
            words = rng.choice(test).split()
            share = rng.choice([0.0, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2, 0.4])
            for j in rng.sample(range(len(words)), int(share * len(words))):
                words[j] = rng.choice(vocab)
            train.append(" ".join(words).upper() if rng.random() < 0.2 else " ".join(words))
            replaced.append(share)
        else:
            train.append(" ".join(text(rng.randint(0, 4))) + " !")
            replaced.append(1.0)
    test.append("w1 w2 w3")  # a record shorter than a shingle
    train.append("W1, w2; w3.")  # its words again: the same single shingle
    replaced.append(0.0)
    return train, test, replaced


@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.95])
def test_finds_what_minhashing_every_record_finds(threshold):
    train, test, replaced = corpus()
    found = near_duplicates(train, test, threshold)
    assert found == minhash_everything(train, test, threshold)
    planted = {i for i, share in enumerate(replaced) if share == 0.0}
    assert planted <= set(found)  # exact copies (any case, any punctuation) always go
    fresh = {i for i, share in enumerate(replaced) if share >= 0.4}
    assert not fresh & set(found)
    assert len(found) > len(planted)  # and near copies, not only exact ones


def test_a_threshold_above_one_or_no_test_records_finds_nothing():
    train, test, _ = corpus(1)
    assert near_duplicates(train, test, 1.01) == []
    assert near_duplicates(train, [], 0.8) == []


def test_shingle_hashes_count_the_distinct_shingles_the_same_in_every_process():
    hashes = _WordHashes()
    text = "The cat sat on the mat. The cat sat on the mat!"
    assert len(shingle_hashes(text, hashes)) == len(shingles(text)) == 6
    assert list(shingle_hashes(text.upper(), _WordHashes())) == list(shingle_hashes(text, hashes))
    assert len(shingle_hashes("a b", hashes)) == 1
    assert len(shingle_hashes("... !", hashes)) == 0
    # blake2b per word, not Python's salted hash(): another interpreter gets the same values
    import subprocess
    import sys

    code = (
        "from steps.dedup import _WordHashes, shingle_hashes as s; "
        "print(list(s('a b c d e f', _WordHashes())))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(list(shingle_hashes("a b c d e f", hashes)))
