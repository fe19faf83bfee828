"""CUDA checks of train.method lora and qlora on the tiny model. Skipped without a CUDA device;
qlora also needs bitsandbytes (pip install 'llmpipe[qlora]')."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DOCS = [f"Document {i}: the for statement iterates over item {i} of a sequence." for i in range(80)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_dir):
    from transformers import AutoTokenizer

    from steps.params import PrepareParams
    from steps.prepare import prepare

    root = tmp_path_factory.mktemp("lora-cuda")
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prepare(PrepareParams(block_size=32), root / "docs.jsonl", tokenizer, root / "prepared")
    return root / "prepared"


def run(method: str, tmp_path, prepared, tiny_model_dir) -> dict:
    from steps.params import TrainParams
    from steps.train import train

    params = TrainParams(
        method=method,
        max_steps=30,
        learning_rate=1e-2,
        batch_size=8,
        gradient_accumulation_steps=1,
        warmup_ratio=0.0,
        lora_r=8,
    )
    outs = (tmp_path / "tuned", tmp_path / "train.json", tmp_path / "loss.csv", tmp_path / "ckpt")
    return train(params, tiny_model_dir, prepared, *outs)


def check_merged_standalone(tmp_path, tiny_model_dir) -> None:
    """The out dir is a plain fp32 model (the base's dtype, no quantisation) that beats the base."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steps.metrics.corpus_perplexity import score_texts

    tuned = tmp_path / "tuned"
    losses = [float(r.split(",")[1]) for r in (tmp_path / "loss.csv").read_text().split()[1:]]
    assert sum(losses[-5:]) < sum(losses[:5])
    assert "quantization_config" not in json.loads((tuned / "config.json").read_text())
    with safe_open(tuned / "model.safetensors", "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())  # noqa: SIM118 (safe_open has no __iter__)
    assert {p.name for p in (tuned / "adapter").iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True)
    merged = AutoModelForCausalLM.from_pretrained(tuned, use_safetensors=True)
    texts = DOCS[:20]
    base_ppl = score_texts(base, tokenizer, texts, 64, 32)["perplexity"]
    assert score_texts(merged, tokenizer, texts, 64, 32)["perplexity"] < base_ppl


def test_lora_on_cuda_trains_and_saves_a_merged_fp32_model(tmp_path, prepared, tiny_model_dir):
    metrics = run("lora", tmp_path, prepared, tiny_model_dir)
    assert metrics["method"] == "lora" and metrics["steps"] == 30
    check_merged_standalone(tmp_path, tiny_model_dir)


def test_qlora_trains_on_a_4bit_base_and_merges_into_the_unquantised_base(
    tmp_path, prepared, tiny_model_dir
):
    pytest.importorskip("bitsandbytes")
    lora_metrics = run("lora", tmp_path / "lora", prepared, tiny_model_dir)
    metrics = run("qlora", tmp_path, prepared, tiny_model_dir)
    assert metrics["method"] == "qlora" and metrics["steps"] == 30
    # peft counts a 4-bit weight at its unpacked size: the same counts as lora's
    assert metrics["trainable_parameters"] == lora_metrics["trainable_parameters"]
    assert metrics["total_parameters"] == lora_metrics["total_parameters"]
    check_merged_standalone(tmp_path, tiny_model_dir)
