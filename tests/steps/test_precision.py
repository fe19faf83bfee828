"""steps/precision.py: when `auto` means bf16 autocast, and the Trainer arguments it becomes."""

from __future__ import annotations

import pytest
import torch

from steps import precision
from steps.params import TrainParams
from steps.train import training_arguments

pytestmark = pytest.mark.unit


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Set what the CPU probes report: native bf16 or not."""

    def set_native(avx512_bf16: bool, amx: bool = False) -> None:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)

    return set_native


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"),
    [(True, False, True), (False, True, True), (False, False, False)],
)
def test_auto_is_bf16_on_a_cpu_with_native_bf16_only(cpu_bf16, avx512_bf16, amx, expected):
    cpu_bf16(avx512_bf16, amx)
    assert precision.bf16_autocast("cpu") is expected
    assert precision.label("cpu") == ("bf16-autocast" if expected else "fp32")
    assert precision.bf16_autocast("cpu", "fp32") is False
    assert precision.bf16_autocast("cpu", "bf16") is True
    assert precision.bf16_autocast("mps") is False  # no native-bf16 rule for other devices


def test_a_torch_without_the_probes_stays_fp32(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert precision.cpu_has_native_bf16() is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rule; tests/gpu covers CUDA")
@pytest.mark.parametrize("native", [True, False])
def test_training_arguments_follow_the_rule_on_cpu(cpu_bf16, tmp_path, native):
    cpu_bf16(native)
    args = training_arguments(TrainParams(), tmp_path)
    assert args.bf16 is native and args.use_cpu is native  # the Trainer needs use_cpu for bf16
    forced = training_arguments(TrainParams(precision="fp32"), tmp_path)
    assert forced.bf16 is False and forced.use_cpu is False
