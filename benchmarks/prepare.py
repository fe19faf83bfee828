"""Data preparation at scale: the prepare stage against run_clm's tokenize + group_texts.

    python benchmarks/prepare.py [--quick] [--size-mb N] [--seed N] [--num-proc N] [--model DIR]
                                 [--work DIR]

Corpus: `--size-mb` MiB (default 1024, `--quick` 100) of JSONL, one `{"text": ...}` document per
line, generated offline from `--seed` (default 0): a word-bigram chain fitted on CPython's
reference manual (pydoc_data.topics, ~0.46 MB) walked by numpy, cut into documents of log-normal
length (median ~2.2 KB, mean ~3 KB, clipped to 200 B - 20 KB), written a chunk at a time. Its
documents are distinct and share few word 5-grams (two 1 MiB halves share ~4% of theirs; the
manual's own halves share 28%), so llmpipe's dedup does its full work and finds next to nothing.
The file is kept in `--work` when one is given, else in ~/.cache/llmpipe/benchmarks/
($LLMPIPE_CACHE), named by size, seed and a hash of the manual's text, and generated only when
absent; generating it (~9 s per 100 MiB on 2 cores) is outside both timers, and it is read once
before the arms so both find it in the page cache.
Two arms, run_clm first, each in a fresh process started by this one, with an empty datasets cache
of its own (HF_DATASETS_CACHE, and LLMPIPE_CACHE where steps.records caches what it reads),
HF_HUB_OFFLINE=1 and the environment the flow gives a stage (steps.environment's: on both sides
TOKENIZERS_PARALLELISM=false, so `--num-proc` N processes tokenize on N cores):
- run_clm: the data path of transformers' examples/pytorch/language-modeling/run_clm.py run with
  `--train_file CORPUS --block_size 256 --preprocessing_num_workers N` (no validation file, so its
  default 5% validation split), written out: load_dataset("json", data_files={"train": CORPUS}),
  its `train[:5%]` loaded as validation and `train[5%:]` as train; AutoTokenizer of the model;
  DatasetDict.map(tokenize, batched=True, num_proc=N, remove_columns=["text"]), tokenize being
  `tokenizer(batch["text"])` (input_ids and attention_mask); then .map(group_texts, batched=True,
  num_proc=N): each batch of 1,000 documents concatenated and cut into blocks of 256 (the remainder
  dropped; a batch shorter than one block raises, as run_clm's does), `labels` a copy of
  input_ids. Its output is what those maps write to the datasets cache, which is what run_clm
  trains from; it writes nothing else. (run_clm also wraps tokenize in a CaptureLogger that
  rewords the tokenizer's over-length warning: log output only, left out.)
- llmpipe: `python -m steps.prepare --params P --data CORPUS --base-model MODEL --out OUT --card
  CARD`, the prepare stage as DVC runs it, P holding `prepare: {data: CORPUS, block_size: 256,
  num_proc: N}` (other keys default): it validates every record, splits by content hash (test 15%,
  validation 5%), drops exact duplicates and train documents that nearly repeat a test one
  (MinHash over word 5-grams), tokenizes train and validation and packs them into blocks of 256
  with EOS after each document, saves those blocks and the test documents, and writes the data
  card. It does more than the baseline (records checked, split, dedup) and tokenizes less (the
  test 15% is kept as text): the throughput compares input MiB per second.
Timed on both sides: wall time from starting the arm's process to its exit, the interpreter's start,
imports and loading the tokenizer included (model loading, which is only the tokenizer here, is
timed on both sides). Peak RSS: the largest sum of the RSS of the arm's process and all its
descendants (the num_proc workers), sampled every 0.1 s by this process with psutil. Pages a forked
worker shares with its parent count once per process in that sum (each process that has imported
transformers and torch holds ~0.3 GiB), so it is an upper bound, alike on both sides; the peak sum
of PSS (a page shared by k processes counts 1/k in each), the memory the tree takes from the
machine, is printed beside it.
Tokens written: blocks x 256 (llmpipe's from the data card it writes at CARD).
Checks:
- prepare_throughput_vs_run_clm: llmpipe's input MiB/s over run_clm's (goal >= 1.0);
- prepare_peak_rss_vs_2gib: llmpipe's peak RSS over 2 GiB (goal <= 1.0); run_clm's is printed.
`--quick` reports both on 100 MiB; memory that grows with the corpus can pass there and miss at
1 GiB, so the RSS goal is the full run's to judge. `--work` (default: a temporary directory,
removed after) holds each arm's caches and outputs, emptied before each arm.
Ends with one JSON line; exits 1 only when it could not measure.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.workloads import MeasureError, print_checks  # noqa: E402  (after the path)

GOALS = {"prepare_throughput_vs_run_clm": ">=1.0", "prepare_peak_rss_vs_2gib": "<=1.0"}
ARMS = ("run_clm", "llmpipe")  # in this order
FULL_MIB, QUICK_MIB = 1024, 100
BLOCK_SIZE = 256  # tokens per block, both arms
VALIDATION_PERCENT = 5  # run_clm's validation_split_percentage default
RSS_LIMIT = 2 * 2**30  # bytes: the 2 GB
SAMPLE_S = 0.1  # seconds between RSS samples
# document lengths in bytes: log-normal with this mean and shape, clipped
DOC_MEAN, DOC_SIGMA, DOC_MIN, DOC_MAX = 3000, 0.8, 200, 20_000
CHAINS, STEPS = 512, 1024  # words walked per chunk: 512 chains x 1024 steps, ~3.4 MB of text
GENERATOR = "bigram-1"  # part of the cache name: a change to the generator must not reuse a file


# corpus ------------------------------------------------------------------------------------------


class Bigrams(NamedTuple):
    """A word-bigram chain: a text's words, and for each word the words that follow it there."""

    vocab: Any  # word id -> word (numpy object array)
    word_bytes: Any  # word id -> its UTF-8 bytes + 1 (the space after it)
    text: Any  # the text as word ids (where walks start)
    starts: Any  # the successors of word w are follow[starts[w]:starts[w + 1]]
    follow: Any


