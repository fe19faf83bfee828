"""`llmpipe data add`: real DVC in a throwaway project; bad files are rejected without a trace."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.workloads import make_project

pytestmark = pytest.mark.integration

LLMPIPE = Path(sys.executable).parent / "llmpipe"


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPIPE_CACHE", str(tmp_path / "cache"))
    return make_project(tmp_path / "project", {})


def data_add(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LLMPIPE, "data", "add", *args], cwd=project, text=True,
                          capture_output=True, timeout=120)  # fmt: skip


def test_add_tracks_pushes_and_points_the_pipeline_at_the_file(project, tmp_path):
    src = tmp_path / "support.jsonl"
    src.write_text(
        "".join(json.dumps({"text": f"ticket {i}: reset the router"}) + "\n" for i in range(5))
    )
    done = data_add(project, str(src))
    assert done.returncode == 0, done.stderr
    assert "5 documents" in done.stdout
    meta = yaml.safe_load((project / "data/raw/support.jsonl.dvc").read_text())["outs"][0]
    assert (project / "data/raw/support.jsonl").read_bytes() == src.read_bytes()
    remote = tmp_path / "cache" / "dvc-remote"
    pushed = [p for p in remote.rglob("*") if p.is_file()]
    assert any(meta["md5"][2:] in p.name or meta["md5"] in str(p) for p in pushed), pushed
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["prepare"]["data"] == "data/raw/support.jsonl"
    assert "/support.jsonl" in (project / "data/raw/.gitignore").read_text()


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("missing.jsonl", None, r"missing\.jsonl: no such file"),
        ("empty.txt", b"\n\n   \n", r"empty\.txt: the corpus is empty"),
        ("blob.txt", b"PK\x03\x04\x00\x00binary", r"blob\.txt: looks binary"),
        ("latin1.txt", "caf\u00e9 cr\u00e8me\n".encode("latin-1"), r"latin1\.txt:1: not UTF-8"),
        (
            "bad.jsonl",
            b'{"text": "ok"}\n{"text": "fine"}\n{broken\n',
            r"bad\.jsonl:3: not valid JSON",
        ),
        ("notes.csv", b"a,b\n", r"notes\.csv: unsupported file type"),
    ],
)
def test_bad_files_are_rejected_in_one_line_and_leave_no_trace(
    project, tmp_path, name, content, expected
):
    import re

    src = tmp_path / name
    if content is not None:
        src.write_bytes(content)
    params_before = (project / "params.yaml").read_bytes()
    done = data_add(project, str(src))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(expected, lines[0]), done.stderr
    assert not list((project / "data/raw").glob(f"{name}*"))
    assert (project / "params.yaml").read_bytes() == params_before
