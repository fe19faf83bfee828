"""steps/records.py: every input format into Arrow, the three chat shapes, kinds, and each error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from steps.errors import UserError
from steps.params import PrepareParams
from steps.records import read_records

pytestmark = pytest.mark.unit

BOM = "\ufeff"
CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is DVC?"},
    {"role": "assistant", "content": "Data version control."},
    {"role": "user", "content": "And MLflow?"},
    {"role": "assistant", "content": "Tracking and a registry."},
]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LLMPIPE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def jsonl(path: Path, *records: object) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


def read(path: Path, **params) -> tuple[str, dict[str, list]]:
    records = read_records(path, PrepareParams(**params))
    return records.kind, records.dataset[:]


def error(path: Path, **params) -> str:
    with pytest.raises(UserError) as info:
        read_records(path, PrepareParams(**params))
    message = str(info.value)
    assert "\n" not in message
    return message


def turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in pairs]


# text, in every format ---------------------------------------------------------------------------


def test_jsonl_text_with_bom_blank_lines_stripped_and_blank_records_dropped(tmp_path):
    path = write(
        tmp_path / "c.jsonl",
        BOM + '{"text": " first "}\n\n  \n{"text": "second\\ndoc", "id": 2}\n'
        '{"text": "   "}\n{"text": "third"}\n',
    )
    kind, rows = read(path)
    assert kind == "text"
    assert rows == {
        "text": ["first", "second\ndoc", "third"],
        "source": [f"{path}:1", f"{path}:4", f"{path}:6"],
    }


def test_jsonl_custom_text_field_and_unicode_line_separators(tmp_path):
    docs = ["one\u2028two", "three\u2029four", "five\x85six"]
    path = jsonl(tmp_path / "c.jsonl", *({"body": d} for d in docs))
    assert read(path, text_field="body")[1]["text"] == docs


def test_txt_documents_are_separated_by_blank_lines_and_keep_their_first_line(tmp_path):
    path = write(
        tmp_path / "c.txt",
        BOM + "line one\nline two\n\nsecond doc\r\n \t \r\n\n  third doc  \n\n\n\nfourth",
    )
    assert read(path) == (
        "text",
        {
            "text": ["line one\nline two", "second doc", "third doc", "fourth"],
            "source": [f"{path}:1", f"{path}:4", f"{path}:7", f"{path}:11"],
        },
    )


def test_csv_text_cells_stay_text_and_rows_are_numbered(tmp_path):
    path = write(
        tmp_path / "c.csv",
        BOM + 'text,id\n123,1\nNA,2\n"a ""quoted""\nmulti-line cell",3\n,4\n  None  ,5\n',
    )
    assert read(path) == (
        "text",
        {
            "text": ["123", "NA", 'a "quoted"\nmulti-line cell', "None"],
            "source": [f"{path}:row 1", f"{path}:row 2", f"{path}:row 3", f"{path}:row 5"],
        },
    )


def test_parquet_text(tmp_path):
    from datasets import Dataset

    path = tmp_path / "c.parquet"
    Dataset.from_dict({"body": ["a ", " ", "c"], "n": [1, 2, 3]}).to_parquet(str(path))
    assert read(path, text_field="body")[1] == {
        "text": ["a", "c"],
        "source": [f"{path}:row 1", f"{path}:row 3"],
    }


def test_a_directory_of_jsonl_files_in_name_order(tmp_path):
    data = tmp_path / "raw"
    data.mkdir()
    jsonl(data / "b.jsonl", {"text": "b1"}, {"text": "b2"})
    write(data / "a.jsonl", '\n{"text": "a1"}\n')
    write(data / "a.jsonl.dvc", "outs: []\n")  # what DVC leaves beside a tracked file
    write(data / ".gitignore", "/a.jsonl\n")
    assert read(data) == (
        "text",
        {
            "text": ["a1", "b1", "b2"],
            "source": [f"{data}/a.jsonl:2", f"{data}/b.jsonl:1", f"{data}/b.jsonl:2"],
        },
    )


def test_a_saved_dataset_is_read_in_place_and_left_untouched(tmp_path, cache):
    from datasets import Dataset

    saved = tmp_path / "saved"
    Dataset.from_dict({"text": ["x", "", "z"]}).save_to_disk(str(saved))
    before = sorted(p.name for p in saved.iterdir())
    records = read_records(saved, PrepareParams())
    assert records.dataset[:] == {
        "text": ["x", "z"],
        "source": [f"{saved}:row 1", f"{saved}:row 3"],
    }
    assert sorted(p.name for p in saved.iterdir()) == before  # map's cache went to our cache
    assert all(Path(f["filename"]).is_relative_to(cache) for f in records.dataset.cache_files)


def test_records_are_memory_mapped_arrow_in_the_cache(tmp_path, cache):
    path = jsonl(tmp_path / "c.jsonl", {"text": "a"})
    dataset = read_records(path, PrepareParams()).dataset
    files = [Path(f["filename"]) for f in dataset.cache_files]
    assert files and all(f.is_relative_to(cache / "datasets") for f in files)
    assert not list(tmp_path.glob("*.arrow"))


def test_a_changed_file_is_read_again_not_taken_from_the_cache(tmp_path):
    path = jsonl(tmp_path / "c.jsonl", {"text": "old"})
    assert read(path)[1]["text"] == ["old"]
    jsonl(path, {"text": "new"})
    assert read(path)[1]["text"] == ["new"]
    assert read(path)[1]["text"] == ["new"]  # and the second read of it is the cached one


# chat: the three shapes --------------------------------------------------------------------------


def test_messages_records_keep_every_turn_and_drop_extra_keys(tmp_path):
    second = [{**CHAT[1], "name": "ann"}, {**CHAT[2], "weight": 1}]
    path = write(
        tmp_path / "c.jsonl",
        "\n" + json.dumps({"messages": CHAT}) + "\n" + json.dumps({"messages": second}) + "\n",
    )
    kind, rows = read(path)
    assert kind == "chat"
    assert rows == {"messages": [CHAT, CHAT[1:3]], "source": [f"{path}:2", f"{path}:3"]}


def test_messages_under_a_custom_field(tmp_path):
    path = jsonl(tmp_path / "c.jsonl", {"conversation": CHAT[1:3]})
    assert read(path, messages_field="conversation")[1]["messages"] == [CHAT[1:3]]


def test_prompt_completion_becomes_user_and_assistant(tmp_path):
    path = jsonl(tmp_path / "c.jsonl", {"prompt": "2+2?", "completion": " 4"})
    assert read(path) == (
        "chat",
        {"messages": [turns(("user", "2+2?"), ("assistant", " 4"))], "source": [f"{path}:1"]},
    )


def test_instruction_input_output_joins_a_non_empty_input(tmp_path):
    path = jsonl(
        tmp_path / "c.jsonl",
        {"instruction": "Translate.", "input": "Hallo", "output": "Hello"},
        {"instruction": "Say hi.", "output": "Hi"},  # input missing on some records
        {"instruction": "Say hi.", "input": "", "output": "Hi"},
        {"instruction": "Say hi.", "input": None, "output": "Hi"},
    )
    hi = turns(("user", "Say hi."), ("assistant", "Hi"))
    assert read(path)[1]["messages"] == [
        turns(("user", "Translate.\n\nHallo"), ("assistant", "Hello")),
        hi,
        hi,
        hi,
    ]


def test_csv_chat_shapes(tmp_path):
    pairs = write(tmp_path / "p.csv", 'prompt,completion\n"Q\nmore",A\n')
    assert read(pairs)[1] == {
        "messages": [turns(("user", "Q\nmore"), ("assistant", "A"))],
        "source": [f"{pairs}:row 1"],
    }
    instructions = write(tmp_path / "i.csv", "instruction,input,output\nI1,,O1\nI2,X,O2\n")
    assert read(instructions)[1]["messages"] == [
        turns(("user", "I1"), ("assistant", "O1")),
        turns(("user", "I2\n\nX"), ("assistant", "O2")),
    ]


def test_parquet_and_saved_dataset_messages(tmp_path):
    from datasets import Dataset

    table = Dataset.from_dict({"messages": [CHAT, CHAT[1:3]], "id": [1, 2]})
    table.to_parquet(str(tmp_path / "c.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "c.parquet", tmp_path / "saved"):
        records = read_records(path, PrepareParams())
        assert records.kind == "chat"
        assert records.dataset[:] == {
            "messages": [CHAT, CHAT[1:3]],
            "source": [f"{path}:row 1", f"{path}:row 2"],
        }


def test_chat_features_are_a_list_of_role_and_content(tmp_path):
    path = jsonl(tmp_path / "c.jsonl", {"messages": [{**CHAT[1], "name": "x"}, CHAT[2]]})
    features = read_records(path, PrepareParams()).dataset.features
    assert features.to_dict() == {
        "messages": {
            "feature": {
                "role": {"dtype": "string", "_type": "Value"},
                "content": {"dtype": "string", "_type": "Value"},
            },
            "_type": "List",
        },
        "source": {"dtype": "string", "_type": "Value"},
    }


def test_a_directory_may_mix_chat_shapes_across_files(tmp_path):
    data = tmp_path / "raw"
    data.mkdir()
    jsonl(data / "a.jsonl", {"messages": CHAT[1:3]})
    jsonl(data / "b.jsonl", {"prompt": "p", "completion": "c"})
    assert read(data)[1]["messages"] == [CHAT[1:3], turns(("user", "p"), ("assistant", "c"))]


# auto, text and chat -----------------------------------------------------------------------------


def test_auto_takes_chat_before_text_and_format_forces_either(tmp_path):
    path = jsonl(tmp_path / "c.jsonl", {"text": "plain", "prompt": "p", "completion": "c"})
    assert read(path) == read(path, format="chat")
    assert read(path)[1]["messages"] == [turns(("user", "p"), ("assistant", "c"))]
    assert read(path, format="text")[1] == {"text": ["plain"], "source": [f"{path}:1"]}


def test_a_chat_file_under_format_text_says_what_it_found(tmp_path):
    path = write(tmp_path / "c.jsonl", "\n" + json.dumps({"instruction": "i", "output": "o"}))
    assert error(path, format="text") == (
        f"{path}:2: an instruction/output record (chat), but prepare.format is text; "
        "set prepare.format to chat or auto"
    )


def test_a_text_file_under_format_chat_says_what_it_found(tmp_path):
    path = jsonl(tmp_path / "c.jsonl", {"text": "plain"})
    message = error(path, format="chat")
    assert message.startswith(f"{path}:1: a text record, but prepare.format is chat; ")
    assert "set prepare.format to text or auto" in message
    assert "prepare.messages_field" in message
    txt = write(tmp_path / "c.txt", "plain\n")
    assert error(txt, format="chat").startswith(
        f"{txt}: a .txt file holds text documents, but prepare.format is chat; set prepare.format"
    )


def test_a_csv_with_prompt_columns_under_format_text_names_the_first_row(tmp_path):
    path = write(tmp_path / "c.csv", "prompt,completion\np,c\n")
    assert error(path, format="text").startswith(
        f"{path}:row 1: a prompt/completion record (chat), but prepare.format is text"
    )


# errors ------------------------------------------------------------------------------------------


def test_bad_json_names_the_line_past_blank_lines(tmp_path):
    path = write(tmp_path / "c.jsonl", '{"text": "a"}\n\n{"text": oops}\n')
    assert error(path).startswith(f"{path}:3: not valid JSON (Expecting value); ")


def test_unknown_role_names_the_role_and_the_turn(tmp_path):
    bad = [CHAT[1], {"role": "tool", "content": "42"}, CHAT[2]]
    path = write(tmp_path / "c.jsonl", "\n" + json.dumps({"messages": bad}) + "\n")
    assert error(path) == (
        f"{path}:2: messages[1] has unknown role 'tool'; use system, user or assistant"
    )


@pytest.mark.parametrize(
    "turn",
    [
        {"role": "assistant", "content": ""},
        {"role": "assistant"},
        {"role": "assistant", "content": 7},
    ],
)
def test_a_turn_without_content_names_the_turn(tmp_path, turn):
    path = write(tmp_path / "c.jsonl", "\n" + json.dumps({"messages": [CHAT[1], turn]}) + "\n")
    assert error(path) == (
        f"{path}:2: messages[1] has no content (empty, missing or not a string); "
        "give every turn a non-blank string"
    )


@pytest.mark.parametrize(
    ("record", "what"),
    [
        ({"prompt": "p", "completion": "  "}, "'completion'"),
        ({"prompt": None, "completion": "c"}, "'prompt'"),
        ({"instruction": "i", "input": "x"}, "'output'"),  # a key of the first record's shape
    ],
)
def test_an_empty_prompt_completion_or_output_names_the_key(tmp_path, record, what):
    first = (
        {"prompt": "p", "completion": "c"}
        if "prompt" in record
        else {"instruction": "i", "output": "o"}
    )
    path = write(tmp_path / "c.jsonl", json.dumps(first) + "\n\n" + json.dumps(record) + "\n")
    assert error(path).startswith(f"{path}:3: {what} has no content (empty, missing or not")


def test_a_conversation_without_an_assistant_turn(tmp_path):
    path = jsonl(tmp_path / "c.jsonl", {"messages": CHAT[1:3]}, {"messages": CHAT[:2]})
    assert error(path).startswith(f"{path}:2: a conversation with no assistant turn; ")


@pytest.mark.parametrize("value", [[], "hello", [["user", "hi"]]])
def test_messages_that_are_not_a_list_of_turns(tmp_path, value):
    path = jsonl(tmp_path / "c.jsonl", {"messages": CHAT[1:3]}, {"messages": value})
    message = error(path)
    assert message.startswith(f"{path}:2: ")
    assert (
        "'messages' is not a list of turns" in message or "messages[0] is not an object" in message
    )


def test_a_non_string_input(tmp_path):
    path = jsonl(tmp_path / "c.jsonl", {"instruction": "i", "input": 3, "output": "o"})
    assert error(path).startswith(f"{path}:1: 'input' is not a string; ")


def test_mixed_kinds_name_the_first_record_that_differs(tmp_path):
    path = write(
        tmp_path / "c.jsonl",
        "\n".join(
            [
                json.dumps({"messages": CHAT[1:3]}),
                "",
                json.dumps({"messages": CHAT[1:3]}),
                json.dumps({"prompt": "p", "completion": "c"}),
                json.dumps({"text": "t"}),
            ]
        ),
    )
    assert error(path) == (
        f"{path}:4: a prompt/completion record, but line 1 is a messages record; "
        "a file holds one kind of record"
    )
    text_first = jsonl(tmp_path / "t.jsonl", {"text": "t"}, {"messages": CHAT[1:3]})
    assert error(text_first).startswith(
        f"{text_first}:2: a messages record, but line 1 is a text record; "
    )


@pytest.mark.parametrize("line2", ['{"body": "x"}', '{"text": 5}', '["text"]', '"text"'])
def test_a_later_record_without_text_keeps_the_old_message(tmp_path, line2):
    path = write(tmp_path / "c.jsonl", '{"text": "a"}\n' + line2 + "\n")
    assert error(path) == (
        f"{path}:2: expected an object with a string 'text' "
        "(set prepare.text_field to the key that holds the text)"
    )


def test_a_first_record_of_no_known_kind_names_both_params(tmp_path):
    path = jsonl(tmp_path / "c.jsonl", {"body": "x"})
    message = error(path)
    assert message.startswith(f"{path}:1: expected an object with a string 'text' ")
    assert "prepare.text_field" in message
    assert "prepare.messages_field" in message


@pytest.mark.parametrize("kind", ["csv", "parquet", "saved"])
def test_a_missing_column_names_the_columns_and_the_param(tmp_path, kind):
    from datasets import Dataset

    table = Dataset.from_dict({"body": ["x"], "id": ["1"]})
    path = {"csv": tmp_path / "c.csv", "parquet": tmp_path / "c.parquet", "saved": tmp_path / "s"}[
        kind
    ]
    {"csv": table.to_csv, "parquet": table.to_parquet, "saved": table.save_to_disk}[kind](str(path))
    if kind == "csv":
        write(path, "body,id\nx,1\n")
    assert error(path, format="text") == (
        f"{path}: no column 'text' (columns: body, id); "
        "set prepare.text_field to the column that holds the text"
    )
    message = error(path)
    assert message.startswith(f"{path}: no column 'text' and no chat columns ")
    assert "(columns: body, id); set prepare.text_field (or prepare.messages_field)" in message


def test_unsupported_file_type(tmp_path):
    path = write(tmp_path / "c.xlsx", "x")
    assert error(path) == (
        f"{path}: unsupported file type '.xlsx'; "
        "use .jsonl or .txt (or .csv, .parquet, a directory of them, or a saved dataset)"
    )
    empty_dir = tmp_path / "d"
    empty_dir.mkdir()
    write(empty_dir / "notes.md", "x")
    assert error(empty_dir).startswith(
        f"{empty_dir}: no .jsonl, .txt, .csv or .parquet file inside"
    )


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("c.jsonl", ""),
        ("c.jsonl", "  \n\n\t\n"),
        ("c.jsonl", '{"text": " "}\n\n{"text": ""}\n'),
        ("c.txt", BOM + " \n\n"),
        ("c.csv", "text,id\n"),
        ("c.csv", "text,id\n,1\n"),
    ],
)
def test_every_record_filtered_out_is_an_empty_corpus(tmp_path, name, content):
    path = write(tmp_path / name, content)
    assert error(path) == f"{path}: the corpus is empty; it holds no non-blank document"


def test_missing_file(tmp_path):
    assert error(tmp_path / "nope.jsonl").startswith(
        f"{tmp_path / 'nope.jsonl'}: data file not found; set prepare.data to a .jsonl or .txt file"
    )


@pytest.mark.parametrize("name", ["c.jsonl", "c.txt", "c.csv"])
def test_non_utf8_names_the_line(tmp_path, name):
    lines = [b'{"text": "a"}', b"", b'{"text": "caf\xe9"}']
    if name == "c.csv":
        lines = [b"text", b"a", b"caf\xe9"]
    path = write(tmp_path / name, b"\n".join(lines) + b"\n")
    assert error(path) == f"{path}:3: not UTF-8 text; convert the file to UTF-8"


def test_a_directory_of_text_and_chat_files(tmp_path):
    data = tmp_path / "raw"
    data.mkdir()
    jsonl(data / "a.jsonl", {"messages": CHAT[1:3]})
    write(data / "b.txt", "\nplain\n")
    assert error(data) == (
        f"{data}/b.txt:2: a text record, but {data}/a.jsonl:1 is a chat record; "
        "the files of a directory hold one kind of record (text or chat)"
    )


def test_a_saved_dataset_dict_asks_for_one_split(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_dict({"text": ["x"]})}).save_to_disk(str(tmp_path / "dd"))
    assert error(tmp_path / "dd").startswith(f"{tmp_path / 'dd'}: a saved DatasetDict; ")


def test_malformed_csv_and_parquet_are_one_line_errors(tmp_path):
    csv_path = write(tmp_path / "c.csv", "text,id\na,1\nb,2,3\n")
    message = error(csv_path)
    assert message.startswith(f"{csv_path}: not a valid csv file (Error tokenizing data. ")
    assert "Expected 2 fields in line 3, saw 3" in message
    parquet = write(tmp_path / "c.parquet", b"not parquet")
    assert error(parquet).startswith(f"{parquet}: not a valid parquet file (")
