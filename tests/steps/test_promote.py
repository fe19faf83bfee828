"""steps/promote.py: compare-and-set of the champion alias, in a real MLflow registry (sqlite)."""

from __future__ import annotations

import pytest

from steps.promote import promote
from steps.registry import champion_version

pytestmark = pytest.mark.unit


@pytest.fixture
def registry(tmp_path) -> str:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    client.create_registered_model("m")
    for _ in range(3):
        client.create_model_version("m", source=str(tmp_path))
    return uri


def test_the_first_champion_is_set_over_none(registry):
    out = promote(registry, "m", "1", expected="none")
    assert out == {"promoted": True, "reasons": ["champion moved from none to version 1"]}
    version = champion_version(registry, "m")
    assert str(version.version) == "1" and version.tags["promoted_over"] == "none"


def test_a_champion_that_moved_since_the_gate_decided_is_left_alone(registry):
    promote(registry, "m", "1", expected="none")
    assert promote(registry, "m", "2", expected="1")["promoted"] is True  # what the gate saw
    late = promote(registry, "m", "3", expected="1")  # decided against 1, but 2 is champion now
    assert late["promoted"] is False
    assert late["reasons"][0].startswith("champion moved from 1 to 2 while this run was deciding")
    assert str(champion_version(registry, "m").version) == "2"
    stale_none = promote(registry, "m", "3", expected="none")
    assert stale_none["promoted"] is False and str(champion_version(registry, "m").version) == "2"
