"""steps/corpus.py: the embedded reference-manual corpus and its JSONL export."""

from __future__ import annotations

import json

import pytest

from steps.corpus import reference_manual_documents, write_jsonl
from steps.records import read_texts

pytestmark = pytest.mark.unit


def test_reference_manual_documents():
    from pydoc_data.topics import topics

    docs = reference_manual_documents()
    assert len(docs) == 79
    ids = [d["id"] for d in docs]
    assert ids == sorted(ids)
    assert len(set(ids)) == 79
    assert all(set(d) == {"id", "text"} for d in docs)
    assert all(d["text"].strip() for d in docs)
    assert {d["id"]: d["text"] for d in docs} == topics


def test_write_jsonl_round_trips(tmp_path):
    docs = [
        {"id": "a", "text": "  first\nline  "},
        {"id": "b", "text": 'quote " and naïve café'},
        {"id": "c", "text": "tab\tend\n"},
    ]
    path = tmp_path / "raw" / "c.jsonl"
    write_jsonl(docs, path)
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""
    assert [json.loads(line) for line in lines[:-1]] == docs
    assert "naïve" in path.read_text(encoding="utf-8")  # written unescaped
    assert read_texts(path) == [d["text"].strip() for d in docs]
    assert sorted(p.name for p in path.parent.iterdir()) == ["c.jsonl"]


def test_reference_manual_round_trips_through_prepare(tmp_path):
    docs = reference_manual_documents()
    path = tmp_path / "pydoc_topics.jsonl"
    write_jsonl(docs, path)
    assert read_texts(path) == [d["text"].strip() for d in docs]
    first = path.read_bytes()
    write_jsonl(reference_manual_documents(), path)
    assert path.read_bytes() == first  # byte-for-byte stable export