def source_text() -> str:
    """CPython's reference manual as pydoc ships it (its topics, in name order)."""
    from pydoc_data.topics import topics

    return "\n".join(topics[name] for name in sorted(topics))


def fit_bigrams(text: str) -> Bigrams:
    """Successors of each whitespace-separated word, read with the text as a loop (its last word
    is followed by its first), so every word has at least one."""
    import numpy as np

    words = text.split()
    vocab = sorted(set(words))
    index = {w: i for i, w in enumerate(vocab)}
    ids = np.fromiter((index[w] for w in words), dtype=np.int64, count=len(words))
    order = np.argsort(ids, kind="stable")
    return Bigrams(
        vocab=np.array(vocab, dtype=object),
        word_bytes=np.array([len(w.encode()) + 1 for w in vocab], dtype=np.int64),
        text=ids,
        starts=np.searchsorted(ids[order], np.arange(len(vocab) + 1)),
        follow=np.roll(ids, -1)[order],
    )


def walk(model: Bigrams, rng, chains: int, steps: int):
    """`chains` walks of `steps` words from random places in the text, one after another."""
    import numpy as np

    state = model.text[rng.integers(len(model.text), size=chains)]
    out = np.empty((steps, chains), dtype=np.int64)
    for t in range(steps):
        out[t] = state
        first = model.starts[state]
        count = model.starts[state + 1] - first
        state = model.follow[first + (rng.random(chains) * count).astype(np.int64)]
    return out.T.ravel()


