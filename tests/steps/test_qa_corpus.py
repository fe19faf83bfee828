"""steps/qa_corpus.py: the embedded chat data, standard-library questions answered by docstrings."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from steps import stages
from steps.qa_corpus import (
    MAX_SIGNATURE_CHARS,
    MAX_WORDS,
    MIN_WORDS,
    QUESTIONS,
    STDLIB_MODULES,
    ApiDoc,
    qa_records,
    question,
    render_signature,
    summary,
    write_jsonl,
)

pytestmark = pytest.mark.unit

ANSWER = re.compile(r"^`(?P<name>[\w.]+)(?P<signature>\(.*\))?`\n\n(?P<summary>\S.*)$", re.S)


def module_of(name: str) -> str:
    """json.JSONEncoder.encode -> json; xml.etree.ElementTree.parse -> xml.etree.ElementTree."""
    return max((m for m in STDLIB_MODULES if name.startswith(m + ".")), key=len)


def phrasings(name: str) -> set[str]:
    module = module_of(name)
    qualname = name.removeprefix(module + ".")
    return {t.format(module=module, name=qualname) for ts in QUESTIONS.values() for t in ts}


def parsed(record: dict) -> re.Match[str]:
    match = ANSWER.match(record["messages"][1]["content"])
    assert match, record
    return match


def export(out: Path, hash_seed: str) -> str:
    """Run the stage's command as DVC does, in a fresh process; its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "steps.qa_corpus", "--out", str(out)],
        cwd=stages.ROOT,
        env={**os.environ, "PYTHONHASHSEED": hash_seed},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("raw") / "stdlib_qa.jsonl"
    stdout = export(out, "0")
    records = out.read_text(encoding="utf-8").splitlines()
    assert stdout == (
        f"qa_corpus: {len(records)} question-answer records from {len(STDLIB_MODULES)} modules"
        f" -> {out}\n"
    )
    return out


@pytest.fixture(scope="module")
def records(exported) -> list[dict]:
    return [json.loads(line) for line in exported.read_text(encoding="utf-8").splitlines()]


def test_the_export_is_the_same_bytes_whatever_the_hash_seed(exported, tmp_path):
    again = tmp_path / "stdlib_qa.jsonl"
    export(again, "1")  # a set's order or a str hash leaking into the output would show here
    assert again.read_bytes() == exported.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stdlib_qa.jsonl"]  # no temporary left


