"""Read the data, split it by record hash, drop duplicates, tokenize and pack into blocks.

    python -m steps.prepare --params params.yaml --data data/raw/pydoc_topics.jsonl \
        --base-model models/base --out data/prepared --card metrics/data.json   # DVC stage

Input (`--data`, which dvc.yaml fills in from `prepare.data`): text documents or chat records in
any format steps/records.py reads (.jsonl, .txt, .csv, .parquet, a directory, a saved dataset).
Each record lands in train, validation or test by the hash of its content, so the split is the
same on every machine; exact duplicates are dropped, and training records that nearly repeat a
test record (MinHash, steps/dedup.py) are removed from train.
Output, text: `train` and `validation` datasets of `input_ids` blocks of `prepare.block_size`
tokens, documents back to back with an EOS token after each; `test` holds whole held-out documents
(`text`), scored by steps.evaluate with a sliding window.
Output, chat: conversations rendered with the base model's chat template, labelled on assistant
tokens only and packed into blocks (`input_ids`, `labels`, `position_ids`) in which no
conversation attends to another (steps/chat.py); `test` holds the held-out conversations
(`messages`), scored on their responses.
Both: `stats.json` = the data card, also written to `--card` (a DVC metric): per split the records
kept, truncated and dropped, tokens and supervised tokens, blocks and a length histogram.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from steps.arguments import stage_arguments
from steps.chat import blocks, check_chat_template, fit, render, supervised
from steps.dedup import near_duplicates
from steps.errors import UserError
from steps.outcome import run_step
from steps.outputs import atomic_dir, write_json
from steps.params import PrepareParams, load_params
from steps.records import Records, read_records
from steps.text_tokens import token_batches
from steps.tracking import log_to_flow_run

SPLITS = ("train", "validation", "test")
RECORDS_PER_PROC = 5000  # prepare.num_proc auto: fewer records a process are tokenized in one
TEXTS_PER_BATCH = 1000  # documents read, tokenized and packed at a time


def split_of(text: str, test_fraction: float, validation_fraction: float) -> str:
    """Deterministic split by content hash: a document lands in the same split on every machine."""
    bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64
    if bucket < test_fraction:
        return "test"
    if bucket < test_fraction + validation_fraction:
        return "validation"
    return "train"


def check_block_size(block_size: int, config_file: Path) -> None:
    """A block longer than the model's maximum positions cannot be trained on: say so up front."""
    limit = json.loads(config_file.read_text()).get("max_position_embeddings")
    if limit is not None and block_size > limit:
        raise UserError(
            f"prepare.block_size ({block_size}) exceeds the base model's maximum positions "
            f"({limit}, {config_file}); lower prepare.block_size"
        )


def stream_blocks(
    docs_ids: Iterable[list[int]], eos_id: int, block_size: int
) -> Iterator[list[int]]:
    """Documents back to back with EOS after each, cut into full blocks; the tail is dropped."""
    buffer: list[int] = []
    for ids in docs_ids:
        buffer += ids
        buffer.append(eos_id)
        while len(buffer) >= block_size:
            yield buffer[:block_size]
            del buffer[:block_size]


def pack_sequences(docs_ids: list[list[int]], eos_id: int, block_size: int) -> list[list[int]]:
    """Concatenate documents with EOS after each and cut into full blocks; the tail is dropped."""
    return list(stream_blocks(docs_ids, eos_id, block_size))


def heldout_hash(texts: Iterable[str], prefix: str = "") -> str:
    """sha256 over the held-out records, so metrics from different runs can be compared safely
    (chat records carry a prefix: the same words scored as responses are another measurement)."""
    h = hashlib.sha256(prefix.encode())
    for text in texts:
        h.update(hashlib.sha256(text.encode("utf-8")).digest())
    return h.hexdigest()


