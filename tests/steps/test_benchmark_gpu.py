"""benchmarks/gpu.py's arithmetic, checked without a GPU: the FLOPs it credits per token count
every Linear layer of the model it measures, the output head included, once."""

from __future__ import annotations

import pytest

from benchmarks.workloads import SMOLLM2_135M, TINY_LLAMA, load_benchmark

pytestmark = pytest.mark.unit

bench = load_benchmark("gpu")


@pytest.mark.parametrize("shape", [SMOLLM2_135M, {**TINY_LLAMA, "vocab_size": 64}])
def test_flops_per_token_count_every_linear_weight_once(shape):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    block = 2048
    attention = 12 * config.num_hidden_layers * config.hidden_size * block
    assert bench.flops_per_token(config, block) == 6 * linear + attention
    if shape is SMOLLM2_135M:  # the figure the H200 run printed: 1.232 GFLOP per token
        assert round(bench.flops_per_token(config, block) / 1e9, 3) == 1.232


def test_the_checks_line_follows_the_convention():
    assert bench.verdict(0.294, bench.GOALS["mfu_best"]) == "MISSED"
    assert bench.verdict(0.398, bench.GOALS["qlora_vs_lora_peak_memory"]) == "met"
    assert all(goal[:2] in (">=", "<=") for goal in bench.GOALS.values())
