"""steps/lineage.py: DVC lock hashes and the git commit."""

from __future__ import annotations

import re
import subprocess

import pytest

from steps.lineage import dvc_lock_hash, git_sha

pytestmark = pytest.mark.unit

LOCK = """\
schema: '2.0'
stages:
  prepare:
    cmd: python -m steps.prepare
    deps:
    - path: data/raw/pydoc_topics.jsonl
      hash: md5
      md5: 0123456789abcdef0123456789abcdef
      size: 10
    - path: steps/prepare.py
      md5: ffffffffffffffffffffffffffffffff
    outs:
    - path: data/prepared
      hash: md5
      md5: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.dir
  train:
    outs:
    - path: models/tuned
      md5: bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb.dir
"""


@pytest.fixture
def lock(tmp_path):
    path = tmp_path / "dvc.lock"
    path.write_text(LOCK)
    return path


def test_dvc_lock_hash_reads_outs_and_deps(lock):
    assert dvc_lock_hash(lock, "train", "models/tuned") == "b" * 32 + ".dir"
    assert dvc_lock_hash(lock, "prepare", "data/prepared") == "a" * 32 + ".dir"
    assert (
        dvc_lock_hash(lock, "prepare", "data/raw/pydoc_topics.jsonl", "deps")
        == "0123456789abcdef0123456789abcdef"
    )


@pytest.mark.parametrize(
    ("stage", "path", "section"),
    [
        ("train", "models/other", "outs"),
        ("nope", "models/tuned", "outs"),
        ("prepare", "data/raw/pydoc_topics.jsonl", "outs"),  # a dep, asked among the outs
        ("train", "models/tuned", "deps"),
    ],
)
def test_dvc_lock_hash_unknown_is_empty(lock, stage, path, section):
    assert dvc_lock_hash(lock, stage, path, section) == ""


def test_dvc_lock_hash_without_lock(tmp_path):
    assert dvc_lock_hash(tmp_path / "dvc.lock", "train", "models/tuned") == ""
    empty = tmp_path / "empty.lock"
    empty.write_text("")
    assert dvc_lock_hash(empty, "train", "models/tuned") == ""


def git(cwd, *args):
    return subprocess.run(
        ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


@pytest.fixture
def no_outer_repo(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    for var in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_git_sha_outside_git(no_outer_repo):
    assert git_sha(no_outer_repo) == ""


def test_git_sha_in_a_fresh_repo(no_outer_repo):
    repo = no_outer_repo
    git(repo, "init", "-q")
    (repo / "a.txt").write_text("one\n")
    git(repo, "add", "a.txt")
    git(repo, "commit", "-q", "-m", "first")
    head = git(repo, "rev-parse", "HEAD")
    sha = git_sha(repo)
    assert re.fullmatch(r"[0-9a-f]{40}", sha)
    assert sha == head
    (repo / "untracked.txt").write_text("ignored\n")
    assert git_sha(repo) == head  # untracked files do not make it dirty
    (repo / "a.txt").write_text("two\n")
    assert git_sha(repo) == f"{head}-dirty"


def test_git_sha_in_a_repo_without_commits(no_outer_repo):
    git(no_outer_repo, "init", "-q")
    assert git_sha(no_outer_repo) == ""


def test_stage_lineage_reads_the_facts_the_table_declares(lock):
    from steps.lineage import stage_lineage
    from steps.params import Params

    params = Params().model_dump(by_alias=True)  # prepare.data = data/raw/pydoc_topics.jsonl
    assert stage_lineage(lock.parent, params) == {
        "base_model_hash": "",  # not in this lock: base_model has not run
        "data_hash": "0123456789abcdef0123456789abcdef",
        "model_hash": "b" * 32 + ".dir",
    }
    params["prepare"]["data"] = "data/raw/other.jsonl"
    assert stage_lineage(lock.parent, params)["data_hash"] == ""
