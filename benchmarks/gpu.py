"""GPU figures in one prepared run, for a CUDA machine: LoRA and QLoRA against full fine-tuning
through steps.train on the embedded chat data, and SmolLM2-135M's training MFU at block 2048.

    python benchmarks/gpu.py --model DIR --chat FILE [--parts chat,mfu] [--quick] [--out DIR]

--model: a model directory (config, tokenizer with its chat template, weights). Where it holds no
weights, SmolLM2-135M's architecture is built from its config with random weights (seed 0):
speed and memory do not depend on the values of the weights, only on their shapes and dtypes, so
tokens/s, peak memory and MFU are those of the real model; its losses are not (and are not
reported as such). --chat: the embedded chat data (`python -m steps.qa_corpus --out FILE`).

Parts, each in fresh processes so that each peak memory is its own:
- chat: steps.prepare packs the chat data into blocks (--block-size, default 1024), then
  steps.train trains it with train.method full, lora and qlora at precision auto (bf16 autocast on
  CUDA; qlora's frozen base in 4-bit NF4), the same steps, batch and learning rate. Reported:
  tokens/s of the timed steps (the first WARMUP steps, CUDA's and cuBLAS's warm-up, are outside
  the timer), the product's own figure (tokens_seen / train_seconds, every step), and the peak GPU
  memory of training (torch.cuda.max_memory_allocated, read when training ends, before the merge).
  No checkpoint is written while timed (save_steps above max_steps).
- mfu: block 2048, batch 16 of random token ids: steps.train full at the default precision (the
  current default), then a plain PyTorch loop (fused AdamW, bf16 autocast) eager, compiled
  (torch.compile), compiled with a fused linear + cross-entropy (Liger's, so the [tokens, vocab]
  logits are never materialised), and that with bf16 weights. MFU = achieved FLOP/s over the
  device's dense bf16 peak (--peak-tflops, default 989 for the H100/H200 SXM), with FLOPs per
  token = 6 x (matmul parameters, the output head included) + 12 x layers x width x block
  (attention scores and values, forward and backward, counted over the whole block as PaLM's
  appendix counts them).
Figures go to stdout and to DIR/gpu-<part>.json; the last line is the JSON checks line of
ARCHITECTURE.md. Exits 1 when a part could not measure (the others still run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.workloads import MeasureError, verdict  # noqa: E402  (after the path)

WARMUP = 5  # steps outside the timers: CUDA context, cuBLAS heuristics, allocator growth


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"  # cpu: only to test this script


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory() -> tuple[int, int]:
    """(allocated, reserved) peak bytes on the GPU since the last reset; (0, 0) on a CPU."""
    import torch

    if not torch.cuda.is_available():
        return 0, 0
    return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


GOALS = {
    "lora_vs_full_tokens_per_s": ">=1.3",  # issue 9's goal on CPU, checked here too
    "lora_vs_full_peak_memory": "<=0.7",
    "qlora_vs_lora_peak_memory": "<=1.0",
    "mfu_best": ">=0.35",  # issue 10 item 4 on an H100/H200
}


# -- the model -----------------------------------------------------------------------------------


def materialise(model_dir: Path, work: Path) -> tuple[Path, bool]:
    """`model_dir` when it holds weights; else its architecture with random weights (seed 0),
    saved with its tokenizer under `work`. Returns (directory, random)."""
    if any(model_dir.glob("*.safetensors")):
        return model_dir, False
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = work / "model"
    if not (out / "model.safetensors").is_file():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
        model.save_pretrained(out, safe_serialization=True)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
        for extra in ("chat_template.jinja", "generation_config.json"):
            if (model_dir / extra).is_file() and not (out / extra).is_file():
                (out / extra).write_bytes((model_dir / extra).read_bytes())
    return out, True


def flops_per_token(config, block: int) -> float:
    """Training FLOPs per token: 6 per matmul parameter (forward 2, backward 4), the output head
    included, plus attention's QK^T and AV over the whole block."""
    d, layers = config.hidden_size, config.num_hidden_layers
    head = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q = config.num_attention_heads * head
    kv = config.num_key_value_heads * head
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * config.intermediate_size
    matmul = layers * per_layer + config.vocab_size * d
    return 6 * matmul + 12 * layers * q * block


# -- part chat: full, lora, qlora through steps.train --------------------------------------------


def prepare_chat(model_dir: Path, chat: Path, block: int, work: Path) -> tuple[Path, dict]:
    from transformers import AutoTokenizer

    from steps.params import PrepareParams
    from steps.prepare import prepare

    out = work / f"prepared-chat-{block}"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    card = prepare(PrepareParams(data=str(chat), block_size=block), chat, tokenizer, out)
    return out, card