def documents(model: Bigrams, words, rng) -> Iterator[str]:
    """`words` (ids) cut into documents of log-normal byte lengths: each ends with the word that
    reaches its length; the tail that does not make a whole document is dropped."""
    import numpy as np

    ends = np.cumsum(model.word_bytes[words])
    mu = np.log(DOC_MEAN) - DOC_SIGMA**2 / 2  # a log-normal's mean is exp(mu + sigma^2 / 2)
    lengths = np.clip(rng.lognormal(mu, DOC_SIGMA, int(ends[-1] // DOC_MIN) + 1), DOC_MIN, DOC_MAX)
    start, done = 0, 0  # the next document's first word; bytes before it
    for length in lengths:
        stop = int(np.searchsorted(ends, done + length)) + 1
        if stop > len(words):
            return
        yield " ".join(model.vocab[words[start:stop]])
        start, done = stop, int(ends[stop - 1])


def generate_corpus(path: Path, size: int, seed: int) -> dict:
    """Documents written to `path` as JSONL until it holds at least `size` bytes (it ends with the
    document that crosses that); one chunk of text in memory at a time."""
    import numpy as np

    start = time.perf_counter()
    model = fit_bigrams(source_text())
    rng = np.random.default_rng(seed)
    written = docs = 0
    partial = path.with_name(path.name + ".partial")  # renamed when whole: never half a corpus
    with partial.open("w", encoding="utf-8") as f:
        while written < size:
            for text in documents(model, walk(model, rng, CHAINS, STEPS), rng):
                line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode())
                docs += 1
                if written >= size:
                    break
    partial.replace(path)
    return {"bytes": written, "documents": docs, "seconds": time.perf_counter() - start}


def corpus_file(folder: Path, size_mib: int, seed: int) -> tuple[Path, dict]:
    """The corpus of `size_mib` MiB and `seed` in `folder`, generated if absent; its facts."""
    key = hashlib.sha256(f"{GENERATOR}\0{source_text()}".encode()).hexdigest()[:8]
    path = folder / f"corpus-{size_mib}mib-seed{seed}-{key}.jsonl"
    facts = path.with_suffix(".json")
    if path.is_file() and facts.is_file():
        return path, {**json.loads(facts.read_text()), "cached": True}
    folder.mkdir(parents=True, exist_ok=True)
    made = generate_corpus(path, size_mib * 2**20, seed)
    facts.write_text(json.dumps(made))
    return path, {**made, "cached": False}


def read_through(path: Path) -> None:
    """Read a file once, so both arms find it in the page cache."""
    with path.open("rb") as f:
        while f.read(1 << 24):
            pass


# measuring a process tree ------------------------------------------------------------------------


class Measured(NamedTuple):
    returncode: int
    seconds: float  # from start to exit
    peak_rss: int  # bytes: the largest sum of RSS over the process and its descendants
    peak_pss: int  # the same for PSS: a page shared by k processes counts 1/k in each
    stderr_tail: str  # its last lines of stderr, one line


def tree_memory(root) -> tuple[int, int]:
    """Bytes of RSS and of PSS of psutil process `root` and all its descendants now (0 for those
    gone; PSS as RSS where the kernel does not show it)."""
    import psutil

    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    rss = pss = 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            try:
                full = proc.memory_full_info()
                rss, pss = rss + full.rss, pss + full.pss
            except psutil.AccessDenied:
                one = proc.memory_info().rss
                rss, pss = rss + one, pss + one
    return rss, pss


def run_measured(cmd: list[str], env: dict[str, str], logs: Path) -> Measured:
    """Run `cmd` (stdout and stderr into `logs`), sampling its process tree's memory every
    SAMPLE_S."""
    import psutil

    logs.mkdir(parents=True, exist_ok=True)
    with (logs / "stdout.txt").open("w") as out, (logs / "stderr.txt").open("w") as err:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err)
        root, peak_rss, peak_pss = psutil.Process(child.pid), 0, 0
        while True:
            rss, pss = tree_memory(root)
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            try:
                child.wait(timeout=SAMPLE_S)
                break
            except subprocess.TimeoutExpired:
                continue
        seconds = time.perf_counter() - start
    lines = [s for s in (logs / "stderr.txt").read_text(errors="replace").splitlines() if s.strip()]
    return Measured(child.returncode, seconds, peak_rss, peak_pss, " | ".join(lines[-6:]))


# the arms ----------------------------------------------------------------------------------------


def run_clm(spec: dict) -> dict:
    """run_clm.py's data path (see the module docstring); blocks per split and phase seconds."""
    from itertools import chain

    from datasets import load_dataset
    from transformers import AutoTokenizer

    clock, phases = time.perf_counter, {}
    start = clock()
    files = {"train": spec["corpus"]}
    raw = load_dataset("json", data_files=files)
    raw["validation"] = load_dataset(
        "json", data_files=files, split=f"train[:{VALIDATION_PERCENT}%]"
    )
    raw["train"] = load_dataset("json", data_files=files, split=f"train[{VALIDATION_PERCENT}%:]")
    phases["load_dataset"], start = clock() - start, clock()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    phases["tokenizer"], start = clock() - start, clock()
    columns = list(raw["train"].features)
    text_column = "text" if "text" in columns else columns[0]
    block_size = min(spec["block_size"], tokenizer.model_max_length)

    def tokenize(batch: dict) -> Any:
        return tokenizer(batch[text_column])

    def group_texts(batch: dict) -> dict:
        joined = {k: list(chain(*v)) for k, v in batch.items()}
        total = len(joined[next(iter(batch))])
        if total < block_size:
            raise ValueError(f"block_size of {block_size} is too big - use a value <={total}")
        total = total // block_size * block_size
        blocks = {
            k: [t[i : i + block_size] for i in range(0, total, block_size)]
            for k, t in joined.items()
        }
        blocks["labels"] = blocks["input_ids"].copy()
        return blocks

    n = spec["num_proc"]
    tokenized = raw.map(tokenize, batched=True, num_proc=n, remove_columns=columns)
    phases["tokenize"], start = clock() - start, clock()
    grouped = tokenized.map(group_texts, batched=True, num_proc=n)
    phases["group_texts"] = clock() - start
    return {"blocks": {name: len(split) for name, split in grouped.items()}, "phases": phases}


def arm_env(arm_dir: Path) -> dict[str, str]:
    """The flow's stage environment, offline, with empty datasets caches of the arm's own."""
    from steps.environment import quiet_offline_env

    env = quiet_offline_env()
    for name in ("MLFLOW_RUN_ID", "LLMPIPE_OUTCOME", "LLMPIPE_PROFILE_DIR"):
        env.pop(name, None)  # never log into a flow's run, write an outcome or profile
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(arm_dir / "hf-datasets"),
        LLMPIPE_CACHE=str(arm_dir / "llmpipe-cache"),
    )
    return env


