"""Where each stage reads and writes, relative to the project root. dvc.yaml lists the same paths
as deps and outs; tests/steps/test_paths.py checks that the two agree."""

from pathlib import Path

EMBEDDED_CORPUS = Path("data/raw/pydoc_topics.jsonl")  # written by steps.corpus
BASE_MODEL_DIR = Path("models/base")  # steps.base_model
PREPARED_DIR = Path("data/prepared")  # steps.prepare: train/, validation/, test/, stats.json
TUNED_MODEL_DIR = Path("models/tuned")  # steps.train
CHECKPOINTS_DIR = Path("checkpoints")  # steps.train; not a DVC out, so a retry can resume
TRAIN_METRICS = Path("metrics/train.json")
LOSS_CURVE = Path("metrics/train_loss.csv")
EVAL_METRICS = Path("metrics/eval.json")  # steps.evaluate
PERPLEXITY_PLOT = Path("metrics/perplexity.csv")
SAMPLES = Path("metrics/samples.json")
FIGURE = Path("metrics/evaluation.png")
