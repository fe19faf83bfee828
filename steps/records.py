"""Read a user's data into an Arrow dataset of text documents or chat conversations.

    records = read_records(Path(params.prepare.data), params.prepare)   # in steps/prepare.py

Input: a `.jsonl`, `.txt`, `.csv` or `.parquet` file, a directory of such files (read in name order,
all of one kind), or a directory written by `datasets.Dataset.save_to_disk`. A record is text (a
string under `prepare.text_field`; `.txt` documents are separated by blank lines) or chat, which is
normalised into `messages` ([{"role", "content"}]) from one of three shapes: `messages` (under
`prepare.messages_field`), `prompt` + `completion`, or `instruction` [+ `input`] + `output`. The
first record fixes the kind (`prepare.format: auto`) or must match the forced one; a file holds one
kind. Every row keeps its `source`, `<file>:<line>` or `<file>:row <n>`, for later messages.

.jsonl and .txt are read line by line in one streaming pass that validates, normalises and writes
Arrow (datasets' json builder skips blank lines, so its row numbers are not line numbers, and it
infers a `Json` type for records whose turns differ in keys); .csv and .parquet go through datasets'
builders and one batched `map`. Results are cached under `cache_dir()/datasets`, keyed on the
files' bytes, the record params and this module's source, so a rerun on the same data reads Arrow.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps.environment import cache_dir
from steps.errors import UserError
from steps.params import PrepareParams

if TYPE_CHECKING:
    import datasets

ROLES = ("system", "user", "assistant")
CHAT_LABELS = ("messages", "prompt/completion", "instruction/output")  # the three chat shapes
LINE_SUFFIXES = (".jsonl", ".txt")  # sources are "<file>:<line>"
TABLE_SUFFIXES = (".csv", ".parquet")  # sources are "<file>:row <n>", n counted from 1
SUPPORTED = "use .jsonl or .txt (or .csv, .parquet, a directory of them, or a saved dataset)"


@dataclass(frozen=True)
class Records:
    kind: str  # "text" or "chat"
    dataset: datasets.Dataset  # text: "text", "source"; chat: "messages", "source"


def read_records(path: Path, params: PrepareParams) -> Records:
    """The records of a data file or directory; a UserError names the file and line at fault."""
    path = Path(path)
    if path.is_dir():
        parts = _read_directory(path, params)
    elif path.is_file():
        parts = [_read_file(path, params)]
    else:
        raise UserError(
            f"{path}: data file not found; set prepare.data to a .jsonl or .txt file "
            "(or .csv, .parquet, a directory of them, or a saved dataset)"
        )
    first_kind, first_source = _kind_and_first(parts[0])
    for part in parts[1:]:
        kind, source = _kind_and_first(part)
        if kind != first_kind:
            raise UserError(
                f"{source}: {_a(kind)} record, but {first_source} is {_a(first_kind)} record; "
                "the files of a directory hold one kind of record (text or chat)"
            )
    if len(parts) == 1:
        return Records(first_kind, parts[0])
    from datasets import concatenate_datasets

    return Records(first_kind, concatenate_datasets(parts))


def read_texts(path: Path, text_field: str = "text") -> list[str]:
    """The documents of a text file (reference data, texts to score), read like prepare.data."""
    params = PrepareParams(format="text", text_field=text_field)
    return list(read_records(path, params).dataset["text"])


def _read_directory(path: Path, params: PrepareParams) -> list[datasets.Dataset]:
    if (path / "dataset_dict.json").is_file():
        raise UserError(
            f"{path}: a saved DatasetDict; set prepare.data to one of its splits, e.g. {path}/train"
        )
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return [_read_saved(path, params)]
    files = sorted(
        (p for p in path.iterdir() if p.is_file() and p.suffix in LINE_SUFFIXES + TABLE_SUFFIXES),
        key=lambda p: p.name,
    )
    if not files:
        raise UserError(f"{path}: no .jsonl, .txt, .csv or .parquet file inside; {SUPPORTED}")
    return [_read_file(f, params) for f in files]


def _read_file(path: Path, params: PrepareParams) -> datasets.Dataset:
    if path.suffix == ".txt" and params.format == "chat":
        raise UserError(
            f"{path}: a .txt file holds text documents, but prepare.format is chat; "
            "set prepare.format to text or auto, or give chat records in a .jsonl file"
        )
    if path.suffix in LINE_SUFFIXES:
        rows = _jsonl_rows if path.suffix == ".jsonl" else _txt_rows
        return _from_rows(partial(rows, path, params), [path], params)
    if path.suffix == ".csv":
        return _normalise_table(_load_csv(path), str(path), [path], params)
    if path.suffix == ".parquet":
        return _normalise_table(_load_table("parquet", path), str(path), [path], params)
    raise UserError(f"{path}: unsupported file type {path.suffix!r}; {SUPPORTED}")


def _kind_and_first(dataset: datasets.Dataset) -> tuple[str, str]:
    return ("text" if "text" in dataset.column_names else "chat"), dataset[0]["source"]


# record kinds ------------------------------------------------------------------------------------


def _keys(label: str, params: PrepareParams) -> tuple[str, ...]:
    """The keys that make a record of this label; the first record needs all of them."""
    return {
        "messages": (params.messages_field,),
        "prompt/completion": ("prompt", "completion"),
        "instruction/output": ("instruction", "output"),
        "text": (params.text_field,),
    }[label]


def _label_of(record: Any, params: PrepareParams, expected: str | None) -> str | None:
    """messages, prompt/completion, instruction/output or text; None when it is none of them.

    A record with any key of the expected label is of that label (so a missing `completion` is
    reported as missing, not as another kind); otherwise chat shapes come before text unless
    prepare.format is text.
    """
    if not isinstance(record, Mapping):
        return None
    if expected is not None and any(k in record for k in _keys(expected, params)):
        return expected
    order = ("text", *CHAT_LABELS) if params.format == "text" else (*CHAT_LABELS, "text")
    return next((lb for lb in order if all(k in record for k in _keys(lb, params))), None)


def _text_expected(params: PrepareParams) -> str:
    return (
        f"expected an object with a string {params.text_field!r} "
        "(set prepare.text_field to the key that holds the text)"
    )


def _chat_expected(params: PrepareParams) -> str:
    return (
        f"a chat record: a list of turns under {params.messages_field!r} (set "
        "prepare.messages_field to the key that holds them), 'prompt'/'completion' or "
        "'instruction'/'output'"
    )


def _check_first(label: str | None, source: str, params: PrepareParams) -> None:
    """The first record fixes the file's kind; under a forced prepare.format it must match."""
    if label is None:
        what = {
            "text": _text_expected(params),
            "chat": f"expected {_chat_expected(params)}",
            "auto": f"{_text_expected(params)}, or {_chat_expected(params)}",
        }[params.format]
        raise UserError(f"{source}: {what}")
    if label != "text" and params.format == "text":
        raise UserError(
            f"{source}: {_a(label)} record (chat), but prepare.format is text; "
            "set prepare.format to chat or auto"
        )
    if label == "text" and params.format == "chat":
        raise UserError(
            f"{source}: a text record, but prepare.format is chat; set prepare.format to text or "
            "auto (or prepare.messages_field to the key that holds the turns)"
        )


