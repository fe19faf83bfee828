"""steps/lora.py and train.method: lora: checks before compute, LoRA's parameter count, an exact
merge, and lora runs of steps.train.train() on the tiny model (end to end, resumed, finished)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from benchmarks.workloads import crash_trainer_at, loss_curve, prepared_docs
from steps import lora
from steps.errors import UserError
from steps.params import TrainParams, parse_params

pytestmark = pytest.mark.unit

QLORA_NO_CUDA = (
    "train.method: qlora needs a CUDA GPU (4-bit bitsandbytes); none is visible here; "
    "use train.method: lora"
)
DOCS = [f"Entry {i}: the for statement iterates over item {i} of a sequence." for i in range(60)]
IDS = torch.tensor([[1, 5, 42, 7, 99, 3, 250, 17, 8, 64], [2, 300, 11, 11, 12, 80, 9, 1, 4, 5]])


def outs(root):
    """train()'s output paths under `root`: model, metrics, loss curve, checkpoints."""
    return root / "tuned", root / "train.json", root / "loss.csv", root / "ckpt"


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def no_weights_loaded(monkeypatch) -> None:
    """Make any weight loading (base, checkpoint, dataset) fail the test."""
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("weights or data were loaded before the check")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr("datasets.load_from_disk", refuse)


def test_lora_keys_parse_flat_and_are_checked():
    raw = {"train": {"method": "lora", "lora_r": 8, "lora_target_modules": "q_proj, v_proj"}}
    params = parse_params(raw).train
    assert (params.method, params.lora_r, params.lora_alpha) == ("lora", 8, 32)
    assert lora.target_modules(params) == ["q_proj", "v_proj"]
    assert lora.target_modules(TrainParams()) == "all-linear"
    assert lora.target_modules(TrainParams(lora_target_modules=["o_proj"])) == ["o_proj"]
    with pytest.raises(UserError) as info:
        parse_params({"train": {"method": "dora", "lora_r": 0}})
    assert "'train.method'" in str(info.value) and "'train.lora_r'" in str(info.value)


def test_lora_keys_are_set_by_flat_overrides(tmp_path):
    from benchmarks.workloads import REPO
    from steps.params import apply_overrides

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    edits = ["train.method=lora", "train.lora_r=8", "train.lora_target_modules=q_proj,v_proj"]
    params = apply_overrides(tmp_path / "params.yaml", edits).train
    assert (params.method, params.lora_r, params.lora_target_modules) == (
        "lora",
        8,
        "q_proj,v_proj",
    )
    assert lora.target_modules(params) == ["q_proj", "v_proj"]


def test_qlora_without_cuda_is_one_line_before_any_weights_load(
    tmp_path, monkeypatch, tiny_model_dir
):
    from steps.train import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    no_weights_loaded(monkeypatch)
    with pytest.raises(UserError) as info:
        train(TrainParams(method="qlora"), tiny_model_dir, tmp_path / "prepared", *outs(tmp_path))
    assert str(info.value) == QLORA_NO_CUDA
    assert not list(tmp_path.iterdir())
    lora.check_method(TrainParams(method="lora"))  # lora and full need neither
    lora.check_method(TrainParams())


