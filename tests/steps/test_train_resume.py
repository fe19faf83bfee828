"""A crashed training run leaves no model behind and a retry resumes from its last checkpoint."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.unit

DOCS = [
    f"Entry {i}: a while loop repeats its body while {i} is below the limit." for i in range(60)
]


def test_retry_resumes_from_checkpoint_after_a_crash(tmp_path, monkeypatch, tiny_model_dir, capsys):
    from transformers import AutoTokenizer, Trainer

    from steps.params import PrepareParams, TrainParams
    from steps.prepare import prepare
    from steps.train import train

    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prepared, ckpts = tmp_path / "prepared", tmp_path / "checkpoints"
    prepare(PrepareParams(block_size=16), tmp_path / "docs.jsonl", tokenizer, prepared)
    outs = (tmp_path / "tuned", tmp_path / "train.json", tmp_path / "loss.csv", ckpts)
    params = TrainParams(max_steps=6, save_steps=2, batch_size=2, learning_rate=1e-3)

    real_step, calls = Trainer.training_step, {"n": 0}

    def crash_on_fourth_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated kill")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", crash_on_fourth_step)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(params, tiny_model_dir, prepared, *outs)
    assert not (tmp_path / "tuned").exists()  # nothing half-written
    saved = sorted(p.name for p in ckpts.glob("train-*/checkpoint-*"))
    assert saved == ["checkpoint-2"]

    monkeypatch.setattr(Trainer, "training_step", real_step)
    capsys.readouterr()
    metrics = train(params, tiny_model_dir, prepared, *outs)
    assert "resuming from" in capsys.readouterr().out
    assert metrics["steps"] == 6
    assert (tmp_path / "tuned" / "model.safetensors").is_file()
    assert not any(ckpts.iterdir())  # checkpoints are removed on success
