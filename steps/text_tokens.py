"""Token ids of many documents, a batch at a time, in worker processes that stay small.

`prepare` tokenizes a large text corpus here rather than with `datasets.map(num_proc=N)`, for
memory: map's workers are forks of the stage's process, and each counts the ~0.45 GB that process
holds once it has imported transformers and torch (the RSS of the whole job was 2.2 GB on a
100 MB corpus with two workers, ~4x the stage's own). These workers are started fresh (spawn) and
import only this module, numpy and `tokenizers` (~0.1 GB each); they run the model's own fast
tokenizer, the Rust object transformers wraps (`backend_tokenizer`, serialised and rebuilt), so
the ids are the ones `tokenizer(texts, add_special_tokens=False)` gives (tests/steps/
test_text_tokens.py checks it). Batches are sent a few at a time, so neither the texts nor the ids
of the corpus are ever held whole; results come back in order.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np

IN_FLIGHT_PER_WORKER = 2  # batches queued per worker: enough to keep it busy, few to hold

_worker_tokenizer = None


def _rebuilt(serialised: str):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(serialised)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _start_worker(serialised: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = _rebuilt(serialised)


def _encode(texts: list[str], tokenizer=None) -> tuple[np.ndarray, np.ndarray]:
    tokenizer = tokenizer or _worker_tokenizer
    # encode_batch_fast: the same ids without character offsets (~20% quicker), where it exists
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    return flat_ids([e.ids for e in encode(texts, add_special_tokens=False)])


def flat_ids(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Every document's ids back to back (int32) and each document's length."""
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    if not lengths.sum():
        return np.zeros(0, dtype=np.int32), lengths
    return np.concatenate([np.asarray(x, dtype=np.int32) for x in ids if x]), lengths


def can_run_apart(tokenizer) -> bool:
    """A fast tokenizer (one with a Rust backend) can be rebuilt in a worker."""
    return getattr(tokenizer, "backend_tokenizer", None) is not None


def _spawnable() -> bool:
    """A spawned worker first imports the parent's main module, as multiprocessing does; a main
    read from stdin (`python - < script`) has no file to import, and the worker would die."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return main_file is None or os.path.exists(main_file)


def token_batches(
    batches: Iterable[list[str]], tokenizer, num_proc: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(flat ids, lengths) for each batch of texts, in order: in num_proc fresh worker processes,
    or in this process when num_proc is 1 or the tokenizer is not a fast one."""
    if not can_run_apart(tokenizer):
        for texts in batches:
            encoded = tokenizer(texts, add_special_tokens=False, verbose=False)
            yield flat_ids(encoded["input_ids"])
        return
    serialised = tokenizer.backend_tokenizer.to_str()
    if num_proc <= 1 or not _spawnable():
        rebuilt = _rebuilt(serialised)
        for texts in batches:
            yield _encode(texts, rebuilt)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(
        num_proc,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(serialised,),
    ) as pool:
        pending: deque = deque()
        for texts in batches:
            pending.append(pool.submit(_encode, texts))
            if len(pending) >= num_proc * IN_FLIGHT_PER_WORKER:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