def llmpipe_command(corpus: Path, model: Path, num_proc: int, arm_dir: Path) -> list[str]:
    """The prepare stage's command, with a params.yaml of its own in `arm_dir`."""
    import yaml

    prepare = {"data": str(corpus), "block_size": BLOCK_SIZE, "num_proc": num_proc}
    params = arm_dir / "params.yaml"
    params.write_text(yaml.safe_dump({"prepare": prepare}, sort_keys=False))
    return [
        *(sys.executable, "-m", "steps.prepare", "--params", str(params), "--data", str(corpus)),
        *("--base-model", str(model), "--out", str(arm_dir / "prepared")),
        *("--card", str(arm_dir / "data.json")),
    ]


def run_arm(arm: str, corpus: Path, model: Path, num_proc: int, work: Path) -> dict:
    """One arm in a fresh process tree: its time, peak RSS and blocks written."""
    arm_dir = work / arm
    shutil.rmtree(arm_dir, ignore_errors=True)  # a fresh cache: nothing from an earlier run
    arm_dir.mkdir(parents=True)
    if arm == "llmpipe":
        cmd = llmpipe_command(corpus, model, num_proc, arm_dir)
    else:
        spec = {"corpus": str(corpus), "model": str(model), "num_proc": num_proc}
        (arm_dir / "spec.json").write_text(json.dumps({**spec, "block_size": BLOCK_SIZE}))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--arm", arm]
        cmd += ["--spec", str(arm_dir / "spec.json"), "--result", str(arm_dir / "result.json")]
    os.sync()  # the previous arm's writes reach the disk outside this arm's timer
    print(f"running the {arm} arm ...", flush=True)
    done = run_measured(cmd, arm_env(arm_dir), arm_dir)
    result_file = arm_dir / ("data.json" if arm == "llmpipe" else "result.json")
    if done.returncode != 0 or not result_file.is_file():
        raise MeasureError(f"the {arm} arm failed (exit {done.returncode}): {done.stderr_tail}")
    result = {"seconds": done.seconds, "peak_rss": done.peak_rss, "peak_pss": done.peak_pss}
    if arm == "llmpipe":
        card = json.loads(result_file.read_text())
        result["card"] = card
        result["blocks"] = {s: card["splits"][s]["blocks"] for s in ("train", "validation")}
    else:
        result.update(json.loads(result_file.read_text()))
    return result


