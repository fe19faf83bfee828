"""Export the embedded corpus, CPython's reference manual, to JSONL.

    python -m steps.corpus            # writes data/raw/pydoc_topics.jsonl (the DVC stage `corpus`)

`pydoc_data.topics` ships with every CPython: 79 topics of the language reference (~113k SmolLM2 tokens),
so the default pipeline needs no download. A user's own file replaces it via `prepare.data`.
"""

from __future__ import annotations

import json
from pathlib import Path

from steps.errors import run_main
from steps.paths import EMBEDDED_CORPUS


def reference_manual_documents() -> list[dict[str, str]]:
    """One document per pydoc topic, sorted by topic so the export is byte-for-byte stable."""
    from pydoc_data.topics import topics

    return [{"id": name, "text": text} for name, text in sorted(topics.items())]


def write_jsonl(docs: list[dict[str, str]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    tmp.replace(path)


def main() -> None:
    docs = reference_manual_documents()
    write_jsonl(docs, EMBEDDED_CORPUS)
    print(f"corpus: {len(docs)} documents -> {EMBEDDED_CORPUS}")


if __name__ == "__main__":
    run_main(main)
