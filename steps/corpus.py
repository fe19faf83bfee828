"""Export the embedded corpus, CPython's reference manual, to JSONL.

    python -m steps.corpus --out data/raw/pydoc_topics.jsonl      # the DVC stage `corpus`

`pydoc_data.topics` ships with every CPython: 79 topics of the language reference (~113k SmolLM2
tokens), so the default pipeline needs no download.
A user's own file replaces it via `prepare.data`.
"""

from __future__ import annotations

import json
from pathlib import Path

from steps.arguments import stage_arguments
from steps.outcome import run_step
from steps.outputs import write_text


def reference_manual_documents() -> list[dict[str, str]]:
    """One document per pydoc topic, sorted by topic so the export is byte-for-byte stable."""
    from pydoc_data.topics import topics

    return [{"id": name, "text": text} for name, text in sorted(topics.items())]


def write_jsonl(docs: list[dict[str, str]], path: Path) -> None:
    write_text(path, "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs))


def run(out: Path) -> dict:
    docs = reference_manual_documents()
    write_jsonl(docs, out)
    print(f"corpus: {len(docs)} documents -> {out}")
    return {"documents": len(docs)}


def main() -> dict:
    return run(stage_arguments().out)


if __name__ == "__main__":
    run_step(main)