def test_one_module_in_process_gives_the_exports_records(records, tmp_path):
    json_records = [r for r in records if module_of(parsed(r)["name"]) == "json"]
    assert qa_records(("json",)) == json_records
    write_jsonl(json_records, tmp_path / "json.jsonl")
    lines = (tmp_path / "json.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == json_records


def test_a_few_thousand_records_from_every_module(records):
    assert 2000 <= len(records) <= 4000
    per_module = Counter(module_of(parsed(r)["name"]) for r in records)
    assert set(per_module) == set(STDLIB_MODULES), "a listed module gives no record: drop it"
    assert max(per_module.values()) < len(records) / 8  # no module dominates (builtins: ~250)


def test_every_record_is_one_short_well_formed_exchange(records):
    for record in records:
        assert list(record) == ["messages"]
        user, assistant = record["messages"]
        assert set(user) == set(assistant) == {"role", "content"}
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        match = parsed(record)
        assert user["content"] in phrasings(match["name"])
        assert len(match["signature"] or "") <= MAX_SIGNATURE_CHARS
        text = match["summary"]
        assert MIN_WORDS <= len(text.split()) <= MAX_WORDS and text == " ".join(text.split())
        assert ">>>" not in text and "``" not in text and " at 0x" not in assistant["content"]


def test_no_repeated_question_or_summary_and_no_private_name(records):
    questions = [r["messages"][0]["content"] for r in records]
    assert len(set(questions)) == len(questions)
    summaries = [parsed(r)["summary"] for r in records]
    assert len(set(summaries)) == len(summaries)
    names = [parsed(r)["name"] for r in records]
    assert not [n for n in names if any(part.startswith("_") for part in n.split("."))]
    assert "typing.Text.upper" not in names  # typing.Text is str: asked once, as builtins.str
    assert "builtins.str.upper" in names


def test_known_records(records):
    by_name = {parsed(r)["name"]: r["messages"] for r in records}
    ask, reply = by_name["textwrap.dedent"]
    assert ask["content"] in [
        t.format(module="textwrap", name="dedent") for t in QUESTIONS["function"]
    ]
    assert reply["content"] == (
        "`textwrap.dedent(text)`\n\nRemove any common leading whitespace from every line in `text`."
    )
    assert by_name["json.dumps"][1]["content"] == (
        "`json.dumps(obj, *, skipkeys, ensure_ascii, check_circular, ...)`\n\n"
        "Serialize `obj` to a JSON formatted `str`."  # ``obj`` in the docstring
    )
    assert by_name["itertools.chain"][1]["content"].startswith(  # C type: its own signature line
        "`itertools.chain(*iterables)`\n\nReturn a chain object whose .__next__() method"
    )
    assert by_name["builtins.str.join"][1]["content"].startswith("`builtins.str.join(iterable, /)`")
    assert "json.JSONEncoder.encode" in by_name  # re-exported from json.encoder, docs walked


def test_summary_reflows_the_opening_paragraph_without_doctests_or_code():
    doc = """Return the ``thing`` for a
        :class:`Widget`, nicely.

        More detail that is not part of the answer.
        """
    assert summary(doc) == "Return the `thing` for a `Widget`, nicely."
    with_doctest = """Split the text into words and count them.
        >>> count("a b")
        2
        """
    assert summary(with_doctest) == "Split the text into words and count them."
    old_style = "chain(*iterables) --> chain object\n\nReturn a chain object that yields all items."
    assert summary(old_style) == "Return a chain object that yields all items."
    lead_in = "Typical use to call a cooperative superclass method:\n    class C(B): pass\n"
    assert summary(lead_in) is None  # a lead-in without its code says nothing
    assert summary("D.index(value) -- return first index of value in D.") == (
        "Return first index of value in D."
    )
    assert summary("Serialize to text.\n\nIf compact is true the output has no spaces.") == (
        "Serialize to text. If compact is true the output has no spaces."  # a short lead grows
    )


def test_summary_keeps_whole_sentences_up_to_the_cap_and_drops_boilerplate():
    sentences = [f"Sentence number {i} has exactly seven words." for i in range(20)]
    text = summary(" ".join(sentences), max_words=30)
    assert text == " ".join(sentences[:4])  # 4 x 7 = 28 words; a fifth would make 35
    assert summary("Number of days.") is None  # too short to teach anything
    assert summary("Return self==value.") is None
    assert summary("Alias for field number 0, of the tuple that is returned.") is None
    assert summary("expr_context = Load | Store | Del | AugLoad | AugStore | Param") is None
    assert summary("") is None
    assert summary("Factory for creating file object types") == (
        "Factory for creating file object types."
    )


def test_render_signature_shortens_and_never_shows_an_address():
    def f(a, b=1, /, c=object(), *, flag=False):  # noqa: B008 - a default whose repr has 0x...
        pass

    assert render_signature(f) == "(a, b=1, /, c=..., *, flag=False)"

    def long(first, second="a default value that is far too long", *args, third=None, **kw):
        pass

    assert render_signature(long) == "(first, second=..., *args, third=None, **kw)"

    def wide(alpha, beta, gamma, delta, epsilon, zeta, eta, theta, iota, kappa, lambda_, mu):
        pass

    shown = render_signature(wide)
    assert shown == "(alpha, beta, gamma, delta, epsilon, zeta, eta, theta, ...)"
    assert len(shown) <= MAX_SIGNATURE_CHARS
    assert render_signature(str.join, drop_first=True) == "(iterable, /)"  # self dropped
    assert render_signature(len) == "(obj, /)"
    assert render_signature(42) == ""


def test_question_is_a_stable_choice_among_the_kinds_phrasings():
    api = ApiDoc("json", "dumps", "function", "(obj)", "Serialize obj.")
    assert question(api) == question(ApiDoc("json", "dumps", "function", "", ""))
    templates = QUESTIONS["method"]
    used = Counter()
    for i in range(60):
        asked = question(ApiDoc("m", f"C.f{i}", "method", "", ""))
        [template] = [t for t in templates if t.format(module="m", name=f"C.f{i}") == asked]
        used[template] += 1
    assert set(used) == set(templates) and min(used.values()) >= 10  # spread over every phrasing