def test_qlora_without_bitsandbytes_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` fails
    with pytest.raises(UserError) as info:
        lora.check_method(TrainParams(method="qlora"))
    message = str(info.value)
    assert message.startswith("train.method: qlora needs bitsandbytes")
    assert "pip install 'llmpipe[qlora]'" in message and "\n" not in message


def test_unknown_target_modules_are_rejected_before_any_compute(
    tmp_path, monkeypatch, tiny_model_dir
):
    from steps.train import train

    params = TrainParams(method="lora", lora_target_modules=["q_proj", "nonexistent_proj"])
    no_weights_loaded(monkeypatch)  # the check builds the model from config.json on `meta`
    with pytest.raises(UserError) as info:
        train(params, tiny_model_dir, tmp_path / "prepared", *outs(tmp_path))
    message = str(info.value)
    assert message.startswith("train.lora_target_modules: ")
    assert "named nonexistent_proj;" in message  # q_proj exists: only the missing name is named
    has = message.split("its Linear layers: ")[1]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in has
    with pytest.raises(UserError, match="empty"):
        lora.check_targets(tiny_model_dir, TrainParams(method="lora", lora_target_modules=" , "))
    lora.check_targets(tiny_model_dir, TrainParams(method="lora", lora_target_modules="q_proj"))
    lora.check_targets(
        tiny_model_dir, TrainParams(method="lora", lora_target_modules="mlp.up_proj")
    )


def analytic_lora_count(base, r: int, targets: list[str] | None) -> int:
    """r * (in + out) summed over the Linear layers targeted (None: every one but the head)."""
    return sum(
        r * (m.in_features + m.out_features)
        for name, m in base.named_modules()
        if isinstance(m, torch.nn.Linear)
        and (name.rsplit(".", 1)[-1] in targets if targets else name != "lm_head")
    )


@pytest.mark.parametrize(
    ("r", "targets"), [(16, None), (4, ["q_proj", "v_proj"]), (8, ["down_proj"])]
)
def test_trainable_parameters_are_loras_analytic_count(tiny_model_dir, r, targets):
    base = lora.load_base(tiny_model_dir)
    base_total = sum(p.numel() for p in base.parameters())
    expected = analytic_lora_count(base, r, targets)
    params = TrainParams(method="lora", lora_r=r, lora_target_modules=targets or "all-linear")
    trainable, total = lora.parameter_counts(lora.wrap(base, params))
    assert trainable == expected
    assert total == base_total + expected
    if targets is None:  # 2 layers x (q 32+32, k 32+16, v 32+16, o 32+32, 3 MLP x (32+64))
        assert trainable == r * 2 * (64 + 48 + 48 + 64 + 3 * 96)


def nontrivial_adapter(tiny_model_dir, params: TrainParams):
    """The base wrapped with LoRA whose B matrices are random (peft starts them at zero)."""
    model = lora.wrap(lora.load_base(tiny_model_dir), params)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    return model


def test_merge_equals_base_plus_adapter_and_reloads_alone(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    params = TrainParams(method="lora", lora_r=4)
    peft_model = nontrivial_adapter(tiny_model_dir, params)
    expected = logits(peft_model)
    assert (expected - logits(lora.load_base(tiny_model_dir))).abs().max() > 1e-2  # not a no-op
    lora.save_adapter(peft_model, tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }

    merged = lora.merge(tiny_model_dir, tmp_path / "adapter")
    assert not isinstance(merged, PeftModel)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert next(merged.parameters()).dtype == torch.float32  # the base's dtype
    diff = (logits(merged) - expected).abs().max().item()
    print(f"merge max abs logit diff: {diff:.2e}")
    assert diff < 1e-5

    merged.save_pretrained(tmp_path / "out")
    alone = AutoModelForCausalLM.from_pretrained(tmp_path / "out", use_safetensors=True)
    assert (logits(alone) - expected).abs().max() < 1e-5
    onto_base = PeftModel.from_pretrained(lora.load_base(tiny_model_dir), tmp_path / "adapter")
    assert (logits(onto_base) - expected).abs().max() < 1e-5


def prepared_data(tmp_path, tiny_model_dir):
    """DOCS prepared for the tiny model in blocks of 16 tokens: the directory."""
    return prepared_docs(tmp_path, tiny_model_dir, DOCS)


LORA = TrainParams(
    method="lora", max_steps=8, save_steps=2, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0,
    lora_r=8, seed=7,
)  # fmt: skip


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, tiny_model_dir):
    """One uninterrupted lora run: (prepared data, its root, its metrics)."""
    from steps.train import train

    root = tmp_path_factory.mktemp("lora-clean")
    prepared = prepared_data(root, tiny_model_dir)
    return prepared, root, train(LORA, tiny_model_dir, prepared, *outs(root))


def test_lora_train_end_to_end_writes_adapter_and_merged_model(clean_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, root, metrics = clean_run
    tuned = root / "tuned"
    assert json.loads((root / "train.json").read_text()) == pytest.approx(metrics)
    assert metrics["method"] == "lora" and metrics["steps"] == 8
    base = lora.load_base(tiny_model_dir)
    assert metrics["trainable_parameters"] == analytic_lora_count(base, 8, None)
    assert metrics["total_parameters"] == metrics["trainable_parameters"] + sum(
        p.numel() for p in base.parameters()
    )
    curve = loss_curve(root / "loss.csv")
    first, last = sum(curve[s] for s in (1, 2, 3)) / 3, sum(curve[s] for s in (6, 7, 8)) / 3
    assert last < first - 0.1  # nats; a frozen random base with r=8 adapters: 6.0 -> 5.8
    assert not (root / "ckpt").exists() or not any((root / "ckpt").iterdir())

    files = {p.name for p in tuned.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "adapter"} <= files
    assert "adapter_config.json" not in files  # the out dir is a plain model, not an adapter
    assert {p.name for p in (tuned / "adapter").iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    merged = AutoModelForCausalLM.from_pretrained(tuned, use_safetensors=True)
    with_adapter = PeftModel.from_pretrained(lora.load_base(tiny_model_dir), tuned / "adapter")
    assert (logits(merged) - logits(with_adapter)).abs().max() < 1e-5
    assert (logits(merged) - logits(base)).abs().max() > 1e-2  # the adapter learned something
    embed = "model.embed_tokens.weight"  # not a target: untouched by the merge
    assert torch.equal(merged.state_dict()[embed], base.state_dict()[embed])


def test_lora_resumes_from_an_adapter_checkpoint_exactly(
    tmp_path, monkeypatch, clean_run, tiny_model_dir, capsys
):
    from transformers import AutoModelForCausalLM, Trainer

    from steps.train import train

    prepared, clean, expected = clean_run
    real_step = Trainer.training_step  # put back after the crash
    crash_trainer_at(monkeypatch, 6)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(LORA, tiny_model_dir, prepared, *outs(tmp_path))
    [run_dir] = (tmp_path / "ckpt").glob("train-*")
    assert (run_dir / "checkpoint-4" / "adapter_model.safetensors").is_file()
    monkeypatch.setattr(Trainer, "training_step", real_step)
    capsys.readouterr()
    metrics = train(LORA, tiny_model_dir, prepared, *outs(tmp_path))
    assert f"resuming from {run_dir / 'checkpoint-4'}" in capsys.readouterr().out
    resumed, uninterrupted = loss_curve(tmp_path / "loss.csv"), loss_curve(clean / "loss.csv")
    for step in range(5, 9):  # trained after the resume: same adapter, optimizer, data, dropout
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-5), step
    assert metrics["eval_loss"] == pytest.approx(expected["eval_loss"], abs=1e-5)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned", use_safetensors=True)
    theirs = AutoModelForCausalLM.from_pretrained(clean / "tuned", use_safetensors=True)
    assert (logits(ours) - logits(theirs)).abs().max() < 1e-4


def test_a_lora_run_killed_after_its_last_checkpoint_loads_that_adapter(
    tmp_path, monkeypatch, clean_run, tiny_model_dir, capsys
):
    """finished_state(): the retry does not train; it loads the checkpoint's adapter onto the
    base (a fresh adapter would merge to the base itself) and saves what the clean run saved."""
    from transformers import AutoModelForCausalLM, Trainer

    from steps.train import train

    prepared, clean, expected = clean_run

    def killed_while_evaluating(self, *args, **kwargs):
        raise RuntimeError("simulated kill after the last checkpoint")

    monkeypatch.setattr(Trainer, "evaluate", killed_while_evaluating)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(LORA, tiny_model_dir, prepared, *outs(tmp_path))
    monkeypatch.undo()
    capsys.readouterr()
    metrics = train(LORA, tiny_model_dir, prepared, *outs(tmp_path))
    assert "holds all 8 steps; not training again" in capsys.readouterr().out
    assert metrics["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-5)
    assert metrics["eval_loss"] == pytest.approx(expected["eval_loss"], abs=1e-5)
    assert metrics["trainable_parameters"] == expected["trainable_parameters"]
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned", use_safetensors=True)
    theirs = AutoModelForCausalLM.from_pretrained(clean / "tuned", use_safetensors=True)
    assert (logits(ours) - logits(theirs)).abs().max() < 1e-5


def test_register_logs_the_adapter_as_a_run_artifact(tmp_path, clean_run, tiny_model_dir):
    from mlflow import MlflowClient

    from steps.register import log_adapter

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    assert log_adapter(client, run_id, clean_run[1] / "tuned")
    logged = {a.path for a in client.list_artifacts(run_id, "adapter")}
    assert logged == {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
    assert not log_adapter(client, run_id, tiny_model_dir)  # full fine-tuning: no adapter
    assert [a.path for a in client.list_artifacts(run_id)] == ["adapter"]


def test_frozen_bases_in_bf16_train_the_same_under_bf16_autocast(tiny_model_dir):
    """Casting the adapted layers' frozen weights to bf16 once computes what autocast computes
    casting them every pass: the same loss and adapter gradients to the bit, half the memory."""
    params = TrainParams(method="lora", lora_r=4)
    kept, cast = (nontrivial_adapter(tiny_model_dir, params) for _ in range(2))
    adapted = lora.frozen_bases_to_bf16(cast)
    assert adapted == len(lora.linear_module_names(lora.load_base(tiny_model_dir))) - 1  # no head
    embeddings = cast.get_input_embeddings().weight
    assert embeddings.dtype == torch.float32  # read outside a product: kept
    layers = [m for m in cast.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert len(layers) == adapted and not any(m.cast_input_dtype_enabled for m in layers)
    results = []
    for model in (kept, cast):
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys()
    assert all(torch.equal(results[0][1][k], results[1][1][k]) for k in results[0][1])


@pytest.mark.parametrize(("precision", "bf16_bases"), [("bf16", True), ("fp32", False)])
def test_train_keeps_frozen_bases_in_bf16_only_when_it_trains_in_bf16(
    tiny_model_dir, precision, bf16_bases
):
    from steps.train import trainable_model

    model = trainable_model(TrainParams(method="lora", precision=precision), tiny_model_dir)
    dtypes = {p.dtype for n, p in model.named_parameters() if "base_layer" in n}
    assert dtypes == ({torch.bfloat16} if bf16_bases else {torch.float32})
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
