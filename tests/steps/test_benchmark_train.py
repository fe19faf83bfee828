"""benchmarks/train.py on the tiny chat model: both layouts supervise the same tokens, the step
plans correspond, the arms train, and the checks line has the convention's shape."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from benchmarks.workloads import SAMPLE_TEXT, load_benchmark

pytestmark = pytest.mark.unit

bench = load_benchmark("train")


def conversations(n: int) -> list[list[dict]]:
    """Chat records of varied lengths; every third has two assistant turns."""
    out = []
    for i in range(n):
        text = SAMPLE_TEXT[i % len(SAMPLE_TEXT)]
        turns = [
            {"role": "user", "content": f"Question {i}?"},
            {"role": "assistant", "content": " ".join([text] * (1 + i % 3))},
        ]
        if i % 3 == 0:
            turns += [{"role": "user", "content": "More?"}, {"role": "assistant", "content": "No."}]
        out.append(turns)
    return out


@pytest.fixture(scope="module")
def prepared(tiny_chat_model_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    work = tmp_path_factory.mktemp("bench-train")
    card = bench.write_data(conversations(13), conversations(3), tokenizer, 96, work)
    return tokenizer, work, card


def targets_by_sequence(batch) -> list[tuple[int, ...]]:
    """The supervised target ids of each sequence in a collated batch; a packed row is cut where
    its position ids restart (padding forms a run of its own, with no targets)."""
    out = []
    for r, labels in enumerate(batch["labels"].tolist()):
        starts = [0]
        if "position_ids" in batch:
            positions = batch["position_ids"][r].tolist()
            starts = [k for k, p in enumerate(positions) if p == 0]
        for a, b in zip(starts, [*starts[1:], len(labels)], strict=True):
            kept = tuple(t for t in labels[a + 1 : b] if t != bench.IGNORE)
            if kept:
                out.append(kept)
    return out


def test_padded_batches_supervise_exactly_the_tokens_of_the_packed_blocks(prepared):
    from datasets import load_from_disk
    from transformers import DataCollatorForSeq2Seq

    from steps.chat import packed_batch

    tokenizer, work, card = prepared
    blocks = list(load_from_disk(str(work / "prepared" / "train")))
    rows = list(load_from_disk(str(work / "padded")))
    packed = bench.CountingCollator(packed_batch)
    padded = bench.CountingCollator(DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100))
    packed_targets, padded_targets = [], []
    for k in range(0, len(blocks), 2):
        packed_targets += targets_by_sequence(packed(blocks[k : k + 2]))
    for k in range(0, len(rows), 4):
        batch = padded(rows[k : k + 4])
        assert batch["input_ids"].shape[1] == max(len(r["input_ids"]) for r in rows[k : k + 4])
        padded_targets += targets_by_sequence(batch)
    assert len(padded_targets) == 13
    assert sorted(packed_targets) == sorted(padded_targets)
    assert packed.supervised == padded.supervised == card["supervised_tokens"] > 13
    assert packed.positions == card["blocks"] * 96
    assert padded.positions > card["tokens"]  # the padding the packed blocks avoid


@pytest.mark.parametrize("n, steps", [(320, 15), (192, 8), (13, 2), (100, 7), (10, 1)])
def test_a_baseline_pass_covers_every_conversation_in_llmpipe_steps(n, steps):
    batch = bench.baseline_batch_size(n, steps)
    assert batch * steps >= n
    assert bench.steps_per_pass(n, batch) <= steps
    assert (batch - 1) * steps < n  # no larger than it needs to be


def test_heldout_conversations_lie_on_prepare_test_side():
    from steps.prepare import record_key, split_of

    train, heldout = bench.select_conversations(40, 10)
    assert len(train) == 40 and len(heldout) == 10
    key = record_key("chat")
    assert {split_of(key({"messages": m}), 0.15, 0.0) for m in heldout} == {"test"}
    assert {split_of(key({"messages": m}), 0.15, 0.0) for m in train} == {"train"}
    assert bench.select_conversations(40, 10) == (train, heldout)  # seeded


def test_multi_turn_conversations_chain_distinct_pairs_of_their_own_side():
    from steps.prepare import record_key, split_of

    train, heldout = bench.select_conversations(60, 12, turns=(1, 4))
    key = record_key("chat")
    for side, conversations in (("train", train), ("test", heldout)):
        pairs = [tuple(map(str, m[k : k + 2])) for m in conversations for k in range(0, len(m), 2)]
        assert len(pairs) == len(set(pairs))  # no QA pair twice
        for m in conversations:
            assert [t["role"] for t in m] == ["user", "assistant"] * (len(m) // 2)
            for k in range(0, len(m), 2):  # each pair on the side prepare would put it
                assert split_of(key({"messages": m[k : k + 2]}), 0.15, 0.0) == side
    assert {len(m) // 2 for m in train} == {1, 2, 3, 4}
    with pytest.raises(bench.MeasureError, match="QA pairs"):
        bench.select_conversations(10, 10**5, turns=(2, 2))


def test_each_arm_trains_the_same_supervised_tokens(prepared, tiny_chat_model_dir):
    import torch

    _, work, card = prepared
    steps = bench.steps_per_pass(card["blocks"], 2)
    batch = bench.baseline_batch_size(card["records"], steps, accumulation=2)
    spec = {
        "model": str(tiny_chat_model_dir),
        "work": str(work),
        "block_size": 96,
        "batch_size": 2,  # blocks per step: 2 micro-batches of 1, accumulated, on every arm
        "micro_batch": 1,
        "accumulation": 2,
        "epochs": 1,
        "steps": steps,
        "baseline_batch_size": batch,
        "baseline_steps": bench.steps_per_pass(card["records"], batch * 2),
        "threads": 1,  # tiny matrices: more threads only wait on each other
    }
    threads = torch.get_num_threads()
    try:
        results = {arm: bench.train_arm(arm, spec) for arm in bench.ARMS}
    finally:
        torch.set_num_threads(threads)  # train_arm sets the process's threads
    bench.check_same_tokens(results, card, epochs=1)
    assert results["packed"]["steps"] == results["lora"]["steps"] == steps
    for r in results.values():
        assert math.isfinite(r["heldout_loss"]) and r["train_seconds"] > 0
        assert r["peak_rss"] >= r["peak_rss_loaded"] > 0
    assert results["lora"]["heldout_loss"] != results["lora"]["base_heldout_loss"]


def fake_results(packed_loss: float, padded_loss: float) -> dict:
    arm = {"train_seconds": 10.0, "load_seconds": 1.0, "train_loss": 2.0, "steps": 5}
    arm.update(cpu_seconds=15.0, threads=2, loadavg=2.0)
    return {
        "padded": dict(arm, supervised=1000, positions=3000, heldout_loss=padded_loss,
                       peak_rss=4e9, peak_rss_loaded=1e9, train_seconds=20.0),
        "packed": dict(arm, supervised=1000, positions=2000, heldout_loss=packed_loss,
                       peak_rss=4e9, peak_rss_loaded=1e9),
        "lora": dict(arm, supervised=1000, positions=2000, heldout_loss=2.5,
                     base_heldout_loss=3.0, peak_rss=2e9, peak_rss_loaded=1e9, train_seconds=8.0),
    }  # fmt: skip


def test_final_loss_ratio_fails_a_difference_either_way():
    _, worse = bench.checks(fake_results(2.1, 2.0), quick=False)
    _, better = bench.checks(fake_results(2.0, 2.1), quick=False)
    ratio = {c["name"]: c["ratio"] for c in worse}["final_loss_ratio"]
    assert ratio == {c["name"]: c["ratio"] for c in better}["final_loss_ratio"] == 1.05
    assert bench.verdict(1.05, "<=1.02").endswith("MISSED")


def test_checks_line_has_the_convention_shape(capsys):
    args = argparse.Namespace(quick=False, heldout=3, epochs=1, block_size=96, batch_size=2)
    args.turns, args.micro_batch = (1, 4), 1
    spec = {"model": "m", "layers": 2, "baseline_batch_size": 4, "accumulation": 2}
    card = {"records": 13, "tokens": 1500, "supervised_tokens": 1000, "blocks": 20}
    card["truncated"] = 1
    card["packing_efficiency"] = 0.78
    line = json.loads(json.dumps(bench.report(args, spec, card, fake_results(2.0, 2.01))))
    assert line["benchmark"] == "train"
    checks = {c["name"]: c for c in line["checks"]}
    assert {name: c["goal"] for name, c in checks.items()} == bench.GOALS
    assert checks["supervised_tokens_per_s_packed_vs_padded"]["ratio"] == 2.0
    assert checks["lora_vs_full_tokens_per_s"]["ratio"] == 1.25
    assert checks["lora_vs_full_peak_rss"]["ratio"] == 0.5
    printed = capsys.readouterr().out
    assert "lora_vs_full_tokens_per_s: 1.2500 (goal >=1.3: MISSED)" in printed
    assert "warning: other processes used the cores" in printed  # 15 CPU s in 2 x 10 s
    _, quick = bench.checks(fake_results(2.0, 2.01), quick=True)
    assert [c["name"] for c in quick] == list(bench.QUICK_CHECKS)
    assert "final_loss_ratio" not in bench.QUICK_CHECKS  # printed only: 3 steps are too few


def test_rounds_keep_each_arms_fastest_with_the_first_rounds_scores(monkeypatch, tmp_path):
    seconds = {("padded", 0): 30.0, ("packed", 0): 12.0, ("lora", 0): 9.0,
               ("padded", 1): 28.0, ("packed", 1): 13.0, ("lora", 1): 8.5}  # fmt: skip
    calls = []

    def fake_run_arm(arm, spec_file, work, score=True):
        n = sum(1 for a, _ in calls if a == arm)
        calls.append((arm, score))
        out = {"train_seconds": seconds[arm, n], "train_loss": 2.0, "peak_rss": 10 + n}
        return {**out, "heldout_loss": 1.5, "base_heldout_loss": 2.5} if score else out

    monkeypatch.setattr(bench, "run_arm", fake_run_arm)
    best = bench.run_rounds(2, tmp_path)
    # the arms in turn, round after round; held-out scoring in the first round only
    assert calls == [(a, True) for a in bench.ARMS] + [(a, False) for a in bench.ARMS]
    assert {a: r["train_seconds"] for a, r in best.items()} == {
        "padded": 28.0, "packed": 12.0, "lora": 8.5
    }  # fmt: skip
    assert best["padded"]["peak_rss"] == 11 and best["packed"]["peak_rss"] == 10  # its round's
    assert best["lora"]["heldout_loss"] == 1.5 and best["lora"]["base_heldout_loss"] == 2.5
    assert best["padded"]["round_seconds"] == [30.0, 28.0]


def test_rounds_that_train_differently_are_refused(monkeypatch, tmp_path):
    losses = iter([2.0, 2.0, 2.0, 2.0, 2.1, 2.0])

    def fake_run_arm(arm, spec_file, work, score=True):
        return {"train_seconds": 1.0, "train_loss": next(losses)}

    monkeypatch.setattr(bench, "run_arm", fake_run_arm)
    with pytest.raises(bench.MeasureError, match="packed arm's rounds trained differently"):
        bench.run_rounds(2, tmp_path)


def test_turns_argument_is_parsed_or_refused(capsys):
    assert bench.parse_args(["--turns", "2"]).turns == (2, 2)
    assert bench.parse_args([]).turns == (1, 1)
    assert bench.parse_args(["--turns", "1-4"]).turns == (1, 4)
    for bad in ("0-2", "3-1", "a-b"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--turns", bad])
        assert "--turns" in capsys.readouterr().err