def step_clock(clock: dict):
    """A TrainerCallback that times the steps after WARMUP and reads the peak GPU memory when
    training ends, into `clock`."""
    import transformers

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == WARMUP:
                sync()
                clock["start"] = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            sync()
            clock["seconds"] = time.perf_counter() - clock["start"]
            clock["timed_steps"] = state.global_step - WARMUP
            clock["peak_allocated"], clock["peak_reserved"] = peak_memory()

    return Clock()


def train_child(spec: dict) -> dict:
    """One steps.train run (in its own process): its metrics, timed steps and peak memory."""
    import torch

    from benchmarks.workloads import train_in
    from steps.params import TrainParams

    clock: dict = {}
    params = TrainParams(**spec["params"])
    reset_peak_memory()
    model, data = Path(spec["model"]), Path(spec["data"])
    metrics = train_in(Path(spec["work"]), params, model, data, [step_clock(clock)])
    block = metrics["tokens_seen"] // (metrics["steps"] * params.batch_size)
    tokens = clock["timed_steps"] * params.batch_size * block
    return {
        **metrics,
        "block": block,
        "tokens_per_s": tokens / clock["seconds"],
        "product_tokens_per_s": metrics["tokens_seen"] / metrics["train_seconds"],
        "timed_steps": clock["timed_steps"],
        "peak_allocated": clock["peak_allocated"],
        "peak_reserved": clock["peak_reserved"],
        "bf16": bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
    }


