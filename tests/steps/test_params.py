"""steps/params.py: typed params, one-line errors naming every bad key, -S overrides."""

from __future__ import annotations

import shutil

import pydantic
import pytest
import yaml

from benchmarks.workloads import REPO
from steps.errors import UserError
from steps.params import (
    Params,
    TrainParams,
    apply_overrides,
    load_params,
    parse_override,
    parse_params,
)

pytestmark = pytest.mark.unit

SHIPPED = REPO / "params.yaml"


def test_good_mapping_parses_into_frozen_params():
    params = parse_params({"train": {"max_steps": 7, "learning_rate": 0.01}, "serve": {"port": 8}})
    assert isinstance(params, Params)
    assert params.train.max_steps == 7
    assert params.train.learning_rate == 0.01
    assert params.serve.port == 8
    assert params.train.batch_size == TrainParams().batch_size  # defaults fill the rest
    with pytest.raises(pydantic.ValidationError):
        params.train.max_steps = 8
    with pytest.raises(pydantic.ValidationError):
        params.train = TrainParams()


def test_empty_or_none_gives_defaults():
    assert parse_params(None) == Params()
    assert parse_params({}) == Params()


def test_non_mapping_is_a_user_error():
    with pytest.raises(UserError, match="expected a mapping of sections, got list"):
        parse_params([1, 2])


def test_unknown_key_names_it_and_lists_known_keys():
    with pytest.raises(UserError) as info:
        parse_params({"train": {"lr": 1}})
    msg = str(info.value)
    assert "train.lr" in msg
    assert "known: max_steps, learning_rate, batch_size" in msg
    assert "\n" not in msg


def test_unknown_section_lists_sections_with_register_alias():
    with pytest.raises(UserError) as info:
        parse_params({"bogus": {}})
    assert "unknown key 'bogus'" in str(info.value)
    assert "known: base_model, prepare, train, evaluate, register, serve" in str(info.value)


def test_every_bad_value_is_reported_on_one_line():
    raw = {
        "train": {"max_steps": 0, "learning_rate": -1, "lr": 3},
        "prepare": {"block_size": "x"},
        "serve": {"port": 70000},
    }
    with pytest.raises(UserError) as info:
        parse_params(raw, source="my.yaml")
    msg = str(info.value)
    assert msg.startswith("my.yaml: ")
    assert "\n" not in msg
    for key in (
        "'train.max_steps'",
        "'train.learning_rate'",
        "'train.lr'",
        "'prepare.block_size'",
        "'serve.port'",
    ):
        assert key in msg, key
    assert msg.count("; ") == 4


def test_register_section_is_read_through_its_alias():
    params = parse_params({"register": {"model_name": "mine", "min_improvement": 0.2}})
    assert params.registry.model_name == "mine"
    assert params.registry.min_improvement == 0.2
    assert params.model_dump(by_alias=True)["register"] == {
        "model_name": "mine",
        "min_improvement": 0.2,
        "max_forgetting": 0.5,
    }
    with pytest.raises(UserError, match=r"unknown key 'register\.foo' \(known: model_name, min_"):
        parse_params({"register": {"foo": 1}})


def test_shipped_params_yaml_parses():
    params = load_params(SHIPPED)
    raw = yaml.safe_load(SHIPPED.read_text())
    assert params.train.max_steps == raw["train"]["max_steps"]
    assert params.registry.model_name == raw["register"]["model_name"]
    assert params.evaluate.window == raw["evaluate"]["window"]
    assert params.model_dump(by_alias=True) == {
        section: {**Params().model_dump(by_alias=True)[section], **values}
        for section, values in raw.items()
    }


def test_load_params_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(UserError, match=r"nope\.yaml: not found"):
        load_params(missing)


