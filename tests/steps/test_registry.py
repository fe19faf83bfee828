"""steps/registry.py: serving requirements, and what counts as "no champion" in a real registry."""

from __future__ import annotations

import re
from importlib.metadata import version

import pytest

from steps.registry import (
    SERVING_PACKAGES,
    alias_version,
    champion_version,
    find_version_by_tag,
    pip_requirements,
)

pytestmark = pytest.mark.unit


def test_pip_requirements_pin_exact_versions():
    reqs = pip_requirements()
    assert [r.split("==")[0] for r in reqs] == list(SERVING_PACKAGES)
    assert {"torch", "transformers", "mlflow"} <= set(SERVING_PACKAGES)
    for req in reqs:
        assert re.fullmatch(r"[a-z0-9_.-]+==\d+(\.\d+)*([a-z]+\d*)?(\.post\d+|\.dev\d+)?", req), req
        assert "+" not in req
        name, pinned = req.split("==")
        assert version(name).split("+")[0] == pinned
    assert f"torch=={version('torch').split('+')[0]}" in reqs


@pytest.fixture
def registry(tmp_path):
    """A real MLflow registry (sqlite) with model `m`: version 1 tagged, alias `champion` on it."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    client.create_registered_model("m")
    mv = client.create_model_version("m", source=str(tmp_path), tags={"model_hash": "abc"})
    client.set_registered_model_alias("m", "champion", mv.version)
    return uri, client


def test_alias_lookup_finds_the_version_and_none_only_when_unset(registry):
    uri, client = registry
    assert alias_version(client, "m", "champion").version == 1
    assert champion_version(uri, "m").version == 1
    assert alias_version(client, "m", "challenger") is None  # alias not set
    assert champion_version(uri, "never-registered") is None  # model not registered


def test_an_mlflow_failure_is_not_read_as_no_champion(registry, tmp_path):
    """A broken tracking store must raise, not look like a registry without a champion."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import DatabaseError

    bad = tmp_path / "not-a-database"
    bad.write_text("this is not sqlite")
    with pytest.raises((MlflowException, DatabaseError)):
        champion_version(f"sqlite:///{bad}", "m")


def test_only_unset_alias_and_unknown_model_errors_mean_none():
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2 as codes

    from steps.registry import is_unset_alias

    unset = MlflowException(
        "Registered model alias champion not found.", codes.INVALID_PARAMETER_VALUE
    )
    unknown = MlflowException(
        "Registered Model with name=m not found", codes.RESOURCE_DOES_NOT_EXIST
    )
    locked = MlflowException("database is locked", codes.INTERNAL_ERROR)
    refused = MlflowException("Permission denied", codes.PERMISSION_DENIED)
    bad_name = MlflowException("Invalid alias name", codes.INVALID_PARAMETER_VALUE)
    assert is_unset_alias(unset) and is_unset_alias(unknown)
    assert not any(is_unset_alias(e) for e in (locked, refused, bad_name))


def test_find_version_by_tag(registry):
    _, client = registry
    assert find_version_by_tag(client, "m", "model_hash", "abc").version == 1
    assert find_version_by_tag(client, "m", "model_hash", "zzz") is None
    assert find_version_by_tag(client, "m", "model_hash", "") is None
