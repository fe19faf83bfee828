"""Read the corpus, split it by document hash, tokenize and pack into fixed-length blocks.

    python -m steps.prepare --params params.yaml --data data/raw/pydoc_topics.jsonl \
        --base-model models/base --out data/prepared                 # the DVC stage `prepare`

Input (`--data`, which dvc.yaml fills in from `prepare.data`): a `.jsonl` file with one JSON object
per line holding the text under `prepare.text_field`, or a `.txt` file whose documents are separated
by blank lines.
Output: `train` and `validation` datasets of `input_ids` blocks of `prepare.block_size` tokens, with
an EOS token after every document; a `test` dataset of whole held-out documents (`text`), scored by
steps.evaluate with a sliding window; `stats.json` with counts and the test split's hash.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from steps.arguments import stage_arguments
from steps.errors import UserError
from steps.outcome import run_main
from steps.outputs import atomic_dir, write_json
from steps.params import PrepareParams, load_params

SPLITS = ("train", "validation", "test")


def read_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """Documents of a .jsonl or .txt file; blank ones are dropped. Errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: data file not found; set prepare.data to a .jsonl or .txt file")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text; convert the file to UTF-8") from None
    if path.suffix == ".jsonl":
        docs = _jsonl_documents(path, content, text_field)
    elif path.suffix == ".txt":
        docs = re.split(r"\n[ \t]*\n", content)
    else:
        raise UserError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl or .txt")
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise UserError(f"{path}: the corpus is empty; it holds no non-blank document")
    return docs


def _jsonl_documents(path: Path, content: str, text_field: str) -> list[str]:
    docs = []
    # split on \n only: str.splitlines() also breaks at U+2028/U+0085, legal inside JSON strings
    for lineno, line in enumerate(content.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            raise UserError(
                f"{path}:{lineno}: expected an object with a string {text_field!r} "
                "(set prepare.text_field to the key that holds the text)"
            )
        docs.append(obj[text_field])
    return docs


def split_of(text: str, test_fraction: float, validation_fraction: float) -> str:
    """Deterministic split by content hash: a document lands in the same split on every machine."""
    bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64
    if bucket < test_fraction:
        return "test"
    if bucket < test_fraction + validation_fraction:
        return "validation"
    return "train"


def split_documents(docs: list[str], params: PrepareParams, source: Path) -> dict[str, list[str]]:
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    for doc in docs:
        splits[split_of(doc, params.test_fraction, params.validation_fraction)].append(doc)
    for name in ("train", "test"):
        if not splits[name]:
            raise UserError(
                f"{source}: the {name} split is empty ({len(docs)} documents); add documents "
                f"or change prepare.test_fraction ({params.test_fraction})"
            )
    return splits


def check_block_size(block_size: int, config_file: Path) -> None:
    """A block longer than the model's maximum positions cannot be trained on: say so up front."""
    limit = json.loads(config_file.read_text()).get("max_position_embeddings")
    if limit is not None and block_size > limit:
        raise UserError(
            f"prepare.block_size ({block_size}) exceeds the base model's maximum positions "
            f"({limit}, {config_file}); lower prepare.block_size"
        )


def pack_sequences(docs_ids: list[list[int]], eos_id: int, block_size: int) -> list[list[int]]:
    """Concatenate documents with EOS after each and cut into full blocks; the tail is dropped."""
    stream = [tok for ids in docs_ids for tok in [*ids, eos_id]]
    usable = len(stream) - len(stream) % block_size
    return [stream[i : i + block_size] for i in range(0, usable, block_size)]


def heldout_hash(texts: list[str]) -> str:
    """sha256 over the held-out documents, so metrics from different runs can be compared safely."""
    h = hashlib.sha256()
    for text in texts:
        h.update(hashlib.sha256(text.encode("utf-8")).digest())
    return h.hexdigest()


def prepare(params: PrepareParams, data: Path, tokenizer, out_dir: Path) -> dict:
    """Split the documents of `data`, tokenize and pack them; write the splits to `out_dir`."""
    from datasets import Dataset

    splits = split_documents(read_documents(data, params.text_field), params, data)
    stats: dict = {"data": str(data), "block_size": params.block_size}
    with atomic_dir(out_dir) as tmp:
        for name in ("train", "validation"):
            ids = (
                tokenizer(splits[name], add_special_tokens=False, verbose=False)["input_ids"]
                if splits[name]
                else []
            )
            blocks = pack_sequences(ids, tokenizer.eos_token_id, params.block_size)
            if name == "train" and not blocks:
                raise UserError(
                    f"{data}: the train split has fewer tokens than one block "
                    f"(prepare.block_size={params.block_size}); add text or lower block_size"
                )
            # num_shards=1: an empty split saved with 0 shards cannot be loaded back
            Dataset.from_dict({"input_ids": blocks}).save_to_disk(str(tmp / name), num_shards=1)
            stats[name] = {
                "documents": len(splits[name]),
                "tokens": sum(len(x) + 1 for x in ids),
                "blocks": len(blocks),
            }
        test = splits["test"]
        Dataset.from_dict({"text": test}).save_to_disk(str(tmp / "test"), num_shards=1)
        stats["test"] = {"documents": len(test), "characters": sum(len(t) for t in test)}
        stats["test_split_hash"] = heldout_hash(test)
        write_json(tmp / "stats.json", stats)
    return stats


def run(params: PrepareParams, data: Path, base_model: Path, out: Path) -> dict:
    from transformers import AutoTokenizer

    check_block_size(params.block_size, base_model / "config.json")
    stats = prepare(params, data, AutoTokenizer.from_pretrained(base_model), out)
    print(
        f"prepare: {data}: train {stats['train']['documents']} docs / "
        f"{stats['train']['blocks']} blocks of {params.block_size}, validation "
        f"{stats['validation']['documents']} docs, test {stats['test']['documents']} docs -> {out}"
    )
    return stats


def main() -> dict:
    args = stage_arguments()
    return run(load_params(args.params).prepare, args.data, args.base_model, args.out)


if __name__ == "__main__":
    run_main(main)
