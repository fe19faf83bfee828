"""The precision training and scoring compute in: bf16 autocast where the hardware multiplies bf16
natively, float32 elsewhere.

    train.precision: auto       # params.yaml: steps.train follows it
    evaluate.precision: auto    # params.yaml: every perplexity llmpipe scores follows it

`auto` means bf16 autocast (weights stay float32; matrix products run in bf16, reductions and the
loss in float32) on a CUDA device that supports bf16, and on a CPU with AVX512-BF16 or AMX, whose
bf16 dot-product instructions run at twice float32's rate. Measured on 2 cores of an AMD EPYC with
AVX512-BF16 (benchmarks/precision.py): SmolLM2-135M trains ~1.5x and scores ~1.45x as fast
as in float32, to the same loss within 0.1%. A CPU without them emulates bf16 and is slower than
float32, so `auto` stays float32 there. `fp32` and `bf16` force one or the other anywhere.
"""

from __future__ import annotations

from typing import Literal

Precision = Literal["auto", "fp32", "bf16"]


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX on this CPU (torch's own probes of the instruction set)."""
    import torch

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    return False


def bf16_autocast(device_type: str, precision: Precision = "auto") -> bool:
    """Whether to compute under bf16 autocast on a device of this type at this precision."""
    if precision != "auto":
        return precision == "bf16"
    if device_type == "cuda":
        import torch

        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device_type == "cpu" and cpu_has_native_bf16()


def training_bf16(precision: Precision = "auto") -> bool:
    """Whether training on this machine's device (CUDA when visible, else CPU) runs under bf16
    autocast."""
    import torch

    return bf16_autocast("cuda" if torch.cuda.is_available() else "cpu", precision)


def label(device_type: str, precision: Precision = "auto") -> str:
    """How a score was computed, as the registry records it ('bf16-autocast' or 'fp32')."""
    return "bf16-autocast" if bf16_autocast(device_type, precision) else "fp32"
