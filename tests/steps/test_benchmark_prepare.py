"""benchmarks/prepare.py: the generated corpus (deterministic, of the asked size, documents distinct
and unlike each other), the process-tree RSS sampler on real processes, and both arms side by side
on the tiny model. The unit tests are marked one by one: a module-wide mark would put the
side-by-side run in the unit tier too."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from benchmarks.workloads import load_benchmark
from steps.dedup import near_duplicates, shingles

bench = load_benchmark("prepare")
MIB = 2**20


def read_docs(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    """A 1 MiB corpus of seed 0."""
    path = tmp_path_factory.mktemp("corpus") / "seed0.jsonl"
    return path, bench.generate_corpus(path, MIB, seed=0)


@pytest.mark.unit
def test_corpus_is_the_same_for_a_seed_another_for_another_and_of_the_asked_size(corpus, tmp_path):
    path, facts = corpus
    assert MIB <= path.stat().st_size == facts["bytes"] <= 1.05 * MIB
    again = bench.generate_corpus(tmp_path / "again.jsonl", MIB, seed=0)
    assert (tmp_path / "again.jsonl").read_bytes() == path.read_bytes()
    assert again["documents"] == facts["documents"] == len(read_docs(path))
    bench.generate_corpus(tmp_path / "other.jsonl", MIB, seed=1)
    assert (tmp_path / "other.jsonl").read_bytes() != path.read_bytes()


@pytest.mark.unit
def test_corpus_documents_are_distinct_of_varied_length_and_share_few_5_grams(corpus):
    docs = read_docs(corpus[0])
    assert len(set(docs)) == len(docs) > 300
    sizes = sorted(len(d.encode()) for d in docs)
    assert sizes[0] >= bench.DOC_MIN - 1 and sizes[-1] <= bench.DOC_MAX + 200  # + its last word
    assert 2000 < sum(sizes) / len(sizes) < 4000 and sizes[len(sizes) // 2] < 2500  # skewed
    first, second = docs[: len(docs) // 2], docs[len(docs) // 2 :]
    seen = set().union(*(shingles(d) for d in first))
    later = set().union(*(shingles(d) for d in second))
    assert len(later & seen) / len(later) < 0.15  # measured ~0.04; the manual's halves: 0.28
    assert near_duplicates(second, first, threshold=0.8) == []  # llmpipe's dedup removes none


@pytest.mark.unit
def test_corpus_file_is_generated_once_per_size_and_seed(tmp_path):
    path, facts = bench.corpus_file(tmp_path, 1, seed=3)
    assert not facts["cached"] and path.stat().st_size == facts["bytes"]
    again, cached = bench.corpus_file(tmp_path, 1, seed=3)
    assert again == path and cached == {**facts, "cached": True}
    other, _ = bench.corpus_file(tmp_path, 1, seed=4)
    assert other != path
    assert not list(tmp_path.glob("*.partial"))


# A process holding 100 MiB that starts one holding 200 MiB: their sum is only ever seen if the
# sampler counts descendants. (bytes * n writes every page, so all of it is resident.)
GRANDCHILD = "import time; held = b'\\1' * (200 << 20); time.sleep(2)"
CHILD = (
    "import subprocess, sys; held = b'\\1' * (100 << 20); "
    f"subprocess.run([sys.executable, '-c', {GRANDCHILD!r}], check=True); print('done')"
)


@pytest.mark.unit
def test_peak_rss_is_the_sum_over_a_process_and_its_descendants(tmp_path):
    done = bench.run_measured([sys.executable, "-c", CHILD], {}, tmp_path)
    assert done.returncode == 0 and (tmp_path / "stdout.txt").read_text() == "done\n"
    # 300 MiB held together, plus two interpreters (~10 MiB each); none of it shared
    assert 300 * MIB <= done.peak_pss <= done.peak_rss < 380 * MIB


@pytest.mark.unit
def test_a_failed_process_reports_its_exit_status_and_last_stderr_lines(tmp_path):
    code = "import sys; [print(f'line {i}', file=sys.stderr) for i in range(10)]; sys.exit(3)"
    done = bench.run_measured([sys.executable, "-c", code], {}, tmp_path)
    assert done.returncode == 3
    assert done.stderr_tail == " | ".join(f"line {i}" for i in range(4, 10))


ARM_LINE = re.compile(
    r"^(run_clm|llmpipe): 1\.0 MiB in [\d.]+ s = [\d.]+ MiB/s; ([\d,]+) tokens written "
    r"\(([\d,]+) blocks of 256: train ([\d,]+), validation ([\d,]+)\); "
    r"peak RSS ([\d.]+) GiB \(PSS [\d.]+\)$"
)


@pytest.mark.integration
def test_both_arms_prepare_the_whole_corpus_and_the_checks_line_follows_the_convention(
    tiny_model_dir, tmp_path, capsys
):
    from transformers import AutoTokenizer

    argv = ["--size-mb", "1", "--model", str(tiny_model_dir), "--work", str(tmp_path)]
    assert bench.main([*argv, "--num-proc", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    arms = {m[1]: m for m in map(ARM_LINE.match, out) if m}
    assert set(arms) == {"run_clm", "llmpipe"}, out
    for m in arms.values():
        blocks = int(m[3].replace(",", ""))
        assert blocks == int(m[4].replace(",", "")) + int(m[5].replace(",", "")) > 0
        assert int(m[2].replace(",", "")) == 256 * blocks and float(m[6]) > 0
    # run_clm tokenized every document: at most one short remainder dropped per batch of 1,000
    # documents, and at 1 MiB each of the 2 splits x 2 processes is one batch
    (corpus,) = tmp_path.glob("corpus-*.jsonl")
    docs = read_docs(corpus)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    total = sum(len(ids) for ids in tokenizer(docs)["input_ids"])
    assert total - 4 * 256 < int(arms["run_clm"][2].replace(",", "")) <= total
    card = json.loads((tmp_path / "llmpipe" / "data.json").read_text())
    assert card["records_in"] == len(docs)
    assert card["exact_duplicates_removed"] == card["near_duplicates_removed_from_train"] == 0
    # each arm read and wrote through its own datasets cache, under --work
    assert any((tmp_path / "run_clm" / "hf-datasets").rglob("*.arrow"))
    assert any((tmp_path / "llmpipe" / "llmpipe-cache" / "datasets").rglob("*.arrow"))
    result = json.loads(out[-1])
    assert result["benchmark"] == "prepare"
    assert [c["name"] for c in result["checks"]] == list(bench.GOALS)
    for check in result["checks"]:
        assert check["goal"] == bench.GOALS[check["name"]] and check["ratio"] > 0