def _check_same(
    label: str | None, source: str, first: tuple[str, str], params: PrepareParams
) -> None:
    """Every later record is of the first record's label (`first`: label, "line <n>")."""
    first_label, first_where = first
    if label is None and first_label == "text":
        raise UserError(f"{source}: {_text_expected(params)}")
    if label is None:
        keys = "/".join(repr(k) for k in _keys(first_label, params))
        raise UserError(
            f"{source}: expected {_a(first_label)} record ({keys}) like {first_where}; "
            "a file holds one kind of record"
        )
    if label != first_label:
        raise UserError(
            f"{source}: {_a(label)} record, but {first_where} is {_a(first_label)} record; "
            "a file holds one kind of record"
        )


def _a(label: str) -> str:
    return f"an {label}" if label[0] in "aeiou" else f"a {label}"


# normalising one record --------------------------------------------------------------------------


def _normalise(label: str, record: Mapping, source: str, params: PrepareParams) -> dict | None:
    """{"text": ...} (None for blank text, which is dropped) or {"messages": [...]}."""
    if label == "text":
        text = record.get(params.text_field)
        if not isinstance(text, str):
            raise UserError(f"{source}: {_text_expected(params)}")
        return {"text": text.strip()} if text.strip() else None
    if label == "messages":
        return {"messages": _turns(record.get(params.messages_field), source, params)}
    if label == "prompt/completion":
        prompt = _content(record.get("prompt"), "'prompt'", source)
        completion = _content(record.get("completion"), "'completion'", source)
    else:
        prompt = _content(record.get("instruction"), "'instruction'", source)
        extra = record.get("input")
        if extra is not None and not isinstance(extra, str):
            raise UserError(f"{source}: 'input' is not a string; give a string or leave it out")
        if extra and extra.strip():
            prompt += "\n\n" + extra
        completion = _content(record.get("output"), "'output'", source)
    return {"messages": [_turn("user", prompt), _turn("assistant", completion)]}


