"""docs/reliability.md cannot drift from the tests: every row names a test that exists, and every
quoted message occurs in that test or in the project code it exercises."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
MIN_ROWS = 30
MIN_FRAGMENT = 15  # a quoted message must hold a literal run at least this long
PLACEHOLDER = re.compile(r"<[^<>`]*>|…")  # <path>, <port>, … stand for what varies
CODE_SPAN = re.compile(r"``\s?(.+?)\s?``|`([^`]+)`")
NODE_ID = re.compile(r"(tests/[\w/]+\.py)::(\w+(?:::\w+)?)")


def split_cells(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip())
    return [c.strip().replace("\\|", "|") for c in cells[1:-1]]


def rows() -> list[list[str]]:
    """The table's rows: (#, fault, what happens, test)."""
    found = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("|"):
            cells = split_cells(line)
            if cells and cells[0].isdigit():
                assert len(cells) == 4, f"not 4 columns: {line}"
                found.append(cells)
    return found


def literal_strings(tree: ast.AST) -> list[str]:
    """Every string literal, f-strings cut at their placeholders, regexes also unescaped."""
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.append(node.value)
    out += [re.sub(r"\\(.)", r"\1", s) for s in out]
    return out


@cache
def parsed(path: Path) -> tuple[str, ast.Module]:
    text = path.read_text(encoding="utf-8")
    return text, ast.parse(text)


def find_function(path: Path, name: str) -> ast.FunctionDef | None:
    _, tree = parsed(path)
    scope: list[ast.stmt] = tree.body
    *classes, func = name.split("::")
    for cls in classes:
        found = next((n for n in scope if isinstance(n, ast.ClassDef) and n.name == cls), None)
        if found is None:
            return None
        scope = found.body
    return next((n for n in scope if isinstance(n, ast.FunctionDef) and n.name == func), None)


def haystack_of(path: Path, func: ast.FunctionDef) -> str:
    """The test's source with its decorators, and the module-level values it names (a table of
    cases, a script), as text and as their string literals."""
    text, tree = parsed(path)
    lines = text.splitlines()
    start = min([func.lineno, *(d.lineno for d in func.decorator_list)])
    parts = ["\n".join(lines[start - 1 : func.end_lineno])]
    names = {n.id for n in ast.walk(func) if isinstance(n, ast.Name)}
    nodes: list[ast.AST] = [func]
    for stmt in tree.body:
        targets = stmt.targets if isinstance(stmt, ast.Assign) else []
        if any(isinstance(t, ast.Name) and t.id in names for t in targets):
            parts.append(ast.get_source_segment(text, stmt) or "")
            nodes.append(stmt)
    for node in nodes:
        parts += literal_strings(node)
    return "\n".join(parts)


@cache
def code_haystack() -> str:
    """The project's code (steps/, flows/) as text and as its string literals."""
    parts = []
    for path in sorted([*ROOT.glob("steps/**/*.py"), *ROOT.glob("flows/**/*.py")]):
        text, tree = parsed(path)
        parts += [text, *literal_strings(tree)]
    return "\n".join(parts)


def fragments(quote: str) -> list[str]:
    """The literal runs of a quoted message, between its placeholders."""
    return [f.strip() for f in PLACEHOLDER.split(quote) if f.strip()]


def quotes(cell: str) -> list[str]:
    """Code spans: `text`, or ``text with `backticks` in it``."""
    return [a or b for a, b in CODE_SPAN.findall(cell)]


def test_the_table_has_enough_numbered_rows():
    found = rows()
    assert len(found) >= MIN_ROWS, f"{len(found)} rows"
    assert [int(r[0]) for r in found] == list(range(1, len(found) + 1))


def problems(row: list[str]) -> list[str]:
    """What is wrong with one row: a test that does not exist, a quote found nowhere."""
    _, fault, happens, test_cell = row
    if not (fault and happens):
        return ["an empty cell"]
    node_ids = NODE_ID.findall(test_cell)
    if not node_ids:
        return [f"no test named in {test_cell!r}"]
    found, in_tests = [], []
    for file, name in node_ids:
        path = ROOT / file
        func = find_function(path, name) if path.is_file() else None
        if func is None or not func.name.startswith("test_"):
            found.append(f"no test {file}::{name}")
        else:
            in_tests.append(haystack_of(path, func))
    tests_text = "\n".join(in_tests)
    quoted = quotes(happens)
    if not quoted:
        found.append("no message or outcome quoted in backticks")
    for quote in quoted:
        parts = fragments(quote)
        long = [f for f in parts if len(f) >= MIN_FRAGMENT]
        if long:
            missing = [f for f in long if f not in tests_text and f not in code_haystack()]
        else:  # a short term (a status, a field name): the test itself must say it
            missing = [f for f in parts if f not in tests_text]
        found += [f"{f!r} is neither in the test nor in the code" for f in missing]
    return found


@pytest.mark.parametrize("row", rows(), ids=lambda r: r[0])
def test_each_row_names_real_tests_and_quotes_what_they_assert(row):
    assert problems(row) == [], f"row {row[0]} of {DOC.name}"


def test_the_checker_catches_a_drifted_message_and_a_missing_test():
    test = (
        "tests/steps/test_disk_full.py::test_a_write_that_fills_the_disk_keeps_the_previous_output"
    )
    good = "`<path>: no space left on device; free some space there and run again`"
    assert problems(["1", "disk full", good, f"`{test}`"]) == []
    drifted = "`<path>: no space left on device; free some room and run again`"
    assert problems(["1", "disk full", drifted, f"`{test}`"]) == [
        "': no space left on device; free some room and run again' is neither in the test nor "
        "in the code"
    ]
    assert problems(["1", "disk full", good, f"`{test}_renamed`"]) == [f"no test {test}_renamed"]
    assert problems(["1", "disk full", "`HTTP 504`", f"`{test}`"]) == [
        "'HTTP 504' is neither in the test nor in the code"
    ]
    assert quotes("a ``b `c` d`` e `f`") == ["b `c` d", "f"]
