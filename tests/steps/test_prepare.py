"""steps/prepare.py: reading the corpus, hash split, packing, and the atomic prepared dataset."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from steps.errors import UserError
from steps.params import PrepareParams
from steps.prepare import heldout_hash as split_hash
from steps.prepare import pack_sequences, prepare, read_documents, split_documents, split_of

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


def write(path, content: str | bytes):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


# read_documents ---------------------------------------------------------------------------------


def test_jsonl_skips_blank_lines_and_strips(tmp_path):
    path = write(
        tmp_path / "c.jsonl",
        '{"text": "first doc"}\n\n   \n{"text": "  second\\ndoc  ", "id": 2}\n{"text": "third"}\n',
    )
    assert read_documents(path) == ["first doc", "second\ndoc", "third"]


def test_jsonl_custom_text_field_and_blank_documents_dropped(tmp_path):
    path = write(tmp_path / "c.jsonl", '{"body": "a"}\n{"body": "   "}\n{"body": "b"}\n')
    assert read_documents(path, text_field="body") == ["a", "b"]


def test_txt_documents_are_blank_line_separated(tmp_path):
    path = write(
        tmp_path / "c.txt",
        "line one\nline two\n\nsecond doc\n \t \nthird doc\n\n\n\nfourth\n",
    )
    assert read_documents(path) == ["line one\nline two", "second doc", "third doc", "fourth"]


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"nope\.jsonl: data file not found.*prepare\.data"):
        read_documents(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("content", ["", "   \n\n\t\n"])
@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_empty_or_blank_corpus(tmp_path, content, suffix):
    path = write(tmp_path / f"c{suffix}", content)
    with pytest.raises(UserError, match="the corpus is empty"):
        read_documents(path)


def test_bad_json_names_the_line(tmp_path):
    path = write(tmp_path / "c.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    with pytest.raises(UserError) as info:
        read_documents(path)
    assert f"{path}:3:" in str(info.value)
    assert "not valid JSON" in str(info.value)


@pytest.mark.parametrize("line2", ['{"body": "x"}', '{"text": 5}', '["text"]', '"text"'])
def test_missing_text_field_names_line_and_param(tmp_path, line2):
    path = write(tmp_path / "c.jsonl", '{"text": "a"}\n' + line2 + "\n")
    with pytest.raises(UserError) as info:
        read_documents(path)
    msg = str(info.value)
    assert f"{path}:2:" in msg
    assert "'text'" in msg
    assert "prepare.text_field" in msg


def test_non_utf8_names_the_line(tmp_path):
    path = write(tmp_path / "c.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError) as info:
        read_documents(path)
    assert f"{path}:3:" in str(info.value)
    assert "UTF-8" in str(info.value)


def test_unsupported_suffix(tmp_path):
    path = write(tmp_path / "c.csv", "text\nhello\n")
    with pytest.raises(UserError, match=r"unsupported file type '\.csv'"):
        read_documents(path)


def test_jsonl_text_with_unicode_line_separator(tmp_path):
    docs = ["one\u2028two", "three\u2029four", "five\x85six"]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    assert read_documents(path) == docs


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


def test_split_documents_raises_when_test_would_be_empty():
    candidates = synthetic_docs(100)
    docs = [d for d in candidates if split_of(d, 0.1, 0.05) == "train"][:5]
    assert len(docs) == 5
    params = PrepareParams(test_fraction=0.1, validation_fraction=0.05)
    with pytest.raises(UserError, match=r"corpus\.jsonl: the test split is empty \(5 documents\)"):
        split_documents(docs, params, Path("corpus.jsonl"))


def test_split_documents_raises_when_train_would_be_empty():
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


def test_prepare_writes_splits_blocks_and_stats(tmp_path, corpus, tiny_model):
    from datasets import load_from_disk

    _, tokenizer = tiny_model
    path, docs = corpus
    params = PrepareParams(block_size=16, test_fraction=0.2, validation_fraction=0.1)
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
        assert stats[name]["documents"] == len(expected[name])
        assert stats[name]["tokens"] == tokens
        assert stats[name]["blocks"] == tokens // 16
        blocks = load_from_disk(str(out / name))["input_ids"]
        assert len(blocks) == tokens // 16
        assert all(len(b) == 16 for b in blocks)
        assert blocks == pack_sequences(ids, eos, 16)
    assert stats["train"]["blocks"] > 0

    test = load_from_disk(str(out / "test"))["text"]
    assert test == expected["test"]
    assert len(test) > 0
    assert stats["test"] == {"documents": len(test), "characters": sum(len(t) for t in test)}
    assert stats["test_split_hash"] == split_hash(expected["test"])
    assert stats["block_size"] == 16
    assert stats["data"] == str(path)


def test_prepare_with_no_validation_split(tmp_path, corpus, tiny_model):
    path, _ = corpus
    params = PrepareParams(block_size=16, test_fraction=0.2, validation_fraction=0)
    stats = prepare(params, path, tiny_model[1], tmp_path / "prepared")
    assert stats["validation"] == {"documents": 0, "tokens": 0, "blocks": 0}
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
