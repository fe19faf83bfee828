"""CUDA checks: bf16 training and GPU scoring. Skipped without a CUDA device (CI, laptops)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DOCS = [f"Document {i}: the for statement iterates over item {i} of a sequence." for i in range(80)]


def test_auto_precision_trains_in_bf16_and_saves_fp32(tmp_path, monkeypatch, tiny_model_dir):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from steps.params import PrepareParams, TrainParams
    from steps.prepare import prepare
    from steps.train import train, training_arguments, use_bf16

    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prepare(PrepareParams(block_size=32), tmp_path / "docs.jsonl", tokenizer, tmp_path / "prepared")
    params = TrainParams(
        max_steps=30,
        learning_rate=3e-3,
        batch_size=8,
        gradient_accumulation_steps=1,
        warmup_ratio=0.0,
    )
    assert use_bf16("auto") == torch.cuda.is_bf16_supported()
    assert training_arguments(params, tmp_path / "ckpt").bf16 == torch.cuda.is_bf16_supported()
    outs = (tmp_path / "tuned", tmp_path / "train.json", tmp_path / "loss.csv", tmp_path / "ckpt")
    metrics = train(params, tiny_model_dir, tmp_path / "prepared", *outs)
    losses = [float(r.split(",")[1]) for r in (tmp_path / "loss.csv").read_text().split()[1:]]
    assert losses[-1] < losses[0]
    assert metrics["steps"] == 30
    with safe_open(tmp_path / "tuned/model.safetensors", "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())  # noqa: SIM118 (safe_open has no __iter__)


def test_cuda_scoring_matches_cpu(tiny_model_dir):
    from steps.metrics.corpus_perplexity import load_causal_lm, score_texts

    texts = DOCS[:12]
    cpu = score_texts(*load_causal_lm(str(tiny_model_dir), "cpu"), texts, window=16, stride=8)
    gpu = score_texts(*load_causal_lm(str(tiny_model_dir), "cuda"), texts, window=16, stride=8)
    assert gpu["tokens"] == cpu["tokens"]
    assert gpu["perplexity"] == pytest.approx(cpu["perplexity"], rel=2e-2)  # bf16 autocast
