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


def jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_a_different_file_of_the_same_name_needs_force(project, tmp_path):
    (tmp_path / "a").mkdir()
    first = jsonl(tmp_path / "a" / "notes.jsonl", ["first version"] * 3)
    assert data_add(project, str(first)).returncode == 0
    (tmp_path / "b").mkdir()
    second = jsonl(tmp_path / "b" / "notes.jsonl", ["second version"] * 3)
    refused = data_add(project, str(second))
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "error: data/raw/notes.jsonl: already exists with other content; rename your file, "
        "or pass --force to replace it"
    )
    assert (project / "data/raw/notes.jsonl").read_bytes() == first.read_bytes()
    assert data_add(project, str(first)).returncode == 0  # the same content again is fine
    forced = data_add(project, str(second), "--force")
    assert forced.returncode == 0, forced.stderr
    assert (project / "data/raw/notes.jsonl").read_bytes() == second.read_bytes()


def test_the_corpus_stage_output_is_never_replaced(project, tmp_path):
    mine = jsonl(tmp_path / "pydoc_topics.jsonl", ["my own topics"] * 3)
    done = data_add(project, str(mine), "--force")
    assert done.returncode == 2
    expected = "data/raw/pydoc_topics.jsonl: is the output of a stage (embedded data); rename"
    assert expected + " your file" in done.stderr


def test_a_failed_push_undoes_everything_and_prints_no_credentials(project, tmp_path):
    src = jsonl(tmp_path / "tickets.jsonl", ["reset the router"] * 3)
    params_before = (project / "params.yaml").read_bytes()
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the remote's directory should be")
    remote = f"{blocked}/remote"  # pushing there fails: its parent is a file
    done = data_add(project, str(src), "--remote", remote)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: dvc push"), done.stderr
    assert lines[0].endswith("; nothing was added")
    assert "Not a directory" in lines[0] and "Having any troubles" not in lines[0], lines[0]
    assert not (project / "data/raw/tickets.jsonl").exists()
    assert not (project / "data/raw/tickets.jsonl.dvc").exists()
    assert (project / "params.yaml").read_bytes() == params_before


def test_remote_given_again_keeps_the_configured_remote_and_its_options(project, tmp_path):
    """`--remote URL` of a remote the project configured (e.g. S3 with `endpointurl`) pushes there
    through that remote, options and all; `dvc remote add --force` under another name would have
    dropped them (tests/flows/test_object_storage.py does this against an S3 emulator)."""
    store = tmp_path / "store"
    dvc = [str(LLMPIPE.parent / "dvc"), "remote"]
    subprocess.run([*dvc, "add", "mine", str(store)], cwd=project, check=True)
    subprocess.run([*dvc, "modify", "mine", "jobs", "3"], cwd=project, check=True)
    src = jsonl(tmp_path / "tickets.jsonl", ["reset the router"] * 3)
    done = data_add(project, str(src), "--remote", f"{store}/")
    assert done.returncode == 0, done.stderr
    config = (project / ".dvc/config").read_text()
    assert "remote = mine" in config and "jobs = 3" in config, config
    assert "llmpipe" not in config, config
    assert [p for p in store.rglob("*") if p.is_file()], "nothing was pushed to the remote"


@pytest.mark.unit
def test_remote_urls_are_printed_without_credentials():
    from flows.data import without_credentials

    assert (
        without_credentials("https://bob:s3cret@dvc.example/store") == "https://dvc.example/store"
    )
    assert without_credentials("s3://bucket/path?X-Amz-Signature=abc") == "s3://bucket/path"
    assert without_credentials("/srv/dvc-remote") == "/srv/dvc-remote"
    message = "dvc push failed: unable to reach https://bob:s3cret@dvc.example/store"
    assert "s3cret" not in without_credentials(message)
