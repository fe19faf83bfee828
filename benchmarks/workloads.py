"""Workloads for tests and benchmarks: model shapes, a tiny random Llama, throwaway projects.

    build_tiny_model(dir)              # 2-layer Llama + byte-level BPE, offline, in seconds
    random_model_dir(dir, layers=4)    # SmolLM2-135M's shape with random weights (for throughput)
    make_project(dir, tiny_params(m))  # a git + DVC copy of the pipeline with params.yaml edited

Benchmarks import this module; tests import it too (the test package is never imported by a
benchmark).
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_benchmark(main) -> None:
    """Exit with main()'s status, run as `python benchmarks/<name>.py`. Run so, the benchmarks
    folder comes first on sys.path, where `import evaluate` (the library, which the perplexity
    metrics import) would find benchmarks/evaluate.py instead: it is taken off first."""
    import sys

    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.exit(main())


class MeasureError(Exception):
    """A benchmark could not measure: it says so in one line and exits with status 1."""


def verdict(ratio: float, goal: str) -> str:
    """'met' or 'MISSED': `ratio` against a goal written '>=X' or '<=X' (ARCHITECTURE.md)."""
    ok = ratio >= float(goal[2:]) if goal.startswith(">=") else ratio <= float(goal[2:])
    return "met" if ok else "MISSED"


def print_checks(benchmark: str, ratios: dict[str, float], goals: dict[str, str]) -> None:
    """Each ratio with its goal and verdict, then the JSON checks line (ARCHITECTURE.md)."""
    import json

    for name, value in ratios.items():
        print(f"{name}: {value:.4f} (goal {goals[name]}: {verdict(value, goals[name])})")
    checks = [{"name": n, "ratio": round(v, 4), "goal": goals[n]} for n, v in ratios.items()]
    print(json.dumps({"benchmark": benchmark, "checks": checks}))


def train_in(work: Path, params, model_dir: Path, data_dir: Path, callbacks: list) -> dict:
    """steps.train.train() (the train stage's function) writing everything under `work`, with
    extra Trainer callbacks (a benchmark's clocks); its metrics."""
    from steps.train import train

    return train(
        params,
        model_dir,
        data_dir,
        work / "tuned",
        work / "train.json",
        work / "loss.csv",
        work / "ckpt",
        callbacks=callbacks,
    )


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (by path: `benchmarks/evaluate.py` would shadow the
    `evaluate` library if the folder were on sys.path), for the tests."""
    import importlib.util

    path = REPO / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SAMPLE_TEXT = [
    "The for statement is used to iterate over the elements of a sequence.",
    "A function definition defines a user-defined function object.",
    "Assignment statements are used to (re)bind names to values and to modify attributes.",
    "The while statement is used for repeated execution as long as an expression is true.",
    "Exceptions are raised by the raise statement and handled by try statements.",
]


# A ChatML template (the layout SmolLM2-Instruct uses), written for the tests' chat model.
CHATML_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tiny_chat_model(out: Path, seed: int = 0) -> Path:
    """The tiny Llama with ChatML turn tokens and a chat template; `<|im_end|>` is EOS."""
    tokenizer = _tiny_tokenizer(chat=True)
    tokenizer.chat_template = CHATML_TEMPLATE
    shape = dict(TINY_LLAMA, vocab_size=len(tokenizer))
    shape.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    save_random_llama(out, shape, tokenizer, seed)
    return out


def build_tiny_model(out: Path, seed: int = 0) -> Path:
    """Write config, safetensors weights, tokenizer and generation config of a 2-layer Llama."""
    tokenizer = _tiny_tokenizer()
    save_random_llama(out, dict(TINY_LLAMA, vocab_size=len(tokenizer)), tokenizer, seed)
    return out


def _tiny_tokenizer(chat: bool = False):
    """A 400-token byte-level BPE trained on SAMPLE_TEXT (plus ChatML's two turn tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(SAMPLE_TEXT * 20, trainer)
    turn = ["<|im_start|>", "<|im_end|>"] if chat else []
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>" if chat else "</s>",
        pad_token="<|im_end|>" if chat else "</s>",
        additional_special_tokens=turn,
        model_max_length=512,
    )


def save_random_llama(out: Path, shape: dict, tokenizer, seed: int = 0) -> int:
    """A Llama of `shape` with weights drawn from `seed`, saved (safetensors) with `tokenizer`;
    returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**shape))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


# The tests' model: 2 layers of width 32, seconds to build and train on a CPU.
TINY_LLAMA = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
    tie_word_embeddings=True,
)


# SmolLM2-135M's shape, from the GGUF's config (steps.base_model writes the same to models/base).
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


def placeholder_tokenizer():
    """Three special tokens and nothing else: for models fed synthetic token ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
    )


def random_model_dir(dest: Path, layers: int | None = None, seed: int = 0) -> tuple[Path, int]:
    """SmolLM2-135M's architecture (optionally fewer layers) with random weights, saved with a
    placeholder tokenizer; returns (directory, parameter count)."""
    shape = dict(SMOLLM2_135M, num_hidden_layers=layers or SMOLLM2_135M["num_hidden_layers"])
    return dest, save_random_llama(dest, shape, placeholder_tokenizer(), seed)


def prepared_docs(root: Path, model_dir: Path, docs: list[str], block_size: int = 16) -> Path:
    """`docs` written as JSONL under `root` and prepared (steps.prepare) for the model in
    `model_dir`, in blocks of `block_size` tokens: the prepared directory."""
    import json

    from transformers import AutoTokenizer

    from steps.params import PrepareParams
    from steps.prepare import prepare

    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    params = PrepareParams(block_size=block_size)
    prepare(params, root / "docs.jsonl", tokenizer, root / "prepared")
    return root / "prepared"


def crash_trainer_at(monkeypatch, step: int) -> None:
    """Make transformers' Trainer raise RuntimeError('simulated kill') on its `step`-th optimizer
    step (its first micro-batch, whatever the gradient accumulation)."""
    from transformers import Trainer

    real_step = Trainer.training_step

    def crashing_step(self, *args, **kwargs):
        if self.state.global_step + 1 == step:
            raise RuntimeError("simulated kill")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", crashing_step)


def loss_curve(path: Path) -> dict[int, float]:
    """step -> loss of a loss-curve CSV that steps.train writes."""
    import csv

    with path.open() as f:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(f)}