def test_load_params_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  max_steps: 3\n   seed: 4\nserve:\n  port: 1\n")  # bad indent
    with pytest.raises(UserError) as info:
        load_params(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:3: not valid YAML (")
    assert "\n" not in msg


def test_load_params_bad_value_names_the_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("train:\n  max_steps: -1\n")
    with pytest.raises(UserError, match=r"p\.yaml: 'train\.max_steps'"):
        load_params(path)


@pytest.mark.parametrize(
    ("text", "parts", "value"),
    [
        ("train.max_steps=100", ["train", "max_steps"], 100),
        ("train.learning_rate=3.0e-4", ["train", "learning_rate"], 3.0e-4),
        ("train.learning_rate=0.001", ["train", "learning_rate"], 0.001),
        ("serve.host=0.0.0.0", ["serve", "host"], "0.0.0.0"),
        ("base_model.trust_remote_code=true", ["base_model", "trust_remote_code"], True),
        (" train.seed =5", ["train", "seed"], 5),
    ],
)
def test_parse_override(text, parts, value):
    got_parts, got_value = parse_override(text)
    assert got_parts == parts
    assert got_value == value
    assert type(got_value) is type(value)


def test_parse_override_exponent_without_dot_is_a_float():
    _, value = parse_override("train.learning_rate=3e-4")
    assert isinstance(value, float)
    assert value == 3e-4


@pytest.mark.parametrize("text", ["foo", "a.b.c=1", "=3", "train=3", "train.=1", ".x=1"])
def test_parse_override_rejects(text):
    with pytest.raises(UserError, match="-S"):
        parse_override(text)


@pytest.fixture
def params_copy(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(SHIPPED, path)
    return path


def test_apply_overrides_writes_values_and_keeps_comments(params_copy):
    before = params_copy.read_text()
    params = apply_overrides(
        params_copy,
        ["train.max_steps=100", "train.learning_rate=2.5e-4", "register.min_improvement=0.05"],
    )
    assert params.train.max_steps == 100
    assert params.train.learning_rate == 2.5e-4
    assert params.registry.min_improvement == 0.05
    after = params_copy.read_text()
    raw = yaml.safe_load(after)
    assert raw["train"]["max_steps"] == 100
    assert raw["train"]["learning_rate"] == 2.5e-4
    assert raw["register"]["min_improvement"] == 0.05
    assert load_params(params_copy) == params
    # Comments survive: the header line and the end-of-line comment of an untouched key.
    first = before.splitlines()[0]
    assert first.startswith("# ")
    assert after.splitlines()[0] == first
    seed_line = next(line for line in before.splitlines() if line.strip().startswith("seed:"))
    batch_line = next(line for line in before.splitlines() if "batch_size: 2" in line)
    assert seed_line in after.splitlines()
    assert batch_line in after.splitlines()
    assert "# optimizer steps" in next(line for line in after.splitlines() if "max_steps:" in line)
    assert len(after.splitlines()) == len(before.splitlines())
    assert not list(params_copy.parent.glob("*.tmp"))


def test_apply_overrides_without_overrides_writes_nothing(params_copy):
    before = params_copy.read_bytes()
    assert apply_overrides(params_copy, []) == load_params(SHIPPED)
    assert params_copy.read_bytes() == before


def test_apply_overrides_writes_exponent_as_a_number(params_copy):
    apply_overrides(params_copy, ["train.learning_rate=3e-4"])
    assert yaml.safe_load(params_copy.read_text())["train"]["learning_rate"] == 3e-4


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["train.max_steps=5", "train.lr=1"], "train.lr"),
        (["train.max_steps=0"], "train.max_steps"),
        (["prepare.test_fraction=0.7"], "prepare.test_fraction"),
        (["bogus.key=1"], "bogus"),
        (["train.max_steps=5", "foo"], "foo"),
        (["train.max_steps=5", "a.b.c=1"], "a.b.c"),
    ],
)
def test_apply_overrides_bad_override_writes_nothing(params_copy, overrides, match):
    before = params_copy.read_bytes()
    with pytest.raises(UserError, match=match):
        apply_overrides(params_copy, overrides)
    assert params_copy.read_bytes() == before
    assert sorted(p.name for p in params_copy.parent.iterdir()) == ["params.yaml"]


def test_apply_overrides_bad_value_names_the_override(params_copy):
    with pytest.raises(UserError) as info:
        apply_overrides(params_copy, ["train.max_steps=0"])
    assert "-S train.max_steps=0" in str(info.value)
