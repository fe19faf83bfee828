"""steps/prepare.py: reading the corpus, hash split, packing, and the atomic prepared dataset."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from steps.errors import UserError
from steps.params import PrepareParams
from steps.prepare import (
    RECORDS_PER_PROC,
    assign_splits,
    num_procs,
    pack_sequences,
    prepare,
    split_of,
    write_blocks,
)
from steps.prepare import heldout_hash as split_hash
from steps.records import Records

pytestmark = pytest.mark.unit

WORDS = [
    "the",
    "for",
    "statement",
    "iterates",
    "over",
    "a",
    "sequence",
    "while",
    "loop",
    "function",
    "class",
    "import",
    "yield",
    "return",
    "raise",
    "try",
    "except",
    "with",
    "lambda",
    "assignment",
    "expression",
    "name",
    "value",
    "attribute",
]


def synthetic_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"doc {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(5, 25))) for i in range(n)]


def split_documents(docs: list[str], params: PrepareParams, source: Path) -> dict[str, list[str]]:
    """assign_splits() on plain documents, as lists."""
    from datasets import Dataset

    records = Records("text", Dataset.from_dict({"text": docs, "source": ["x"] * len(docs)}))
    splits, _ = assign_splits(records, params, source)
    return {name: list(split["text"]) for name, split in splits.items()}


# split -------------------------------------------------------------------------------------------


def test_split_of_is_deterministic_and_by_content():
    docs = synthetic_docs(300)
    first = {d: split_of(d, 0.1, 0.05) for d in docs}
    shuffled = docs[:]
    random.Random(1).shuffle(shuffled)
    assert {d: split_of(d, 0.1, 0.05) for d in shuffled} == first
    params = PrepareParams(test_fraction=0.1, validation_fraction=0.05)
    a, b = (
        split_documents(docs, params, Path("corpus.jsonl")),
        split_documents(shuffled, params, Path("corpus.jsonl")),
    )
    for name in ("train", "validation", "test"):
        assert sorted(a[name]) == sorted(b[name])
        assert all(first[d] == name for d in a[name])
    # Reference: the first 8 bytes of sha256 as a fraction of 2**64.
    for d in docs[:50]:
        bucket = int(hashlib.sha256(d.encode()).hexdigest()[:16], 16) / 2**64
        expected = "test" if bucket < 0.1 else "validation" if bucket < 0.15 else "train"
        assert first[d] == expected


def test_split_fractions_are_roughly_respected():
    docs = [f"synthetic document number {i}" for i in range(2000)]
    params = PrepareParams(test_fraction=0.1, validation_fraction=0.05)
    splits = split_documents(docs, params, Path("corpus.jsonl"))
    assert sum(len(v) for v in splits.values()) == 2000
    assert 0.07 <= len(splits["test"]) / 2000 <= 0.13
    assert 0.03 <= len(splits["validation"]) / 2000 <= 0.07
    assert splits["train"] == [d for d in docs if split_of(d, 0.1, 0.05) == "train"]


def test_splits_raise_when_test_would_be_empty():
    candidates = synthetic_docs(100)
    docs = [d for d in candidates if split_of(d, 0.1, 0.05) == "train"][:5]
    assert len(docs) == 5
    params = PrepareParams(test_fraction=0.1, validation_fraction=0.05)
    match = r"corpus\.jsonl: the test split is empty \(5 distinct records\)"
    with pytest.raises(UserError, match=match):
        split_documents(docs, params, Path("corpus.jsonl"))


def test_splits_raise_when_train_would_be_empty():
    candidates = synthetic_docs(200)
    docs = [d for d in candidates if split_of(d, 0.1, 0.05) == "test"][:3]
    assert len(docs) == 3
    with pytest.raises(UserError, match="the train split is empty"):
        params = PrepareParams(test_fraction=0.1, validation_fraction=0.05)
        split_documents(docs, params, Path("corpus.jsonl"))


# packing and hashing -----------------------------------------------------------------------------


def test_pack_sequences_hand_example():
    docs = [[1, 2, 3], [4, 5], [6]]
    assert pack_sequences(docs, eos_id=0, block_size=4) == [[1, 2, 3, 0], [4, 5, 0, 6]]
    assert pack_sequences(docs, eos_id=9, block_size=3) == [[1, 2, 3], [9, 4, 5], [9, 6, 9]]
    assert pack_sequences(docs, eos_id=0, block_size=10) == []
    assert pack_sequences([], eos_id=0, block_size=2) == []
    blocks = pack_sequences([list(range(10, 10 + k)) for k in range(1, 12)], 0, 7)
    assert all(len(b) == 7 for b in blocks)
    assert len(blocks) == (sum(range(1, 12)) + 11) // 7


def test_blocks_are_packed_and_written_a_batch_at_a_time(tmp_path):
    from datasets import load_from_disk

    from steps.text_tokens import flat_ids

    rng = random.Random(3)
    docs = [[rng.randrange(1, 500) for _ in range(rng.randint(0, 40))] for _ in range(300)]
    batches = (flat_ids(docs[i : i + 7]) for i in range(0, len(docs), 7))
    (tmp_path / "scratch").mkdir()
    lengths, blocks = write_blocks(batches, 0, 16, tmp_path / "out", tmp_path / "scratch")
    assert lengths.tolist() == [len(d) + 1 for d in docs]
    written = load_from_disk(str(tmp_path / "out"))
    assert blocks == len(written) == sum(len(d) + 1 for d in docs) // 16
    assert written["input_ids"] == pack_sequences(docs, 0, 16)
    assert written.features["input_ids"].feature.dtype == "int32"  # half of int64 on disk
    _, none = write_blocks(iter(()), 0, 16, tmp_path / "empty", tmp_path / "scratch")
    assert none == len(load_from_disk(str(tmp_path / "empty"))) == 0


def test_auto_processes_start_only_for_enough_records(monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert num_procs("auto", 100) == 1
    assert num_procs("auto", 2 * RECORDS_PER_PROC) == 2
    assert num_procs("auto", 100 * RECORDS_PER_PROC) == 4
    assert num_procs(3, 100) == 3 and num_procs(8, 5) == 5


def test_test_split_hash_reference_sensitivity_and_order():
    texts = ["alpha", "beta", "gamma"]
    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha256(t.encode()).digest())
    assert split_hash(texts) == h.hexdigest()
    assert split_hash(list(texts)) == split_hash(texts)  # stable
    assert split_hash(["alpha", "beta", "gamma!"]) != split_hash(texts)
    assert split_hash(["gamma", "beta", "alpha"]) != split_hash(texts)  # order-sensitive
    assert split_hash(["alphabeta"]) != split_hash(["alpha", "beta"])
    assert split_hash([]) == hashlib.sha256().hexdigest()


# prepare end to end ------------------------------------------------------------------------------


@pytest.fixture
def corpus(tmp_path):
    docs = synthetic_docs(60)
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path, docs


@pytest.mark.parametrize("num_proc", ["auto", 2])
def test_prepare_writes_splits_blocks_and_stats(tmp_path, corpus, tiny_model, num_proc):
    from datasets import load_from_disk

    _, tokenizer = tiny_model
    path, docs = corpus
    params = PrepareParams(
        block_size=16, test_fraction=0.2, validation_fraction=0.1, num_proc=num_proc
    )
    out = tmp_path / "prepared"
    stats = prepare(params, path, tokenizer, out)
    assert sorted(p.name for p in out.iterdir()) == ["stats.json", "test", "train", "validation"]
    assert json.loads((out / "stats.json").read_text()) == stats
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prepared")]

    splits = ("train", "validation", "test")
    expected = {name: [d for d in docs if split_of(d, 0.2, 0.1) == name] for name in splits}
    eos = tokenizer.eos_token_id
    for name in ("train", "validation"):
        ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in expected[name]]
        tokens = sum(len(x) + 1 for x in ids)
        card = stats["splits"][name]
        assert card["records"] == len(expected[name])
        assert card["tokens"] == card["supervised_tokens"] == tokens
        assert card["blocks"] == tokens // 16
        assert sum(card["length_histogram"].values()) == len(expected[name])
        blocks = load_from_disk(str(out / name))["input_ids"]
        assert len(blocks) == tokens // 16
        assert all(len(b) == 16 for b in blocks)
        assert blocks == pack_sequences(ids, eos, 16)
    assert stats["splits"]["train"]["blocks"] > 0

    test = load_from_disk(str(out / "test"))["text"]
    assert test == expected["test"]
    assert len(test) > 0
    assert stats["splits"]["test"] == {
        "records": len(test),
        "characters": sum(len(t) for t in test),
    }
    assert stats["test_split_hash"] == split_hash(expected["test"])
    assert stats["block_size"] == 16
    assert stats["data"] == str(path)
    assert stats["format"] == "text" and stats["records_in"] == len(docs)
    assert stats["exact_duplicates_removed"] == stats["near_duplicates_removed_from_train"] == 0


def test_prepare_with_no_validation_split(tmp_path, corpus, tiny_model):
    path, _ = corpus
    params = PrepareParams(block_size=16, test_fraction=0.2, validation_fraction=0)
    stats = prepare(params, path, tiny_model[1], tmp_path / "prepared")
    assert stats["splits"]["validation"]["records"] == 0
    assert stats["splits"]["validation"]["blocks"] == 0
    assert (tmp_path / "prepared" / "validation" / "state.json").is_file()


def test_empty_validation_split_can_be_loaded(tmp_path, corpus, tiny_model):
    from datasets import load_from_disk

    path, _ = corpus
    params = PrepareParams(block_size=16, test_fraction=0.2, validation_fraction=0)
    prepare(params, path, tiny_model[1], tmp_path / "prepared")
    assert len(load_from_disk(str(tmp_path / "prepared" / "validation"))) == 0


def test_failing_prepare_leaves_no_output(tmp_path, corpus, tiny_model):
    path, _ = corpus
    params = PrepareParams(block_size=65536, test_fraction=0.2)
    out = tmp_path / "prepared"
    with pytest.raises(UserError, match="fewer tokens than one block"):
        prepare(params, path, tiny_model[1], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl"]


def test_failing_prepare_keeps_previous_output(tmp_path, corpus, tiny_model):
    path, _ = corpus
    out = tmp_path / "prepared"
    good = PrepareParams(block_size=16, test_fraction=0.2)
    prepare(good, path, tiny_model[1], out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UserError):
        prepare(good.model_copy(update={"block_size": 65536}), path, tiny_model[1], out)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "prepared"]


# chat records ------------------------------------------------------------------------------------


def chat_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        question = f"question {i}: what does " + " ".join(rng.choices(WORDS, k=6)) + " do?"
        answer = f"answer {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(4, 12)))
        records.append({"prompt": question, "completion": answer})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_chat_prepare_counts_duplicates_near_duplicates_and_supervised_tokens(
    tmp_path, tiny_chat_model_dir
):
    """Exact duplicates go, a training record that nearly repeats a test record goes, and the
    card's supervised tokens are exactly the assistant tokens of what was kept."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from steps.chat import IGNORE, render, supervised

    tok = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    records = chat_records(80)
    params = PrepareParams(block_size=128, test_fraction=0.2, validation_fraction=0.1)

    def where(r):
        messages = [
            {"role": "user", "content": r["prompt"]},
            {"role": "assistant", "content": r["completion"]},
        ]
        return split_of(json.dumps(messages, sort_keys=True), 0.2, 0.1)

    test_record = next(r for r in records if where(r) == "test")
    # a near copy of a test record (one word changed) that hashes into train
    near = next(
        c
        for k in range(200)
        if where(
            c := {
                "prompt": test_record["prompt"],
                "completion": test_record["completion"] + f" {k}",
            }
        )
        == "train"
    )
    data = write_jsonl(tmp_path / "chat.jsonl", [*records, records[3], records[5], near])
    card = prepare(params, data, tok, tmp_path / "prepared")
    assert card["format"] == "chat" and card["records_in"] == 83
    assert card["exact_duplicates_removed"] == 2
    assert card["near_duplicates_removed_from_train"] == 1
    kept = [r for r in records if where(r) == "train"]
    train = card["splits"]["train"]
    assert train["records"] == len(kept) and train["truncated"] == train["dropped"] == 0
    as_chat = [
        [
            {"role": "user", "content": r["prompt"]},
            {"role": "assistant", "content": r["completion"]},
        ]
        for r in kept
    ]
    expected = sum(supervised(render(m, tok)[1]) for m in as_chat)
    assert train["supervised_tokens"] == expected
    blocks = load_from_disk(str(tmp_path / "prepared" / "train"))
    assert sum(1 for b in blocks["labels"] for t in b if t != IGNORE) == expected
    assert all(len(b) == 128 for b in blocks["input_ids"])
    test = load_from_disk(str(tmp_path / "prepared" / "test"))
    assert len(test) == card["splits"]["test"]["records"] > 0
    assert test[0]["messages"][1]["role"] == "assistant"