PROJECT_FILES = [
    "steps",
    "flows",
    "dvc.yaml",
    "params.yaml",
    ".dvc/config",
    ".gitignore",
    "data/reference",
]


def make_project(dest: Path, params: dict[str, dict]) -> Path:
    """A throwaway copy of the pipeline (a git repo with DVC), with params.yaml keys replaced."""
    import shutil

    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    edit_params(dest / "params.yaml", params)
    commit_all(dest, "test project")
    return dest


def edit_params(path: Path, params: dict[str, dict]) -> None:
    """Replace keys of params.yaml section by section, keeping its comments."""
    from ruamel.yaml import YAML

    rt = YAML()
    doc = rt.load(path.read_text())
    for section, values in params.items():
        doc[section].update(values)
    with path.open("w") as f:
        rt.dump(doc, f)


def commit_all(dest: Path, message: str) -> None:
    """`git init` (when needed) and commit everything in `dest` that git does not ignore."""
    import subprocess

    git = ["git", "-c", "user.email=ci@llmpipe.invalid", "-c", "user.name=ci"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", message], cwd=dest, check=True)


def tiny_params(model_dir: Path, **train: object) -> dict[str, dict]:
    """params.yaml edits for a fast run of the tiny model: small blocks, few steps, one sample."""
    return {
        "base_model": {"source": str(model_dir)},
        "prepare": {"block_size": 32},
        "train": {"max_steps": 6, "save_steps": 3, **train},
        "evaluate": {"window": 64, "stride": 64, "batch_size": 8, "samples": 1, "sample_tokens": 4},
    }