# report ------------------------------------------------------------------------------------------


def report(results: dict, mib: float, num_proc: int) -> None:
    """Per arm: time, throughput, tokens, memory; run_clm's phases; llmpipe's data card."""
    for arm, r in results.items():
        blocks = sum(r["blocks"].values())
        print(
            f"{arm}: {mib:.1f} MiB in {r['seconds']:.1f} s = {mib / r['seconds']:.2f} MiB/s; "
            f"{blocks * BLOCK_SIZE:,} tokens written ({blocks:,} blocks of {BLOCK_SIZE}: "
            + ", ".join(f"{s} {n:,}" for s, n in r["blocks"].items())
            + f"); peak RSS {r['peak_rss'] / 2**30:.2f} GiB (PSS {r['peak_pss'] / 2**30:.2f})"
        )
        if "phases" in r:
            print("  " + ", ".join(f"{p} {s:.1f} s" for p, s in r["phases"].items()))
    card = results["llmpipe"]["card"]
    split = card["splits"]
    print(
        f"  data card: {card['records_in']:,} records in, {card['exact_duplicates_removed']} "
        f"exact and {card['near_duplicates_removed_from_train']} near duplicates removed; "
        f"train {split['train']['records']:,} records / {split['train']['tokens']:,} tokens, "
        f"validation {split['validation']['records']:,} / {split['validation']['tokens']:,}, "
        f"test {split['test']['records']:,} records kept as text"
    )


@contextlib.contextmanager
def work_dir(arg: Path | None) -> Iterator[Path]:
    """--work (kept), else a temporary directory removed after; absolute (the arms run in the
    repository)."""
    if arg is not None:
        arg.mkdir(parents=True, exist_ok=True)
        yield arg.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.train import resolve_model
    from steps.environment import cache_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"a {QUICK_MIB} MiB corpus")
    parser.add_argument("--size-mb", type=int, help=f"corpus MiB ({FULL_MIB}, quick {QUICK_MIB})")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed (0)")
    parser.add_argument("--num-proc", type=int, help="processes, both arms (the CPU count)")
    parser.add_argument("--model", help="model directory (default: the embedded SmolLM2-135M)")
    parser.add_argument("--work", type=Path, help="caches, outputs, the corpus (a temp dir)")
    parser.add_argument("--arm", choices=("run_clm",), help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.arm:
        args.result.write_text(json.dumps(run_clm(json.loads(args.spec.read_text()))))
        return 0
    size_mib = args.size_mb or (QUICK_MIB if args.quick else FULL_MIB)
    num_proc = args.num_proc or os.cpu_count() or 1
    if size_mib < 1 or num_proc < 1:
        parser.error("--size-mb and --num-proc must be at least 1")
    try:
        model = resolve_model(args.model).resolve()
        with work_dir(args.work) as work:
            folder = work if args.work else cache_dir().resolve() / "benchmarks"
            corpus, facts = corpus_file(folder, size_mib, args.seed)
            how = "found in the cache" if facts["cached"] else "generated"
            print(
                f"corpus {corpus}: {facts['bytes'] / 2**20:.1f} MiB, {facts['documents']:,} "
                f"documents ({how}; generating took {facts['seconds']:.1f} s)"
            )
            read_through(corpus)
            results = {arm: run_arm(arm, corpus, model, num_proc, work) for arm in ARMS}
    except MeasureError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"model {model}; {num_proc} processes per arm; blocks of {BLOCK_SIZE}")
    mib = facts["bytes"] / 2**20
    report(results, mib, num_proc)
    ours, theirs = results["llmpipe"], results["run_clm"]
    ratios = {
        "prepare_throughput_vs_run_clm": theirs["seconds"] / ours["seconds"],  # same MiB in
        "prepare_peak_rss_vs_2gib": ours["peak_rss"] / RSS_LIMIT,
    }
    print_checks("prepare", ratios, GOALS)
    return 0


if __name__ == "__main__":
    from benchmarks.workloads import run_benchmark

    run_benchmark(main)