def prepare(params: PrepareParams, data: Path, tokenizer, out_dir: Path) -> dict:
    """Split the records of `data`, tokenize and pack them; write the splits to `out_dir`.

    Raw text keeps today's packing (documents back to back with EOS, cut into blocks); chat records
    are rendered with the model's template, labelled on assistant tokens only and packed so that
    conversations never attend to each other (steps/chat.py). Returns the data card.
    """
    records = read_records(data, params)
    if records.kind == "chat":
        check_chat_template(tokenizer, str(data))
    splits, card, rows = deduplicated_splits(records, params, data)
    with atomic_dir(out_dir) as tmp:
        if records.kind == "chat":
            card["splits"] = write_chat_splits(splits, params, tokenizer, tmp, data)
        else:
            card["splits"] = write_text_splits(records.dataset, rows, params, tokenizer, tmp, data)
        write_json(tmp / "stats.json", card)
    return card


def record_key(kind: str):
    """What makes two records the same: the text, or the conversation's turns."""
    if kind == "text":
        return lambda row: row["text"]
    return lambda row: json.dumps(row["messages"], ensure_ascii=False, sort_keys=True)


def record_text(kind: str, row: dict) -> str:
    """The words of a record, for near-duplicate detection."""
    if kind == "text":
        return row["text"]
    return "\n".join(turn["content"] for turn in row["messages"])


def column_batches(ds, column: str, rows: np.ndarray | None = None, batch_size: int = 1000):
    """The values of `column` a batch at a time, of the rows `rows` (ascending) or of all.

    A dataset that is its Arrow files, as the records read from a .jsonl or .txt file are, is
    read from those files rather than through their memory map: a mapped page read stays in this
    process's resident memory (and in every worker forked from it) until the map is closed, so
    reading a 1 GB corpus that way costs 1 GB of RSS; read, it passes through the page cache."""
    import pyarrow as pa

    wanted = None
    if rows is not None:
        wanted = np.zeros(len(ds), dtype=bool)
        wanted[rows] = True
    files = [f["filename"] for f in ds.cache_files]
    if not files or ds.data.num_rows != len(ds):  # in memory, or a selection of rows
        batches = (b[column] for b in ds.select_columns([column]).iter(batch_size=batch_size))
    else:  # the files in order (datasets writes a large corpus as several)
        batches = _file_batches(pa, files, column, len(ds))
    start = 0
    for values in batches:
        end = start + len(values)
        if wanted is None:
            yield values
        elif wanted[start:end].any():
            keep = np.flatnonzero(wanted[start:end])
            yield [values[i] for i in keep] if len(keep) < len(values) else values
        start = end


def _file_batches(pa, paths: list[str], column: str, rows: int) -> Iterator[list]:
    seen = 0
    for path in paths:
        with pa.OSFile(path) as source:
            for batch in pa.ipc.open_stream(source):
                seen += batch.num_rows
                yield batch.column(column).to_pylist()
    if seen != rows:  # the files are not the dataset's rows: a bug, never a wrong split
        raise RuntimeError(f"{paths} hold {seen} rows, their dataset {rows}")


def rows_of(ds, kind: str, rows: np.ndarray | None = None) -> Iterator[dict]:
    """The records' content (text, or messages), of the rows `rows` or of all, read a batch at a
    time (column_batches)."""
    column = "text" if kind == "text" else "messages"
    for values in column_batches(ds, column, rows):
        for value in values:
            yield {column: value}


def split_rows(records: Records, params: PrepareParams, data: Path):
    """The rows of each split (content hash) with exact duplicates dropped (the first is kept),
    and the number dropped; train and test must not be empty."""
    key = record_key(records.kind)
    seen: set[bytes] = set()
    by_split: dict[str, list[int]] = {name: [] for name in SPLITS}
    for i, row in enumerate(rows_of(records.dataset, records.kind)):
        text = key(row)
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        if digest in seen:
            continue
        seen.add(digest)
        by_split[split_of(text, params.test_fraction, params.validation_fraction)].append(i)
    for name in ("train", "test"):
        if not by_split[name]:
            raise UserError(
                f"{data}: the {name} split is empty ({len(seen)} distinct records); add records "
                f"or change prepare.test_fraction ({params.test_fraction})"
            )
    rows = {name: np.array(r, dtype=np.int64) for name, r in by_split.items()}
    return rows, len(records.dataset) - len(seen)


def assign_splits(records: Records, params: PrepareParams, data: Path):
    """split_rows() as datasets: records by split, and the number of exact duplicates dropped."""
    rows, exact = split_rows(records, params, data)
    return {name: records.dataset.select(r) for name, r in rows.items()}, exact