def test_a_chat_record_whose_answer_is_truncated_away_names_its_line(tmp_path, tiny_chat_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    records = chat_records(60)
    long_prompt = {"prompt": "why " * 200, "completion": "because"}
    lines = [*records[:10], long_prompt, *records[10:]]
    data = write_jsonl(tmp_path / "chat.jsonl", lines)
    out = tmp_path / "prepared"
    params = PrepareParams(block_size=128, test_fraction=0.2, near_duplicate_threshold=1.01)
    split = split_of(
        json.dumps(
            [
                {"role": "user", "content": long_prompt["prompt"]},
                {"role": "assistant", "content": "because"},
            ],
            sort_keys=True,
        ),
        0.2,
        0.05,
    )
    if split == "test":  # the held-out split is scored, not trained: make it land in train
        pytest.skip("the long record hashes into test")
    with pytest.raises(UserError) as err:
        prepare(params, data, tok, out)
    assert str(err.value) == (
        f"{data}:11: the assistant's turns lie beyond prepare.block_size (128 tokens) and are "
        "truncated away; raise block_size or set prepare.overlong: drop"
    )
    assert not out.exists()
    card = prepare(params.model_copy(update={"overlong": "drop"}), data, tok, out)
    assert card["splits"][split]["dropped"] == 1


def test_every_chat_record_dropped_is_an_error(tmp_path, tiny_chat_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(40))
    params = PrepareParams(block_size=8, overlong="drop", test_fraction=0.2)
    with pytest.raises(UserError, match=r"every training record was filtered out \(\d+ longer"):
        prepare(params, data, tok, tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


def test_chat_data_for_a_model_without_a_chat_template(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(20))
    with pytest.raises(UserError) as err:
        prepare(PrepareParams(block_size=64), data, tiny_model[1], tmp_path / "prepared")
    assert str(err.value) == (
        f"{data}: the base model has no chat template, so chat records cannot be rendered; "
        "use an instruct/chat model (base_model.source) or set prepare.format: text"
    )
    assert not (tmp_path / "prepared").exists()


def test_records_of_one_file_are_read_from_it_and_rows_are_picked(tmp_path, corpus, monkeypatch):
    import datasets
    import numpy as np

    from steps.prepare import column_batches
    from steps.records import read_records

    path, docs = corpus
    monkeypatch.setenv("LLMPIPE_CACHE", str(tmp_path / "cache"))
    ds = read_records(path, PrepareParams()).dataset
    assert len(ds.cache_files) == 1
    with monkeypatch.context() as m:  # not through the memory map (datasets' iter)
        m.setattr(datasets.Dataset, "iter", lambda *a, **k: pytest.fail("read through the map"))
        assert [t for b in column_batches(ds, "text", batch_size=7) for t in b] == docs
        rows = np.array([0, 5, 6, 59])
        picked = [t for b in column_batches(ds, "text", rows) for t in b]
        assert picked == [docs[i] for i in rows]
    ds.save_to_disk(str(tmp_path / "shards"), num_shards=3)  # as datasets writes 1 GB
    sharded = datasets.load_from_disk(str(tmp_path / "shards"))
    assert len(sharded.cache_files) == 3
    with monkeypatch.context() as m:
        m.setattr(datasets.Dataset, "iter", lambda *a, **k: pytest.fail("read through the map"))
        assert [t for b in column_batches(sharded, "text", rows) for t in b] == picked
    selected = ds.select([3, 1])  # a selection is read through datasets
    assert [t for b in column_batches(selected, "text") for t in b] == [docs[3], docs[1]]
