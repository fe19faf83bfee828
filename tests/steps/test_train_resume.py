"""A crashed training run leaves no model behind; a retry resumes from its last complete checkpoint
and ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import shutil

import pytest

from benchmarks.workloads import crash_trainer_at, loss_curve, prepared_docs

pytestmark = pytest.mark.unit

DOCS = [
    f"Entry {i}: a while loop repeats its body while {i} is below the limit." for i in range(60)
]


def prepared_data(tmp_path, tiny_model_dir):
    """DOCS prepared for the tiny model in blocks of 16 tokens: the directory."""
    return prepared_docs(tmp_path, tiny_model_dir, DOCS)


def test_a_retry_resumes_from_the_last_complete_checkpoint_exactly(
    tmp_path, monkeypatch, tiny_model_dir, capsys
):
    from transformers import Trainer

    from steps.params import TrainParams
    from steps.train import train

    prepared, ckpts = prepared_data(tmp_path, tiny_model_dir), tmp_path / "checkpoints"
    params = TrainParams(max_steps=8, save_steps=2, batch_size=2, learning_rate=1e-3, seed=7)
    outs = (tmp_path / "tuned", tmp_path / "train.json", tmp_path / "loss.csv", ckpts)
    clean = tmp_path / "clean"  # the same run, never interrupted
    expected = train(params, tiny_model_dir, prepared, clean / "tuned", clean / "train.json",
                     clean / "loss.csv", clean / "ckpt")  # fmt: skip

    real_step = Trainer.training_step  # put back after the crash
    crash_trainer_at(monkeypatch, 6)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(params, tiny_model_dir, prepared, *outs)
    assert not (tmp_path / "tuned").exists()  # nothing half-written
    [run_dir] = ckpts.glob("train-*")
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-4"]
    # a later checkpoint cut short while saving: weights there, but no trainer_state.json (last)
    half = run_dir / "checkpoint-6"
    shutil.copytree(run_dir / "checkpoint-4", half)
    (half / "trainer_state.json").unlink()

    monkeypatch.setattr(Trainer, "training_step", real_step)
    capsys.readouterr()
    metrics = train(params, tiny_model_dir, prepared, *outs)
    out = capsys.readouterr().out
    assert "checkpoint-6 is incomplete" in out and "resuming from" in out
    assert f"resuming from {run_dir / 'checkpoint-4'}" in out
    assert metrics["steps"] == 8 and (tmp_path / "tuned" / "model.safetensors").is_file()
    assert not any(ckpts.iterdir())  # checkpoints are removed on success
    resumed, uninterrupted = loss_curve(tmp_path / "loss.csv"), loss_curve(clean / "loss.csv")
    assert resumed.keys() == uninterrupted.keys() == set(range(1, 9))
    for step in range(5, 9):  # the steps trained after the resume
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-5), step
    assert metrics["eval_loss"] == pytest.approx(expected["eval_loss"], abs=1e-5)


def test_the_fingerprint_covers_the_base_weights(tmp_path, tiny_model_dir):
    """Another model of the same shape (same config, other weights) must not resume this run."""
    from steps.params import TrainParams
    from steps.train import run_fingerprint

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    data = tmp_path / "data"
    data.mkdir()
    assert run_fingerprint(TrainParams(), data, other) == run_fingerprint(
        TrainParams(), data, tiny_model_dir
    )
    from benchmarks.workloads import build_tiny_model

    build_tiny_model(other, seed=1)  # same shape and config, other weights
    assert (other / "config.json").read_bytes() == (tiny_model_dir / "config.json").read_bytes()
    assert run_fingerprint(TrainParams(), data, other) != run_fingerprint(
        TrainParams(), data, tiny_model_dir
    )


def test_a_run_killed_after_its_last_checkpoint_does_not_train_again(
    tmp_path, monkeypatch, tiny_model_dir, capsys
):
    """Killed after the final checkpoint was saved (while saving the model or evaluating): the
    retry takes the finished weights; resumed, the Trainer would take a step past max_steps."""
    from transformers import Trainer

    from steps.params import TrainParams
    from steps.train import train

    prepared, ckpts = prepared_data(tmp_path, tiny_model_dir), tmp_path / "checkpoints"
    params = TrainParams(max_steps=4, save_steps=2, batch_size=2, learning_rate=1e-3, seed=7)
    outs = (tmp_path / "tuned", tmp_path / "train.json", tmp_path / "loss.csv", ckpts)
    clean = tmp_path / "clean"
    expected = train(params, tiny_model_dir, prepared, clean / "tuned", clean / "train.json",
                     clean / "loss.csv", clean / "ckpt")  # fmt: skip

    def killed_while_evaluating(self, *args, **kwargs):
        raise RuntimeError("simulated kill after the last checkpoint")

    monkeypatch.setattr(Trainer, "evaluate", killed_while_evaluating)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(params, tiny_model_dir, prepared, *outs)
    [run_dir] = ckpts.glob("train-*")
    assert "checkpoint-4" in {p.name for p in run_dir.iterdir()}
    monkeypatch.undo()
    capsys.readouterr()
    metrics = train(params, tiny_model_dir, prepared, *outs)
    assert "holds all 4 steps; not training again" in capsys.readouterr().out
    assert metrics["steps"] == 4
    assert loss_curve(tmp_path / "loss.csv") == pytest.approx(
        loss_curve(clean / "loss.csv"), abs=1e-6
    )
    assert metrics["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-5)
    assert metrics["eval_loss"] == pytest.approx(expected["eval_loss"], abs=1e-5)