def deduplicated_splits(records: Records, params: PrepareParams, data: Path):
    """split_rows(), then near duplicates of held-out records dropped from train; the splits as
    datasets, the card's counts of what was removed, and each split's rows."""
    rows, exact = split_rows(records, params, data)
    kind, ds = records.kind, records.dataset
    key = record_key(kind)
    near = near_duplicates(
        (record_text(kind, row) for row in rows_of(ds, kind, rows["train"])),
        (record_text(kind, row) for row in rows_of(ds, kind, rows["test"])),
        params.near_duplicate_threshold,
        test_text=lambda k: record_text(kind, ds[int(rows["test"][k])]),
    )
    if near:
        rows["train"] = np.delete(rows["train"], near)
        if not len(rows["train"]):
            raise UserError(
                f"{data}: every training record nearly duplicates a test record; add records "
                "or raise prepare.near_duplicate_threshold"
            )
    card = {
        "data": str(data),
        "format": kind,
        "block_size": params.block_size,
        "records_in": len(ds),
        "exact_duplicates_removed": exact,
        "near_duplicates_removed_from_train": len(near),
        "near_duplicate_threshold": params.near_duplicate_threshold,
        "test_split_hash": heldout_hash(
            (key(row) for row in rows_of(ds, kind, rows["test"])),
            prefix="" if kind == "text" else "chat",
        ),
    }
    return {name: ds.select(r) for name, r in rows.items()}, card, rows


def length_histogram(lengths, block_size: int) -> dict[str, int]:
    """Records per length bin (tokens): powers of two up to the block size, then 'longer'."""
    edges = [2**k for k in range(4, 32) if 2**k < block_size] + [block_size]
    bins = np.bincount(np.searchsorted(edges, np.asarray(lengths, dtype=np.int64), side="left"),
                       minlength=len(edges) + 1)  # fmt: skip
    return {
        **{f"<={e}": int(c) for e, c in zip(edges, bins, strict=False)},
        "longer": int(bins[-1]),
    }


def write_text_splits(ds, rows, params: PrepareParams, tokenizer, tmp: Path, data: Path) -> dict:
    """Documents back to back with EOS after each, cut into full blocks (the tail is dropped).

    Streamed: each split's texts are read a batch at a time (column_batches), tokenized in
    prepare.num_proc processes (steps/text_tokens.py), packed with numpy and written a batch of
    blocks at a time; no split's texts or token ids are ever held whole in memory."""
    import shutil

    stats = {}
    scratch = tmp / ".scratch"
    scratch.mkdir()
    for name in ("train", "validation"):
        texts = column_batches(ds, "text", rows[name], batch_size=TEXTS_PER_BATCH)
        procs = num_procs(params.num_proc, len(rows[name]))
        lengths, blocks = write_blocks(
            token_batches(texts, tokenizer, procs),
            tokenizer.eos_token_id,
            params.block_size,
            tmp / name,
            scratch,
        )
        if name == "train" and not blocks:
            raise UserError(
                f"{data}: the train split has fewer tokens than one block "
                f"(prepare.block_size={params.block_size}); add text or lower block_size"
            )
        stats[name] = {
            "records": len(rows[name]),
            "tokens": int(lengths.sum()),
            "supervised_tokens": int(lengths.sum()),
            "blocks": blocks,
            "length_histogram": length_histogram(lengths, params.block_size),
        }
    characters = write_texts(column_batches(ds, "text", rows["test"]), tmp / "test", scratch)
    shutil.rmtree(scratch)
    stats["test"] = {"records": len(rows["test"]), "characters": characters}
    return stats


def write_texts(batches, out: Path, scratch: Path) -> int:
    """Batches of texts as a dataset of one `text` column, written a batch at a time; returns
    the number of characters."""
    import pyarrow as pa
    from datasets import Features, Value
    from datasets.arrow_writer import ArrowWriter

    features = Features({"text": Value("string")})
    path = scratch / f"texts-{uuid.uuid4().hex}.arrow"
    characters = 0
    with ArrowWriter(features=features, path=str(path)) as writer:
        for texts in batches:
            writer.write_table(pa.table({"text": pa.array(texts, pa.string())}))
            characters += sum(len(t) for t in texts)
        writer.finalize()
    install_dataset(path, features, out)
    return characters


