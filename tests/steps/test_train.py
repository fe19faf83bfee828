"""steps/train.py: collator, precision, fingerprint, threads, a 30-step run of the tiny model."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.workloads import SAMPLE_TEXT
from steps.params import PrepareParams, TrainParams
from steps.train import causal_lm_batch, run_fingerprint, train

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def test_causal_lm_batch_labels_are_a_copy_of_inputs():
    batch = causal_lm_batch([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5, 6]}])
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert batch["labels"].data_ptr() != batch["input_ids"].data_ptr()
    batch["labels"][0, 0] = -100
    assert batch["input_ids"][0, 0].item() == 1


def test_run_fingerprint_tracks_params_data_and_base(tmp_path):
    data, base = tmp_path / "data", tmp_path / "base"
    data.mkdir()
    base.mkdir()
    params = TrainParams()
    fp = run_fingerprint(params, data, base)
    assert len(fp) == 12
    assert int(fp, 16) >= 0
    assert run_fingerprint(TrainParams(), data, base) == fp
    assert run_fingerprint(TrainParams(max_steps=params.max_steps + 1), data, base) != fp
    assert run_fingerprint(TrainParams(learning_rate=0.5), data, base) != fp
    (data / "stats.json").write_text('{"a": 1}')
    with_stats = run_fingerprint(params, data, base)
    assert with_stats != fp
    (base / "config.json").write_text("{}")
    assert run_fingerprint(params, data, base) not in (fp, with_stats)


def outputs(root):
    """train()'s output paths (model, metrics, loss curve, checkpoints) under `root`."""
    return root / "tuned", root / "metrics/train.json", root / "metrics/loss.csv", root / "ckpt"


def test_train_requires_prepared_data(tmp_path, tiny_model_dir):
    from steps.errors import UserError

    with pytest.raises(UserError, match="run the prepare stage first"):
        train(TrainParams(), tiny_model_dir, tmp_path / "missing", *outputs(tmp_path))


def test_train_end_to_end(tmp_path, monkeypatch, tiny_model_dir, tiny_model):
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steps.metrics.corpus_perplexity import score_texts
    from steps.prepare import prepare

    rng = random.Random(0)
    docs = [f"{i}: " + " ".join(rng.sample(SAMPLE_TEXT, 2)) for i in range(60)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    data_dir, out_dir = tmp_path / "prepared", tmp_path / "tuned"
    base_tok = tiny_model[1]
    prep = PrepareParams(block_size=32, test_fraction=0.2, validation_fraction=0.1)
    prepare(prep, corpus, base_tok, data_dir)
    params = TrainParams(
        max_steps=30, learning_rate=3e-3, batch_size=2, gradient_accumulation_steps=2,
        save_steps=10, warmup_ratio=0.0,
    )  # fmt: skip
    fingerprint = run_fingerprint(params, data_dir, tiny_model_dir)

    metrics = train(params, tiny_model_dir, data_dir, *outputs(tmp_path))

    files = {p.name for p in out_dir.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tuned")]
    on_disk = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert not list((tmp_path / "metrics").glob(".*"))  # no temporary files left behind
    assert on_disk == pytest.approx(metrics)
    assert on_disk["steps"] == 30
    assert on_disk["tokens_seen"] == 30 * 2 * 2 * 32  # steps x micro-batch x micro-batches x block
    assert "eval_loss" in on_disk
    assert len(load_from_disk(str(data_dir / "validation"))) > 0

    with (tmp_path / "metrics" / "loss.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 30  # logging_steps = max(1, 30 // 50)
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])

    assert not (tmp_path / "ckpt" / f"train-{fingerprint}").exists()
    assert not list((tmp_path / "ckpt").glob("train-*"))

    texts = docs[:20]
    tuned = AutoModelForCausalLM.from_pretrained(out_dir, use_safetensors=True)
    tuned_tok = AutoTokenizer.from_pretrained(out_dir)
    assert tuned_tok(texts[0])["input_ids"] == base_tok(texts[0])["input_ids"]
    base_ppl = score_texts(tiny_model[0], base_tok, texts, 64, 32)["perplexity"]
    tuned_ppl = score_texts(tuned, tuned_tok, texts, 64, 32)["perplexity"]
    assert tuned_ppl < 0.8 * base_ppl
    shutil.rmtree(out_dir)


def test_training_threads_honour_omp_num_threads_else_share_the_cores():
    """A user's OMP_NUM_THREADS (a shared machine, parallel jobs) is what a training process
    uses, alone or as one of several ranks; without it, every core shared among the machine's
    processes. Fresh interpreters: torch reads the variable at start."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}

    def threads(local_world: int, **extra) -> int:
        script = f"from steps.distributed import share_cpu_threads as s; print(s({local_world}))"
        out = subprocess.run([sys.executable, "-c", script], env={**env, **extra},
                             cwd=REPO, capture_output=True, text=True, check=True)  # fmt: skip
        return int(out.stdout.split()[-1])

    cores = os.cpu_count() or 1
    assert threads(1, OMP_NUM_THREADS="1") == 1
    assert threads(2, OMP_NUM_THREADS="2") == min(2, cores)  # torch keeps to the cores
    assert threads(1) == cores
    assert threads(2) == max(1, cores // 2)
