"""Registry operations (flows/models.py, `llmpipe models|promote|rollback`) and the like-for-like
gate (steps/register.py champion_reference): unit tests on a real sqlite registry, then the CLI on
a copy of the golden project, serving for real."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flows.models import list_models, rollback, stored_decision
from steps.errors import UserError
from steps.params import Params, load_params
from steps.promote import promote
from steps.registry import champion_version, measurement_tags

LLMPIPE = Path(sys.executable).parent / "llmpipe"
MEASURED = {"test_split_hash": "s" * 64, "window": "64", "stride": "32",
            "tokenizer_hash": "t" * 16, "precision": "fp32", "device": "cpu"}  # fmt: skip


def metric_tags(ppl: float, upper: float, base: float, bpb: float = 1.0, **measured) -> dict:
    return {
        "perplexity": str(ppl), "perplexity_ci_high": str(upper), "base_perplexity": str(base),
        "forgetting": "0.1", "bits_per_byte": str(bpb), "bits_per_byte_ci_high": str(bpb * 1.05),
        **measurement_tags({**MEASURED, **measured}),
    }  # fmt: skip


@pytest.fixture
def registry(tmp_path) -> tuple[Path, str]:
    """A project directory whose mlflow.db holds `llmpipe` with four versions (no alias yet)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    client.create_registered_model("llmpipe")
    for tags in (
        metric_tags(10.0, 10.5, 14.0),
        metric_tags(9.0, 9.5, 14.0),
        metric_tags(9.6, 9.9, 14.0),  # worse than v2
        metric_tags(8.0, 8.4, 14.0, stride="64"),  # measured another way
    ):
        client.create_model_version("llmpipe", source=str(tmp_path), tags=tags)
    return tmp_path, uri


def version(uri: str, number: str):
    from mlflow import MlflowClient

    return MlflowClient(uri).get_model_version("llmpipe", number)


@pytest.mark.unit
def test_rollback_walks_back_the_chain_and_history_keeps_every_move(registry):
    project, uri = registry
    promote(uri, "llmpipe", "1", "none")
    promote(uri, "llmpipe", "2", "1", how="cli")
    assert rollback(project, Params()) == "champion rolled back from version 2 to version 1"
    assert str(champion_version(uri, "llmpipe").version) == "1"
    assert "rolled_back_at" in version(uri, "2").tags
    with pytest.raises(UserError, match="champion v1 replaced no earlier champion; nothing"):
        rollback(project, Params())
    listing = json.loads(list_models(project, Params(), as_json=True))
    moves = [line.split(" ", 1)[1] for line in listing["champion_history"]]
    assert moves == [
        "champion none -> 1 (run)",
        "champion 1 -> 2 (cli)",
        "champion 2 -> 1 (rollback)",
    ]
    assert [v["version"] for v in listing["versions"]] == ["4", "3", "2", "1"]
    assert listing["versions"][3]["aliases"] == ["champion"]


@pytest.mark.unit
def test_rollback_and_listing_without_a_champion_or_registry_are_one_line(registry, tmp_path):
    project, _ = registry
    with pytest.raises(UserError, match="llmpipe has no champion; nothing to roll back"):
        rollback(project, Params())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"no registry at sqlite:///.*; `llmpipe run` registers"):
        list_models(empty, Params())
    assert not (empty / "mlflow.db").exists()  # looking created nothing


@pytest.mark.unit
def test_models_lists_metrics_aliases_and_how_each_was_measured(registry):
    project, uri = registry
    promote(uri, "llmpipe", "2", "none")
    text = list_models(project, Params())
    assert text.splitlines()[0].startswith("llmpipe at sqlite:///") and "4 version(s)" in text
    assert "v2    [champion] perplexity 9.000 (upper 9.500), base 14.000" in text
    assert "window 64/stride 32, fp32 on cpu, tokenizer tttttttt" in text
    assert "window 64/stride 64" in text  # v4's own record
    assert "champion none -> 2 (run)" in text


@pytest.mark.unit
def test_stored_gate_compares_like_with_like_or_refuses(registry):
    _, uri = registry
    champion = version(uri, "2")
    better = stored_decision(version(uri, "1"), None, Params())  # no champion: beats base
    assert better.promote and "no current champion" in better.reasons
    worse = stored_decision(version(uri, "3"), champion, Params())
    assert not worse.promote
    assert worse.reasons[-1] == (
        "does not beat the champion: upper bound 9.900 >= 9.000 "
        "(stored values of v3 and v2, measured alike)"
    )
    with pytest.raises(UserError, match=r"version 4 and champion v2 were measured differently "):
        stored_decision(version(uri, "4"), champion, Params())
    with pytest.raises(UserError, match=r"\(stride 32 vs 64\)"):
        stored_decision(version(uri, "4"), champion, Params())