def install_dataset(arrow_file: Path, features, out: Path) -> None:
    """An Arrow file written by datasets' ArrowWriter, as a dataset at `out` that load_from_disk
    reads, without reading the file back (save_to_disk would, through a memory map that keeps
    every page read in this process's RSS): an empty dataset of the same features is saved at
    `out`, and the one data file its state names is replaced by `arrow_file`."""
    from datasets import Dataset

    empty = Dataset.from_dict({name: [] for name in features}, features=features)
    empty.save_to_disk(str(out), num_shards=1)
    [data_file] = json.loads((out / "state.json").read_text())["_data_files"]
    os.replace(arrow_file, out / data_file["filename"])


def num_procs(requested: int | str, records: int) -> int:
    """Processes for tokenizing `records` documents: prepare.num_proc, where `auto` is one per
    available core once there are enough records to pay for starting them (RECORDS_PER_PROC)."""
    if requested == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, min(cores or 1, records // RECORDS_PER_PROC))
    return max(1, min(int(requested), records))


def write_blocks(batches, eos_id: int, block_size: int, out: Path, scratch: Path):
    """stream_blocks() over batches of (token ids back to back, each document's length), in
    numpy, written a batch of blocks at a time (int32); returns every document's length (EOS
    included) and the number of blocks."""
    import pyarrow as pa
    from datasets import Features, Sequence, Value
    from datasets.arrow_writer import ArrowWriter

    features = Features({"input_ids": Sequence(Value("int32"))})
    lengths: list[np.ndarray] = []
    carry = np.zeros(0, dtype=np.int32)
    blocks = 0
    path = scratch / f"blocks-{uuid.uuid4().hex}.arrow"
    with ArrowWriter(features=features, path=str(path)) as writer:
        for flat, doc_lengths in batches:
            n = doc_lengths + 1  # the EOS after each document
            stream = np.full(int(n.sum()) + len(carry), eos_id, dtype=np.int32)
            stream[: len(carry)] = carry
            is_token = np.ones(len(stream) - len(carry), dtype=bool)
            is_token[np.cumsum(n) - 1] = False
            stream[len(carry) :][is_token] = flat
            full = len(stream) // block_size
            if full:
                offsets = pa.array(np.arange(full + 1, dtype=np.int32) * block_size)
                packed = pa.ListArray.from_arrays(offsets, pa.array(stream[: full * block_size]))
                writer.write_table(pa.table({"input_ids": packed}))
                blocks += full
            carry = stream[full * block_size :].copy()
            lengths.append(n)
        writer.finalize()
    install_dataset(path, features, out)
    return (np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)), blocks


def write_chat_splits(splits, params: PrepareParams, tokenizer, tmp: Path, data: Path) -> dict:
    """Conversations rendered with assistant-only labels; train and validation packed into blocks
    (each conversation isolated), test kept as conversations for response perplexity."""
    stats = {}
    for name in ("train", "validation"):
        if not len(splits[name]):  # no validation records (map would skip an empty dataset)
            _save_blocks(iter(()), tmp / name)
            stats[name] = {"records": 0, "tokens": 0, "supervised_tokens": 0, "blocks": 0}
            continue
        rendered = splits[name].map(
            lambda row: dict(
                zip(("input_ids", "labels"), render(row["messages"], tokenizer), strict=True)
            ),
            load_from_cache_file=False,
        )
        lengths = [len(x) for x in rendered["input_ids"]]
        fitted = rendered.map(
            lambda row: _fitted(row, params),
            remove_columns=rendered.column_names,
            load_from_cache_file=False,
        )
        kept = fitted.filter(lambda row: not row["dropped"], load_from_cache_file=False)
        for row in kept:
            if row["truncated"] and not supervised(row["labels"]):
                raise UserError(
                    f"{row['source']}: the assistant's turns lie beyond prepare.block_size "
                    f"({params.block_size} tokens) and are truncated away; raise block_size or set "
                    "prepare.overlong: drop"
                )
        if name == "train" and not len(kept):
            raise UserError(
                f"{data}: every training record was filtered out ({len(rendered)} longer than "
                f"prepare.block_size={params.block_size}, prepare.overlong: drop); raise "
                "block_size or set prepare.overlong: truncate"
            )
        blocks = _save_blocks(
            blocks_of(kept.select_columns(["input_ids", "labels"]), params.block_size, tokenizer),
            tmp / name,
        )
        total = sum(len(x) for x in kept["input_ids"])
        stats[name] = {
            "records": len(kept),
            "truncated": sum(kept["truncated"]),
            "dropped": len(rendered) - len(kept),
            "tokens": total,
            "supervised_tokens": sum(supervised(x) for x in kept["labels"]),
            "blocks": blocks,
            "packing_efficiency": round(total / max(blocks * params.block_size, 1), 4),
            "length_histogram": length_histogram(lengths, params.block_size),
        }
    test = splits["test"]
    test.select_columns(["messages", "source"]).save_to_disk(str(tmp / "test"), num_shards=1)
    rendered = [render(row["messages"], tokenizer) for row in test]
    stats["test"] = {
        "records": len(test),
        "tokens": sum(len(ids) for ids, _ in rendered),
        "supervised_tokens": sum(supervised(labels) for _, labels in rendered),
        "length_histogram": length_histogram([len(i) for i, _ in rendered], params.block_size),
    }
    return stats


