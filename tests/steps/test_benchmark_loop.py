"""benchmarks/loop.py on the tiny Llama: both arms train the same tokens and save on the same
steps, the checkpoint share is projected to the default interval, and the checks line has the
convention's shape."""

from __future__ import annotations

import json
import re

import pytest

from benchmarks.workloads import load_benchmark

pytestmark = pytest.mark.unit

bench = load_benchmark("loop")


def test_checkpoint_share_projects_the_measured_save_and_step_to_the_default_interval():
    # 8 steps in 42 s of which two saves of 2 s: 4.75 s a step; the default run (40 steps, a save
    # every 20) saves twice: 4 / (40 x 4.75 + 4)
    measured = {"seconds": 42.0, "steps": 8, "saves": [2.0, 2.0]}
    assert bench.checkpoint_share(measured, 40, 20) == pytest.approx(4 / 194)
    assert bench.checkpoint_share(measured, 8, 4) == pytest.approx(4 / 42)  # as measured


def test_both_arms_train_and_save_alike_and_the_checks_line_follows_the_convention(
    tiny_model_dir, capsys
):
    assert bench.main(["--model", str(tiny_model_dir), "--steps", "2", "--save-steps", "1"]) == 0
    out = capsys.readouterr().out
    arms = [line for line in out.splitlines() if line.startswith(("llmpipe:", "plain-loop:"))]
    assert len(arms) == 2
    for line in arms:  # the same tokens (2 steps x 2 x 4 blocks of 256), a save after each step
        assert line.split(":")[1].strip().startswith("4,096 tokens"), line
        saves = re.search(r"saves included \(([^)]*) s\)", line).group(1).split(", ")
        assert len(saves) == 2, line
    result = json.loads(out.strip().splitlines()[-1])
    assert result["benchmark"] == "loop"
    assert [c["name"] for c in result["checks"]] == list(bench.GOALS)
    for check in result["checks"]:
        assert check["goal"] == bench.GOALS[check["name"]] and check["ratio"] > 0
