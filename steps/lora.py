"""LoRA and QLoRA through peft: checks that run before any compute, the wrapped model, the merge.

    python -m steps.train ...    # with train.method: lora | qlora in params.yaml (the DVC stage)

lora trains low-rank adapters beside the frozen base weights; qlora does the same on a base loaded
in 4-bit nf4 (bitsandbytes, CUDA only). Either way the stage's output is a plain transformers model:
the trained adapter merged into the unquantised base, in the base's own dtype, so evaluation,
registration and `mlflow models serve` see no peft at all; the adapter alone is kept beside it.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from steps.errors import UserError
from steps.params import TrainParams

ALL_LINEAR = "all-linear"  # peft's shorthand: every Linear of the attention and MLP blocks, no head
QLORA_EXTRA = "pip install 'llmpipe[qlora]' (bitsandbytes>=0.43)"


def check_method(params: TrainParams) -> None:
    """qlora needs a CUDA GPU and bitsandbytes; say so in one line before anything loads."""
    if params.method != "qlora":
        return
    if not torch.cuda.is_available():
        raise UserError(
            "train.method: qlora needs a CUDA GPU (4-bit bitsandbytes); none is visible here; "
            "use train.method: lora"
        )
    try:
        importlib.import_module("bitsandbytes")
    except ImportError as err:
        raise UserError(
            f"train.method: qlora needs bitsandbytes, which does not import here ({err}); "
            f"{QLORA_EXTRA}, or use train.method: lora"
        ) from None


def target_modules(params: TrainParams) -> str | list[str]:
    """'all-linear', or the module names to adapt: a list, or one string of comma-separated names
    (so `-S train.lora_target_modules=q_proj,v_proj` works)."""
    targets = params.lora_target_modules
    if isinstance(targets, str):
        if targets.strip() == ALL_LINEAR:
            return ALL_LINEAR
        targets = targets.split(",")
    return [name.strip() for name in targets if name.strip()]


def meta_model(config_dir: str | Path) -> torch.nn.Module:
    """The model of `config_dir`'s config.json on the meta device: its modules, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Dotted names of the model's Linear layers (4-bit ones included: they subclass Linear)."""
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def check_targets(model_or_config_dir: torch.nn.Module | str | Path, params: TrainParams) -> None:
    """Reject target module names the model lacks, before any compute. A name matches a Linear
    layer whose dotted name is it or ends with `.name`, as peft matches it."""
    if params.method == "full":
        return
    targets = target_modules(params)
    if targets == ALL_LINEAR:
        return
    model = model_or_config_dir
    if not isinstance(model, torch.nn.Module):
        model = meta_model(model)
    names = linear_module_names(model)
    has = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in names}))
    if not targets:
        raise UserError(f"train.lora_target_modules: empty; give {ALL_LINEAR} or some of: {has}")
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        raise UserError(
            f"train.lora_target_modules: the model has no Linear layer named "
            f"{', '.join(missing)}; its Linear layers: {has} (or use {ALL_LINEAR})"
        )


def load_base(base_dir: str | Path, four_bit: bool = False):
    """The base model from safetensors: in its own dtype, or (four_bit) quantised to nf4 with
    bf16 compute on the current CUDA device, as QLoRA trains it."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not four_bit:
        return AutoModelForCausalLM.from_pretrained(base_dir, use_safetensors=True)
    nf4 = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,  # quantises the scales too: ~0.4 bit per weight less
    )
    return AutoModelForCausalLM.from_pretrained(
        base_dir,
        use_safetensors=True,
        quantization_config=nf4,
        device_map={"": torch.cuda.current_device()},
    )


def wrap(model, params: TrainParams):
    """The peft model that trains LoRA adapters on `model` (frozen). For qlora `model` is the
    4-bit base, prepared by peft: norms in fp32, gradient checkpointing on (memory is why one
    picks qlora)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if params.method == "qlora":
        model = prepare_model_for_kbit_training(model)
    config = LoraConfig(
        r=params.lora_r,
        lora_alpha=params.lora_alpha,
        lora_dropout=params.lora_dropout,
        target_modules=target_modules(params),
        bias="none",
        task_type="CAUSAL_LM",
    )
    # lora_A's random init is drawn from train.seed, so a rerun and a resumed run start from the
    # same adapter (the Trainer seeds only after the model exists); the global RNG is left as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        return get_peft_model(model, config)


def frozen_bases_to_bf16(peft_model) -> int:
    """Store the frozen weights under the adapters in bf16 (for training under bf16 autocast
    only: outside autocast a float32 input no longer matches them); returns how many were cast.

    Training under bf16 autocast multiplies them in bf16 anyway: autocast casts each one to bf16
    on every forward pass (a copy of the model's Linear weights per micro-batch, ~7% of a step of
    SmolLM2-135M on 2 CPU cores) and keeps the float32 original besides. Cast once, the products
    are the same to the bit (the same round-to-nearest cast) and the weights take half the memory.
    Only the adapted Linear layers' own weights: embeddings, norms and a head tied to the
    embeddings are read outside a matrix product too, so they keep their dtype. The adapters and
    the merged model (steps.lora.merge reloads the base from disk) are untouched.

    The same layers stop peft casting their input to the adapters' float32 (its
    `cast_input_dtype_enabled`): a bf16 input (o_proj's and down_proj's) was copied to float32
    and, inside the autocast adapter product, straight back to bf16: two copies forward and two
    backward per layer, for the same bf16 product (bf16 -> float32 -> bf16 is exact).
    """
    from peft.tuners.lora import LoraLayer

    cast = 0
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = False
            base = module.get_base_layer()
            if isinstance(base, torch.nn.Linear) and base.weight.dtype == torch.float32:
                base.weight.data = base.weight.data.to(torch.bfloat16)
                cast += 1
    return cast


def load_checkpoint_adapter(model, checkpoint: Path) -> None:
    """Load the adapter a Trainer checkpoint holds into the peft `model` (built on the base)."""
    result = model.load_adapter(str(checkpoint), model.active_adapter, is_trainable=True)
    if result.missing_keys:
        raise RuntimeError(f"{checkpoint}: adapter lacks {', '.join(result.missing_keys[:5])}")


def save_adapter(model, dest: Path) -> None:
    """adapter_config.json + adapter_model.safetensors of the peft `model`, nothing else."""
    model.save_pretrained(dest, safe_serialization=True)
    (dest / "README.md").unlink(missing_ok=True)  # peft's empty model-card template


def merge(base_dir: str | Path, adapter_dir: str | Path):
    """A standalone model: the base reloaded unquantised in its own dtype, with the adapter folded
    into its weights. Never a merge into a 4-bit base: rounding the sum back to nf4 would lose
    most of the update."""
    from peft import PeftModel

    tuned = PeftModel.from_pretrained(load_base(base_dir), str(adapter_dir))
    return tuned.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaN weights


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters; a peft model counts a 4-bit weight as its unpacked size."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