def _fitted(row: dict, params: PrepareParams) -> dict:
    kept = fit(row["input_ids"], row["labels"], params.block_size, params.overlong)
    if kept is None:
        return {
            "input_ids": [],
            "labels": [],
            "truncated": False,
            "dropped": True,
            "source": row["source"],
        }
    return {
        "input_ids": kept.ids,
        "labels": kept.labels,
        "truncated": kept.truncated,
        "dropped": False,
        "source": row["source"],
    }


def card_metrics(card: dict, prefix: str = "data") -> dict[str, float]:
    """The card's numbers as flat MLflow metric names (data.splits.train.records, ...); the
    histograms stay in the card artifact."""
    flat = {}
    for key, value in card.items():
        name = f"{prefix}.{key}"
        if key == "length_histogram":
            continue
        if isinstance(value, dict):
            flat.update(card_metrics(value, name))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def blocks_of(tokenized, block_size: int, tokenizer):
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return blocks(tokenized, block_size, pad)


def _save_blocks(rows, path: Path) -> int:
    """Write rows (dicts) as a dataset at `path` without holding them all; returns the count."""
    import pyarrow as pa
    from datasets import Dataset

    batch: list[dict] = []
    tables = []
    for row in rows:
        batch.append(row)
        if len(batch) == 1024:
            tables.append(pa.Table.from_pylist(batch))
            batch = []
    if batch:
        tables.append(pa.Table.from_pylist(batch))
    if not tables:
        tables.append(pa.table({"input_ids": pa.array([], type=pa.list_(pa.int64()))}))
    table = pa.concat_tables(tables)
    # num_shards=1: an empty split saved with 0 shards cannot be loaded back
    Dataset(table).save_to_disk(str(path), num_shards=1)
    return table.num_rows


def run(params: PrepareParams, data: Path, base_model: Path, out: Path, card: Path) -> dict:
    from transformers import AutoTokenizer

    check_block_size(params.block_size, base_model / "config.json")
    stats = prepare(params, data, AutoTokenizer.from_pretrained(base_model), out)
    write_json(card, stats)
    log_to_flow_run(metrics=card_metrics(stats), artifacts=[card])
    split = stats["splits"]
    print(
        f"prepare: {data} ({stats['format']}): {stats['records_in']} records, "
        f"{stats['exact_duplicates_removed']} exact duplicates and "
        f"{stats['near_duplicates_removed_from_train']} near duplicates of test records removed; "
        f"train {split['train']['records']} / {split['train']['blocks']} blocks of "
        f"{params.block_size} ({split['train']['supervised_tokens']} supervised tokens), "
        f"validation {split['validation']['records']}, test {split['test']['records']} -> {out}"
    )
    return stats


def main() -> dict:
    args = stage_arguments()
    return run(load_params(args.params).prepare, args.data, args.base_model, args.out, args.card)


if __name__ == "__main__":
    run_step(main)