def _turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def _content(value: Any, what: str, source: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(
            f"{source}: {what} has no content (empty, missing or not a string); "
            "give every turn a non-blank string"
        )
    return value


def _turns(value: Any, source: str, params: PrepareParams) -> list[dict[str, str]]:
    field = params.messages_field
    if not isinstance(value, list) or not value:
        raise UserError(
            f"{source}: {field!r} is not a list of turns; give a list of "
            '{"role": ..., "content": ...} objects (or set prepare.messages_field)'
        )
    turns = []
    for i, turn in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(turn, Mapping):
            raise UserError(f'{source}: {where} is not an object; a turn is {{"role", "content"}}')
        role = turn.get("role")
        if role not in ROLES:
            raise UserError(
                f"{source}: {where} has unknown role {role!r}; use system, user or assistant"
            )
        turns.append(_turn(role, _content(turn.get("content"), where, source)))
    if not any(t["role"] == "assistant" for t in turns):
        raise UserError(
            f"{source}: a conversation with no assistant turn; add the assistant's reply "
            "(the text the model learns) or drop the record"
        )
    return turns


# .jsonl and .txt: one streaming pass ------------------------------------------------------------


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, split on \\n only (U+2028 and U+0085 are legal
    inside JSON strings); a byte-order mark at the start is dropped."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(
                    f"{path}:{lineno}: not UTF-8 text; convert the file to UTF-8"
                ) from None
            yield lineno, text.removeprefix(codecs.BOM_UTF8.decode()) if lineno == 1 else text


def _jsonl_rows(path: Path, params: PrepareParams) -> Iterator[dict]:
    first: tuple[str, str] | None = None
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        source = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(
                f"{source}: not valid JSON ({err.msg}); write one JSON object per line"
            ) from None
        label = _label_of(record, params, first[0] if first else None)
        if first is None:
            _check_first(label, source, params)
            first = (label, f"line {lineno}")
        else:
            _check_same(label, source, first, params)
        row = _normalise(label, record, source, params)
        if row is not None:
            yield {**row, "source": source}


def _txt_rows(path: Path, params: PrepareParams) -> Iterator[dict]:
    """Documents separated by lines of only spaces and tabs; a document's source is its first
    line. Only the current document is held in memory."""
    lines: list[str] = []
    start = 0
    for lineno, line in chain(_lines(path), [(0, "")]):  # a blank line ends the last document
        line = line.rstrip("\n").removesuffix("\r")
        if line.strip(" \t"):
            start = start if lines else lineno
            lines.append(line)
        elif lines:
            text = "\n".join(lines).strip()
            lines = []
            if text:
                yield {"text": text, "source": f"{path}:{start}"}


def _from_rows(
    rows: Callable[[], Iterator[dict]], files: list[Path], params: PrepareParams
) -> datasets.Dataset:
    """Arrow written from a rows generator, a batch at a time, and cached by content."""
    from datasets import Dataset
    from datasets.exceptions import DatasetGenerationError

    first = next(rows(), None)  # its kind fixes the schema; reading it costs one record
    if first is None:
        raise _empty(files[0])
    kind = "text" if "text" in first else "chat"
    try:
        return Dataset.from_generator(
            rows,
            features=_features(kind),
            cache_dir=str(_datasets_cache()),
            fingerprint=_cache_key(files, params),
        )
    except DatasetGenerationError as err:
        _raise_cause(err)
        raise


# .csv, .parquet and saved datasets: datasets' readers, then one batched map ----------------------


def _load_csv(path: Path) -> datasets.Dataset:
    """Every column as a string: a cell like 123 or NA is text, and an empty cell is ''."""
    for _ in _lines(path):  # a bad byte is reported with its line; pandas would not say where
        pass
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        if not any(any(cell.strip() for cell in row) for row in reader):
            raise _empty(path)
    from datasets import Features, Value

    features = Features({name: Value("string") for name in header})
    return _load_table("csv", path, features=features, na_filter=False)


