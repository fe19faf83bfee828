"""steps/outputs.py: atomic directories and JSON files."""

from __future__ import annotations

import json

import pytest

from steps.outputs import atomic_dir, write_json

pytestmark = pytest.mark.unit


def snapshot(root):
    return {str(p.relative_to(root)): p.read_text() for p in root.rglob("*") if p.is_file()}


def test_atomic_dir_creates_on_success(tmp_path):
    final = tmp_path / "sub" / "out"
    with atomic_dir(final) as tmp:
        assert tmp.is_dir()
        assert tmp.parent == final.parent
        assert not final.exists()
        (tmp / "a.txt").write_text("new")
    assert snapshot(final) == {"a.txt": "new"}
    assert sorted(p.name for p in final.parent.iterdir()) == ["out"]


def test_atomic_dir_replaces_old_directory_on_success(tmp_path):
    final = tmp_path / "out"
    (final / "deep").mkdir(parents=True)
    (final / "old.txt").write_text("old")
    (final / "deep" / "x").write_text("x")
    with atomic_dir(final) as tmp:
        (tmp / "new.txt").write_text("new")
        assert snapshot(final) == {"old.txt": "old", "deep/x": "x"}  # untouched until the end
    assert snapshot(final) == {"new.txt": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_dir_keeps_old_directory_when_the_block_raises(tmp_path, exc):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(exc), atomic_dir(final) as tmp:
        (tmp / "half.txt").write_text("half")
        raise exc()
    assert snapshot(final) == {"old.txt": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_failure_without_old_directory_leaves_nothing(tmp_path):
    with pytest.raises(ValueError), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("a")
        raise ValueError
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_clears_a_stale_temp_dir(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        stale = tmp
    stale.mkdir()
    (stale / "stale.txt").write_text("stale")
    with atomic_dir(final) as tmp:
        assert tmp == stale
        assert list(tmp.iterdir()) == []
        (tmp / "b").write_text("b")
    assert snapshot(final) == {"b": "b"}


def test_write_json_round_trips(tmp_path):
    data = {"b": [1, 2.5, None, True], "a": {"ü": "naïve", "n": -3}, "s": ""}
    path = tmp_path / "deep" / "m.json"
    write_json(path, data)
    assert json.loads(path.read_text(encoding="utf-8")) == data
    assert path.read_text().endswith("}\n")
    assert list(json.loads(path.read_text())) == ["a", "b", "s"]  # sorted keys, stable diffs
    write_json(path, {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.json"]