def run_child(kind: str, spec: dict, work: Path, timeout: float) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    (work / "spec.json").write_text(json.dumps(spec))
    result = work / "result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--spec"]
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [*cmd, str(work / "spec.json"), "--result", str(result)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        raise MeasureError(f"{work.name}: no result within {timeout:.0f} s") from e
    if done.returncode != 0 or not result.is_file():
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        raise MeasureError(f"{work.name} failed (exit {done.returncode}):\n{tail}")
    out = json.loads(result.read_text())
    out["wall_seconds"] = time.perf_counter() - started
    return out


def part_chat(args, model_dir: Path, work: Path) -> dict:
    data, card = prepare_chat(model_dir, args.chat, args.block_size, work)
    train_card = card["splits"]["train"]
    print(
        f"chat data: {train_card['records']} training conversations, {train_card['blocks']} "
        f"blocks of {args.block_size} (packing {train_card['packing_efficiency']:.1%}), "
        f"{train_card['supervised_tokens']:,} supervised tokens",
        flush=True,
    )
    steps = 15 if args.quick else 40
    results, failed = {}, []
    for method in ("full", "lora", "qlora"):
        params = {
            "method": method,
            "max_steps": steps,
            "batch_size": args.batch_size,
            "gradient_accumulation_steps": 1,
            "learning_rate": 1e-3 if method != "full" else 3e-4,
            "save_steps": 10**6,
            "warmup_ratio": 0.1,
        }
        spec = {"params": params, "model": str(model_dir), "data": str(data)}
        try:
            r = run_child("train", {**spec, "work": str(work / method)}, work / method, 600)
        except MeasureError as e:
            print(f"{method}: could not measure: {e}", flush=True)
            failed.append(method)
            continue
        results[method] = r
        gib = 2**30
        print(
            f"{method}: {r['tokens_per_s']:,.0f} tok/s over {r['timed_steps']} timed steps "
            f"(product figure, every step: {r['product_tokens_per_s']:,.0f}); peak GPU memory "
            f"{r['peak_allocated'] / gib:.2f} GiB allocated, {r['peak_reserved'] / gib:.2f} GiB "
            f"reserved; trainable {r['trainable_parameters']:,} of {r['total_parameters']:,}; "
            f"train loss {r['train_loss']:.3f}; {r['wall_seconds']:.0f} s with loading and merge",
            flush=True,
        )
    ratios = {}
    if "full" in results and "lora" in results:
        full, lora = results["full"], results["lora"]
        ratios["lora_vs_full_tokens_per_s"] = lora["tokens_per_s"] / full["tokens_per_s"]
        if full["peak_allocated"]:  # 0 on a CPU (this script's own test)
            ratios["lora_vs_full_peak_memory"] = lora["peak_allocated"] / full["peak_allocated"]
    if "lora" in results and "qlora" in results:
        ratios["qlora_vs_lora_peak_memory"] = (
            results["qlora"]["peak_allocated"] / results["lora"]["peak_allocated"]
        )
        ratios["qlora_vs_lora_tokens_per_s"] = (
            results["qlora"]["tokens_per_s"] / results["lora"]["tokens_per_s"]
        )
    return {"card": train_card, "results": results, "ratios": ratios, "failed": failed}


# -- part mfu: the current default against a tuned plain loop at block 2048 -----------------------


def synthetic_blocks(model_dir: Path, block: int, rows: int, work: Path) -> Path:
    """`rows` blocks of random token ids as steps.prepare lays them out (train/, validation/)."""
    import torch
    from datasets import Dataset
    from transformers import AutoConfig

    out = work / f"synthetic-{block}"
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    ids = torch.randint(3, vocab, (rows, block), generator=torch.Generator().manual_seed(0))
    Dataset.from_dict({"input_ids": ids.tolist()}).save_to_disk(str(out / "train"))
    Dataset.from_dict({"input_ids": ids[:1].tolist()}).save_to_disk(str(out / "validation"))
    return out


def loop_child(spec: dict) -> dict:
    """A plain PyTorch training loop on random blocks: fused AdamW, bf16 autocast, optionally
    compiled, Liger's fused linear + cross-entropy, bf16 weights."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    block, batch, steps = spec["block"], spec["batch"], spec["steps"]
    dtype = torch.bfloat16 if spec["bf16_weights"] else torch.float32
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype).to(device())
    model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    vocab = model.config.vocab_size
    data = torch.randint(3, vocab, (steps + WARMUP, batch, block), device=device())

    if spec["fused_ce"]:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        fused = LigerFusedLinearCrossEntropyLoss()
        # the backbone compiled, Liger's Triton kernels left outside the graph (compiled together
        # they hit an illegal memory access on torch 2.11 + liger 0.8.5, H200)
        backbone = torch.compile(model.model) if spec["compile"] else model.model

        def step_loss(ids):
            hidden = backbone(input_ids=ids).last_hidden_state[:, :-1]
            flat = hidden.reshape(-1, hidden.shape[-1])
            return fused(model.lm_head.weight, flat, ids[:, 1:].reshape(-1))
    else:
        forward = torch.compile(model) if spec["compile"] else model

        def step_loss(ids):
            return forward(input_ids=ids, labels=ids).loss

    reset_peak_memory()
    for i in range(steps + WARMUP):
        if i == WARMUP:
            sync()
            start = time.perf_counter()
        with torch.autocast(device(), dtype=torch.bfloat16):
            loss = step_loss(data[i])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync()
    seconds = time.perf_counter() - start
    return {
        "tokens_per_s": steps * batch * block / seconds,
        "peak_allocated": peak_memory()[0],
        "final_loss": float(loss),
    }


def part_mfu(args, model_dir: Path, work: Path) -> dict:
    from transformers import AutoConfig

    block, batch = args.mfu_block, args.mfu_batch
    config = AutoConfig.from_pretrained(model_dir)
    fpt = flops_per_token(config, block)
    peak = args.peak_tflops * 1e12
    steps = 10 if args.quick else 30
    print(
        f"mfu: block {block}, batch {batch}, {fpt / 1e9:.3f} GFLOP per token "
        f"(attention {12 * config.num_hidden_layers * config.hidden_size * block / fpt:.0%}); "
        f"peak {args.peak_tflops:.0f} TFLOP/s dense bf16; {environment().get('device')}",
        flush=True,
    )
    data = synthetic_blocks(model_dir, block, batch * (steps + WARMUP), work)
    runs: dict[str, dict] = {}
    # the default first, then the loops from the expected fastest, so that a run cut short by
    # the machine's time limit still has the figures that matter (each compile takes ~1 minute)
    variants = [
        ("default (steps.train, full, auto precision)", "train", {}),
        ("loop compiled + fused CE + bf16 weights", "loop",
         {"compile": True, "fused_ce": True, "bf16_weights": True}),
        ("loop compiled + fused CE", "loop",
         {"compile": True, "fused_ce": True, "bf16_weights": False}),
        ("loop eager", "loop", {"compile": False, "fused_ce": False, "bf16_weights": False}),
        ("loop compiled", "loop", {"compile": True, "fused_ce": False, "bf16_weights": False}),
    ]  # fmt: skip
    failed = []
    for i, (name, kind, options) in enumerate(variants):
        if args.only and not any(word in name for word in args.only.split(",")):
            continue
        if kind == "train":
            params = {"max_steps": steps + WARMUP, "batch_size": batch, "save_steps": 10**6}
            params["gradient_accumulation_steps"] = 1  # `batch` blocks in one pass per step
            spec = {"params": params, "model": str(model_dir), "data": str(data)}
        else:
            spec = {"model": str(model_dir), "block": block, "batch": batch, "steps": steps}
            spec.update(options)
        try:
            r = run_child(kind, {**spec, "work": str(work / f"mfu-{i}")}, work / f"mfu-{i}", 400)
        except MeasureError as e:
            print(f"{name}: could not measure: {e}", flush=True)
            failed.append(name)
            continue
        r["mfu"] = r["tokens_per_s"] * fpt / peak
        runs[name] = r
        print(
            f"{name}: {r['tokens_per_s']:,.0f} tok/s, MFU {r['mfu']:.1%}, peak GPU memory "
            f"{r['peak_allocated'] / 2**30:.1f} GiB ({r['wall_seconds']:.0f} s with loading "
            f"and compiling)",
            flush=True,
        )
    ratios = {}
    if runs:
        best = max(runs, key=lambda n: runs[n]["mfu"])
        ratios["mfu_best"] = runs[best]["mfu"]
        print(f"best: {best}", flush=True)
        default = variants[0][0]
        if default in runs:
            ratios["best_vs_default_tokens_per_s"] = (
                runs[best]["tokens_per_s"] / runs[default]["tokens_per_s"]
            )
    return {"flops_per_token": fpt, "runs": runs, "ratios": ratios, "failed": failed}


# -- the run --------------------------------------------------------------------------------------


def environment() -> dict:
    import importlib.metadata as md

    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("transformers", "peft", "bitsandbytes", "liger-kernel", "datasets", "triton"):
        try:
            info[name] = md.version(name)
        except md.PackageNotFoundError:
            info[name] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model directory (weights optional)")
    parser.add_argument("--chat", type=Path, help="the embedded chat data (JSONL)")
    parser.add_argument("--parts", default="chat,mfu", help="comma-separated: chat, mfu")
    parser.add_argument("--quick", action="store_true", help="fewer steps per run")
    parser.add_argument("--out", type=Path, default=Path("."), help="where gpu-<part>.json go")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    parser.add_argument("--block-size", type=int, default=1024, help="chat part's block size")
    parser.add_argument("--batch-size", type=int, default=16, help="chat part's blocks per step")
    parser.add_argument("--mfu-block", type=int, default=2048, help="mfu part's block size")
    parser.add_argument("--mfu-batch", type=int, default=16, help="mfu part's blocks per step")
    parser.add_argument("--only", help="mfu variants whose names contain one of these words")
    parser.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)  # tests
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak")
    parser.add_argument("--child", choices=("train", "loop"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.child and (args.model is None or ("chat" in args.parts and args.chat is None)):
        parser.error("--model is needed, and --chat for the chat part")
    return args


def main(argv: list[str] | None = None) -> int:
    import tempfile

    from steps.environment import quiet_offline_env

    args = parse_args(argv)
    os.environ.update(quiet_offline_env())
    os.environ.pop("MLFLOW_RUN_ID", None)
    if args.child:
        spec = json.loads(args.spec.read_text())
        result = train_child(spec) if args.child == "train" else loop_child(spec)
        args.result.write_text(json.dumps(result))
        return 0
    import torch

    if not (torch.cuda.is_available() or args.allow_cpu):
        print("gpu: no CUDA device here; this benchmark runs on a GPU machine", file=sys.stderr)
        return 1
    info = environment()
    print("environment: " + json.dumps(info), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    checks, status = [], 0
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        work = args.work or Path(tmp)
        model_dir, random_weights = materialise(args.model, work)
        if random_weights:
            print(f"model: {args.model}'s architecture with random weights (seed 0)", flush=True)
        for part in args.parts.split(","):
            started = time.perf_counter()
            try:
                found = (part_chat if part == "chat" else part_mfu)(args, model_dir, work)
            except Exception as e:  # one part failing must not lose the others' figures
                print(f"{part}: could not measure: {type(e).__name__}: {e}", flush=True)
                status = 1
                continue
            found.update(environment=info, random_weights=random_weights)
            found["seconds"] = time.perf_counter() - started
            (args.out / f"gpu-{part}.json").write_text(json.dumps(found, indent=2))
            status = status or int(bool(found["failed"]))
            for name, ratio in found["ratios"].items():
                goal = GOALS.get(name)
                note = f"goal {goal}: {verdict(ratio, goal)}" if goal else "printed"
                print(f"{name}: {ratio:.4f} ({note})")
                if goal:
                    checks.append({"name": name, "ratio": round(ratio, 4), "goal": goal})
    print(json.dumps({"benchmark": "gpu", "checks": checks}))
    return status


if __name__ == "__main__":
    sys.exit(main())