def _load_table(builder: str, path: Path, **config: Any) -> datasets.Dataset:
    import pyarrow as pa
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    try:
        return load_dataset(
            builder, data_files=str(path), split="train", cache_dir=str(_datasets_cache()), **config
        )
    except (pa.ArrowInvalid, DatasetGenerationError) as err:
        _raise_cause(err)
        cause = err.__cause__ if isinstance(err, DatasetGenerationError) else err
        if not isinstance(cause, ValueError):  # pandas' and Arrow's parse errors are ValueErrors
            raise
        reason = str(cause).strip().splitlines()[0]
    raise UserError(f"{path}: not a valid {builder} file ({reason}); check how it was written")


def _read_saved(path: Path, params: PrepareParams) -> datasets.Dataset:
    from datasets import load_from_disk

    files = sorted(p for p in path.iterdir() if p.is_file())
    return _normalise_table(load_from_disk(str(path)), str(path), files, params)


def _normalise_table(
    table: datasets.Dataset, name: str, files: list[Path], params: PrepareParams
) -> datasets.Dataset:
    """Columns decide the kind; a batched map validates and normalises every row into a cache
    file of ours (a map's default cache file would land inside a saved dataset's directory)."""
    label = _label_of(dict.fromkeys(table.column_names), params, None)
    if label is None:
        raise _missing_column(name, table.column_names, params)
    _check_first(label, f"{name}:row 1", params)
    kind = "text" if label == "text" else "chat"
    key = _cache_key(files, params)
    out = _datasets_cache() / "llmpipe-records" / f"{key}.arrow"
    out.parent.mkdir(parents=True, exist_ok=True)
    dataset = table.map(
        partial(_table_batch, name=name, label=label, params=params),
        batched=True,
        with_indices=True,
        remove_columns=table.column_names,
        features=_features(kind),
        cache_file_name=str(out),
        new_fingerprint=key,
    )
    if len(dataset) == 0:
        raise _empty(Path(name))
    return dataset


def _table_batch(
    batch: dict[str, list], indices: list[int], name: str, label: str, params: PrepareParams
) -> dict[str, list]:
    column = "text" if label == "text" else "messages"
    keys = [k for k in (*_keys(label, params), "input") if k in batch]
    values, sources = [], []
    for j, index in enumerate(indices):
        source = f"{name}:row {index + 1}"
        row = _normalise(label, {k: batch[k][j] for k in keys}, source, params)
        if row is not None:
            values.append(row[column])
            sources.append(source)
    return {column: values, "source": sources}


def _missing_column(name: str, columns: list[str], params: PrepareParams) -> UserError:
    text, turns = repr(params.text_field), repr(params.messages_field)
    chat = f"chat columns ({turns}, 'prompt'/'completion' or 'instruction'/'output')"
    want, fix = {
        "text": (f"column {text}", "prepare.text_field to the column that holds the text"),
        "chat": (chat, "prepare.messages_field to the column that holds the turns"),
        "auto": (
            f"column {text} and no {chat}",
            "prepare.text_field (or prepare.messages_field) to the column that holds the text",
        ),
    }[params.format]
    return UserError(f"{name}: no {want} (columns: {', '.join(columns) or 'none'}); set {fix}")


# shared ------------------------------------------------------------------------------------------


def _empty(path: Path) -> UserError:
    return UserError(f"{path}: the corpus is empty; it holds no non-blank document")


def _features(kind: str) -> datasets.Features:
    from datasets import Features, Value

    if kind == "text":
        return Features({"text": Value("string"), "source": Value("string")})
    turn = {"role": Value("string"), "content": Value("string")}
    return Features({"messages": [turn], "source": Value("string")})


def _datasets_cache() -> Path:
    return cache_dir() / "datasets"


def _cache_key(files: list[Path], params: PrepareParams) -> str:
    """sha256 of the files (names included: sources quote them), the record params and this
    module's source (a change to the rules must not read an old result)."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(json.dumps([params.format, params.text_field, params.messages_field]).encode())
    for path in files:
        h.update(f"\0{path}\0".encode())
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:32]


def _raise_cause(err: Exception) -> None:
    """datasets wraps what a reader or generator raised: a UserError (ours) or an OSError (a full
    disk) travels on as itself, so the step reports it in one line."""
    if isinstance(err.__cause__, UserError | OSError):
        raise err.__cause__ from None