@pytest.mark.unit
def test_stored_gate_across_tokenizers_compares_bits_per_byte(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    client.create_registered_model("llmpipe")
    # perplexity 30 looks far worse than 9, but it counts other tokens: per byte it is better
    champ = client.create_model_version("llmpipe", "x", tags=metric_tags(9.0, 9.5, 14.0, bpb=1.2))
    other = metric_tags(30.0, 31.0, 40.0, bpb=1.0, tokenizer_hash="u" * 16)
    cand = client.create_model_version("llmpipe", "x", tags=other)
    decision = stored_decision(cand, champ, Params())
    assert decision.promote is True
    assert decision.reasons[-1].startswith(
        "beats the champion in bits per byte: upper bound 1.050 < 1.200"
    )


# -- on the golden project: the gate re-scores a champion measured another way; the CLI --------


@pytest.mark.integration
def test_register_reuses_a_champion_value_only_when_measured_alike(project, monkeypatch):
    from mlflow import MlflowClient

    from steps.register import champion_reference
    from steps.scoring import heldout, load_metric, load_model, perplexity

    uri = f"sqlite:///{project}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # where models:/ URIs are looked up
    champion = MlflowClient(uri).get_model_version_by_alias("llmpipe", "champion")
    metrics = json.loads((project / "metrics/eval.json").read_text())
    prepared, ev = project / "data/prepared", load_params(project / "params.yaml").evaluate
    same = champion_reference(champion, "llmpipe", prepared, metrics, ev)
    assert same.value == float(champion.tags["perplexity"]) and "stored" in same.note
    # the candidate was scored at stride 16: the champion's stride-32 value is not reused
    ev16 = ev.model_copy(update={"stride": 16})
    texts = heldout(prepared).items
    model, tok = load_model(f"models:/llmpipe/{champion.version}")
    truth = perplexity(load_metric(), model, tok, texts, ev16)
    strided = {**metrics, "measured": {**metrics["measured"], "stride": "16"}}
    ref = champion_reference(champion, "llmpipe", prepared, strided, ev16)
    assert ref.unit == "perplexity" and ref.value == pytest.approx(truth["perplexity"], rel=1e-9)
    assert ref.value != pytest.approx(same.value, rel=1e-6)
    assert "re-scored here; it was measured with stride 32 vs 16" in ref.note
    # another tokenizer on the candidate's side: compared in bits per byte
    other = {**metrics, "measured": {**metrics["measured"], "tokenizer_hash": "0" * 16}}
    ref = champion_reference(champion, "llmpipe", prepared, other, ev)
    assert ref.unit == "bits per byte" and ref.tuned_upper == metrics["bits_per_byte_ci_high"]
    assert ref.value == pytest.approx(metrics["bits_per_byte"], rel=1e-6)  # same model, same text
    # a champion registered before measurements were recorded is re-scored too
    bare = MlflowClient(uri)
    for key in [k for k in champion.tags if k.startswith("measured_")]:
        bare.delete_model_version_tag("llmpipe", champion.version, key)
    old = bare.get_model_version("llmpipe", champion.version)
    ref = champion_reference(old, "llmpipe", prepared, metrics, ev)
    assert "window unrecorded vs 64" in ref.note
    assert ref.value == pytest.approx(same.value, rel=1e-6)


def llmpipe(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LLMPIPE), *args], cwd=project, capture_output=True, text=True, timeout=600
    )


@pytest.mark.integration
def test_promote_and_rollback_from_the_command_line(project, monkeypatch):
    """A worse version is refused by the gate, promoted with --force --reason after it served,
    listed, then rolled back; every move is in the history."""
    from mlflow import MlflowClient

    from steps.registry import log_and_register

    uri = f"sqlite:///{project}/mlflow.db"
    client = MlflowClient(uri)
    v1 = client.get_model_version("llmpipe", "1")
    # the base model, registered as v2 with v1's record but a worse perplexity
    worse = {**v1.tags, "perplexity_ci_high": "1e6", "model_hash": "base"}
    run = client.create_run(client.get_experiment_by_name("llmpipe").experiment_id)
    with monkeypatch.context() as env:  # as inside a flow run: log into that run
        env.setenv("MLFLOW_TRACKING_URI", uri)
        env.setenv("MLFLOW_RUN_ID", run.info.run_id)
        log_and_register(uri, "llmpipe", project / "models/base", worse)

    refused = llmpipe(project, "promote", "2")
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith("error: version 2 does not pass the gate: ")
    assert (
        "does not beat the base model" in refused.stderr and len(refused.stderr.splitlines()) == 1
    )
    no_reason = llmpipe(project, "promote", "2", "--force")
    assert no_reason.returncode == 2
    assert (
        no_reason.stderr == "error: --force needs --reason TEXT (it is recorded on the version)\n"
    )
    missing = llmpipe(project, "promote", "7")
    assert missing.stderr == (
        "error: llmpipe has no version '7' (versions: 2, 1); see `llmpipe models`\n"
    )
    assert str(champion_version(uri, "llmpipe").version) == "1"  # refusals moved nothing

    forced = llmpipe(project, "promote", "2", "--force", "--reason", "hotfix for ticket 12")
    assert forced.returncode == 0, forced.stderr
    assert "gate skipped (--force): hotfix for ticket 12" in forced.stdout
    assert "champion moved from 1 to version 2" in forced.stdout
    v2 = client.get_model_version("llmpipe", "2")
    assert v2.aliases == ["champion"] or "champion" in v2.aliases
    assert v2.tags["force_reason"] == "hotfix for ticket 12" and v2.tags["promoted_by"] == "forced"
    assert float(v2.tags["serve_p95_ms"]) > 0  # it served before it moved

    listed = llmpipe(project, "models")
    assert listed.returncode == 0 and "promoted over 1 by forced; forced: hotfix" in listed.stdout
    back = llmpipe(project, "rollback")
    assert back.stdout == "champion rolled back from version 2 to version 1\n", back.stderr
    assert str(champion_version(uri, "llmpipe").version) == "1"
    history = json.loads(llmpipe(project, "models", "--json").stdout)["champion_history"]
    assert [h.split(" ", 1)[1] for h in history] == [
        "champion none -> 1 (run)",
        "champion 1 -> 2 (forced)",
        "champion 2 -> 1 (rollback)",
    ]
    again = llmpipe(project, "rollback")
    assert again.returncode == 2 and "replaced no earlier champion" in again.stderr
