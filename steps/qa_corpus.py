"""Export the embedded chat data: questions on the standard library, answered by its docstrings.

    python -m steps.qa_corpus --out data/raw/stdlib_qa.jsonl      # the DVC stage `qa_corpus`

Like the `corpus` stage it is derived at run time from the running CPython, so nothing is
downloaded. One record per public function, class, method or property whose docstring opens with a
real summary: {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}, a few thousand in
all. Sized for a CPU run that sees ~100-150k tokens: each answer is the name with its signature and
the docstring's first paragraph, reflowed, capped at MAX_WORDS, so answers are short and uniform.
The output is the same on every run of the same Python version: modules and names are walked in
sorted order, and the question's phrasing is chosen by a hash of the name, not at random.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from steps.arguments import stage_arguments
from steps.outcome import run_step
from steps.outputs import write_text

# Mostly pure Python, none whose public names or docstrings depend on the platform (no os, shutil,
# socket, ssl, asyncio, hashlib/OpenSSL, sqlite3); importing them has no side effects. Each one
# gives at least one record.
STDLIB_MODULES = (
    "abc", "argparse", "array", "ast", "base64", "bdb", "binascii", "bisect", "builtins", "bz2",
    "calendar", "cmath", "cmd", "code", "codecs", "codeop", "collections", "collections.abc",
    "configparser", "contextlib", "contextvars", "copy", "copyreg", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "dis", "doctest", "email.charset", "email.generator",
    "email.header", "email.headerregistry", "email.message", "email.parser", "email.policy",
    "email.utils", "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools",
    "getopt", "glob", "graphlib", "gzip", "heapq", "hmac", "html", "html.parser", "http.client",
    "http.cookiejar", "http.cookies", "http.server", "imaplib", "importlib.abc",
    "importlib.metadata", "importlib.util", "inspect", "ipaddress", "itertools", "json",
    "linecache", "logging", "logging.handlers", "lzma", "mailbox", "math", "mimetypes", "numbers",
    "operator", "optparse", "pathlib", "pickle", "pickletools", "pkgutil", "plistlib", "poplib",
    "pprint", "profile", "pstats", "py_compile", "pyclbr", "queue", "quopri", "random", "re",
    "reprlib", "sched", "secrets", "shlex", "smtplib", "statistics", "string", "struct",
    "symtable", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "tomllib",
    "trace", "traceback", "types", "typing", "unicodedata", "unittest", "unittest.mock",
    "urllib.error", "urllib.parse", "urllib.request", "urllib.robotparser", "uuid", "warnings",
    "weakref", "wsgiref.headers", "wsgiref.util", "xml.dom", "xml.dom.minidom",
    "xml.etree.ElementTree", "xml.sax.handler", "xml.sax.saxutils", "xml.sax.xmlreader",
    "xmlrpc.client", "xmlrpc.server", "zipfile", "zlib", "zoneinfo",
)  # fmt: skip
MIN_WORDS = 6  # "Return the square root of x." is kept; "Number of days." says too little
MAX_WORDS = 60  # ~80-100 SmolLM2 tokens: whole sentences up to this many words
MAX_SIGNATURE_CHARS = 60  # longer signatures drop their defaults, then their tail ("...")
MAX_DEFAULT_CHARS = 16  # a longer default value is shown as "..."

Kind = Literal["function", "class", "method", "property"]
QUESTIONS: dict[Kind, tuple[str, ...]] = {
    "function": (
        "What does `{module}.{name}` do?",
        "In Python's `{module}` module, what is `{name}` for?",
        "What is the purpose of the Python function `{module}.{name}`?",
    ),
    "class": (
        "What is `{module}.{name}`?",
        "In Python's `{module}` module, what is the `{name}` class for?",
        "What is the purpose of the Python class `{module}.{name}`?",
    ),
    "method": (
        "What does `{module}.{name}` do?",
        "In Python's `{module}` module, what does the `{name}` method do?",
        "What is the purpose of the method `{module}.{name}`?",
    ),
    "property": (
        "What is `{module}.{name}`?",
        "In Python's `{module}` module, what is the `{name}` attribute?",
        "What does the attribute `{module}.{name}` hold?",
    ),
}
# Docstrings CPython generates for slot wrappers, pickling helpers, namedtuples and the like.
GENERATED = re.compile(
    r"^(Return self|Initialize self|Create and return a new object|Helper for pickle|"
    r"See help\(type\(self\)\)|Alias for field number|Deprecated|DEPRECATED|"
    r"\w+ = )"  # ast's grammar rules: "expr_context = Load | Store | Del"
)
OLD_STYLE_SIGNATURE = re.compile(r"^[\w.]+(\(.*?\))\s*(-+>.*)?$")  # "chain(*iterables) --> chain"
CALL_PREFIX = re.compile(r"^[\w.]+\(.*?\)\s+--+\s+")  # "D.index(value) -- return first index"
SPHINX_ROLE = re.compile(r":\w+:`~?([^`]+)`")  # :class:`Mock` -> `Mock`
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`(\"'])")


@dataclass(frozen=True)
class ApiDoc:
    """One documented public object: `qualname` is "dumps" or "JSONEncoder.encode"."""

    module: str
    qualname: str
    kind: Kind
    signature: str  # "(obj, *, skipkeys=False, ...)", or "" where none is known
    doc: str  # the object's own docstring, as written


def summary(doc: str, max_words: int = MAX_WORDS) -> str | None:
    """The docstring's opening paragraph as one line: an old-style signature line, doctest lines
    and what follows a colon-ended lead-in dropped, reST ``code`` made `code`, whole sentences up
    to `max_words`. None when what is left is shorter than MIN_WORDS or generated boilerplate."""
    paragraphs = [p for p in re.split(r"\n\s*\n", inspect.cleandoc(doc)) if p.strip()]
    if paragraphs and old_style_signature(paragraphs[0]) is not None:
        paragraphs = paragraphs[1:]
    lines: list[str] = []
    for paragraph in paragraphs[:2]:  # the second only when the first is a short lead
        prose = prose_lines(paragraph)
        lines += prose
        if len(prose) < len(paragraph.splitlines()) or len(" ".join(lines).split()) >= MIN_WORDS:
            break
    text = SPHINX_ROLE.sub(r"`\1`", " ".join(" ".join(lines).split()).replace("``", "`"))
    if CALL_PREFIX.match(text):
        text = CALL_PREFIX.sub("", text)
        text = text[:1].upper() + text[1:]
    kept: list[str] = []
    for sentence in SENTENCE_END.split(text):
        if len(" ".join([*kept, sentence]).split()) > max_words:
            break
        kept.append(sentence)
    while kept and kept[-1].endswith(":"):  # "For example:" without its example
        kept.pop()
    text = " ".join(kept)
    if len(text.split()) < MIN_WORDS or GENERATED.match(text):
        return None
    return text + "." if text[-1].isalnum() else text


def prose_lines(paragraph: str) -> list[str]:
    """The paragraph's lines up to a doctest (">>>") or to what a line ending in a colon leads
    into (a code block, a list of options)."""
    prose: list[str] = []
    for line in paragraph.splitlines():
        if line.lstrip().startswith((">>>", "...")) or (prose and prose[-1].endswith(":")):
            break
        prose.append(line.rstrip())
    return prose


def old_style_signature(paragraph: str) -> str | None:
    """ "(*iterables)" from a C docstring's opening "chain(*iterables) --> chain object" (its first
    line; more may follow); None when the paragraph does not open so."""
    lines = paragraph.strip().splitlines()
    match = OLD_STYLE_SIGNATURE.match(lines[0].strip()) if lines else None
    if match is None or (len(lines) > 1 and match.group(2) is None):
        return None  # a lone "name(args)" line is one; a longer paragraph needs the arrow
    return match.group(1) if len(match.group(1)) <= MAX_SIGNATURE_CHARS else ""


def render_signature(obj: object, drop_first: bool = False) -> str:
    """`(a, b=1, *, c=...)` without annotations; "" when Python cannot tell. Long default values
    become "..." (a repr with an address would differ between runs); a signature over
    MAX_SIGNATURE_CHARS drops its defaults, then its tail."""
    try:
        params = list(inspect.signature(obj).parameters.values())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""
    if drop_first and params and params[0].kind <= inspect.Parameter.POSITIONAL_OR_KEYWORD:
        params = params[1:]  # self or cls
    for with_defaults in (True, False):
        parts = _parameter_parts(params, with_defaults)
        if len(", ".join(parts)) + 2 <= MAX_SIGNATURE_CHARS:
            return f"({', '.join(parts)})"
    kept: list[str] = []
    for part in parts:
        if len(", ".join([*kept, part, "..."])) + 2 > MAX_SIGNATURE_CHARS:
            break
        kept.append(part)
    return f"({', '.join([*kept, '...'])})"


def _parameter_parts(params: list[inspect.Parameter], with_defaults: bool) -> list[str]:
    P = inspect.Parameter
    parts: list[str] = []
    for i, param in enumerate(params):
        first_keyword_only = param.kind == P.KEYWORD_ONLY and (
            i == 0 or params[i - 1].kind != P.KEYWORD_ONLY
        )
        if first_keyword_only and not any(p.kind == P.VAR_POSITIONAL for p in params):
            parts.append("*")
        part = {P.VAR_POSITIONAL: "*", P.VAR_KEYWORD: "**"}.get(param.kind, "") + param.name
        if with_defaults and param.default is not P.empty:
            shown = repr(param.default)
            part += "=" + (shown if len(shown) <= MAX_DEFAULT_CHARS and "<" not in shown else "...")
        parts.append(part)
        last_positional = param.kind == P.POSITIONAL_ONLY
        if last_positional and (i + 1 == len(params) or params[i + 1].kind != P.POSITIONAL_ONLY):
            parts.append("/")
    return parts


def public_names(module: object) -> list[str]:
    """`__all__` where the module declares it, else the names it defines itself; sorted."""
    names = getattr(module, "__all__", None)
    if names is None:
        own = {module.__name__, "_" + module.__name__.rsplit(".", 1)[-1]}  # type: ignore[attr-defined]
        names = [n for n, v in vars(module).items() if getattr(v, "__module__", None) in own]
    return sorted(n for n in set(names) if not n.startswith("_"))


def members(cls: type) -> list[tuple[str, Kind, object, bool]]:
    """(name, kind, object to sign or None, whether its first parameter is self) for the public
    methods and properties a class defines itself, sorted by name."""
    found: list[tuple[str, Kind, object, bool]] = []
    for name, value in sorted(vars(cls).items()):
        if name.startswith("_"):
            continue
        if isinstance(value, staticmethod | classmethod):
            found.append((name, "method", value.__func__, isinstance(value, classmethod)))
        elif inspect.isroutine(value):
            found.append((name, "method", value, True))
        elif isinstance(value, property) or inspect.isdatadescriptor(value):
            found.append((name, "property", None, False))
    return found


def from_stdlib(obj: object) -> bool:
    """False for an object a third-party library swapped in (importing torch replaces
    inspect.getfile): its docstring is not the standard library's. The DVC stage runs in a fresh
    process, where nothing is swapped."""
    origin = getattr(obj, "__module__", None)
    return not isinstance(origin, str) or origin.split(".")[0] in sys.stdlib_module_names


def module_docs(module_name: str) -> list[ApiDoc]:
    """Every documented public function, class, method and property of one module."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated names, touched only to read their docs
        module = importlib.import_module(module_name)
        docs: list[ApiDoc] = []
        names = public_names(module)
        for name in names:
            obj = getattr(module, name, None)
            if module_name != "builtins" and getattr(obj, "__module__", None) == "builtins":
                continue  # typing.Text is str: asked about once, as builtins.str
            canonical = getattr(obj, "__name__", name)
            if (canonical != name and canonical in names) or not from_stdlib(obj):
                continue  # array.ArrayType is array.array: asked about under its own name
            if inspect.isclass(obj):
                docs.append(ApiDoc(module_name, name, "class", render_signature(obj), _doc(obj)))
                for member, kind, target, bound in members(obj):
                    if not from_stdlib(target):
                        continue
                    signature = render_signature(target, bound) if target is not None else ""
                    doc = _doc(vars(obj)[member])
                    docs.append(ApiDoc(module_name, f"{name}.{member}", kind, signature, doc))
            elif inspect.isroutine(obj):
                docs.append(ApiDoc(module_name, name, "function", render_signature(obj), _doc(obj)))
    return docs


def _doc(obj: object) -> str:
    doc = getattr(obj, "__doc__", None)
    return doc if isinstance(doc, str) else ""


def question(api: ApiDoc) -> str:
    """One of the kind's phrasings, chosen by a stable hash of the name (not Python's hash())."""
    templates = QUESTIONS[api.kind]
    digest = hashlib.sha256(f"{api.module}.{api.qualname}".encode()).digest()
    template = templates[int.from_bytes(digest[:8], "big") % len(templates)]
    return template.format(module=api.module, name=api.qualname)


def answer(api: ApiDoc, text: str) -> str:
    """The name with its signature (or the docstring's own old-style one), then the summary."""
    signature = api.signature
    if not signature and api.kind in ("function", "class", "method"):
        signature = old_style_signature(inspect.cleandoc(api.doc).split("\n\n")[0]) or ""
    return f"`{api.module}.{api.qualname}{signature}`\n\n{text}"


def qa_records(modules: tuple[str, ...] = STDLIB_MODULES) -> list[dict]:
    """One chat record per documented object, in module and name order. An object reached twice
    (a re-export), a repeated question and a summary already used are kept only the first time."""
    records: list[dict] = []
    seen_questions: set[str] = set()
    seen_summaries: set[str] = set()
    for module_name in sorted(modules):
        for api in module_docs(module_name):
            text = summary(api.doc)
            ask = question(api)
            if text is None or text in seen_summaries or ask in seen_questions:
                continue
            seen_summaries.add(text)
            seen_questions.add(ask)
            records.append(
                {
                    "messages": [
                        {"role": "user", "content": ask},
                        {"role": "assistant", "content": answer(api, text)},
                    ]
                }
            )
    return records


def write_jsonl(records: list[dict], path: Path) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def run(out: Path) -> dict:
    records = qa_records()
    write_jsonl(records, out)
    modules = len(STDLIB_MODULES)  # each gives at least one record (tests/steps/test_qa_corpus.py)
    print(f"qa_corpus: {len(records)} question-answer records from {modules} modules -> {out}")
    return {"records": len(records), "modules": modules}


def main() -> dict:
    return run(stage_arguments().out)


if __name__ == "__main__":
    run_step(main)
