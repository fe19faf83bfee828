"""steps/base_model.py: the embedded model is dequantised once per machine, then copied."""

from __future__ import annotations

import pytest

from steps import base_model
from steps.params import EMBEDDED_MODEL, BaseModelParams

pytestmark = pytest.mark.unit


class Conversions:
    """Stands in for the GGUF download and dequantisation (the real ones run in tests/e2e) with
    the tiny model, counting the conversions made; `fail_next` interrupts the next one."""

    def __init__(self, model_dir):
        self.model_dir, self.made, self.fail_next = model_dir, 0, False

    def convert(self, gguf):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.made += 1
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the conversion was interrupted")
        model = AutoModelForCausalLM.from_pretrained(self.model_dir, use_safetensors=True)
        return model, AutoTokenizer.from_pretrained(self.model_dir)


@pytest.fixture
def conversions(tmp_path, monkeypatch, tiny_model_dir) -> Conversions:
    monkeypatch.setenv("LLMPIPE_CACHE", str(tmp_path / "cache"))
    stand_in = Conversions(tiny_model_dir)
    monkeypatch.setattr(base_model, "fetch_gguf", lambda dest: dest / "model.gguf")
    monkeypatch.setattr(base_model, "load_gguf_model", stand_in.convert)
    return stand_in


def files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_the_embedded_model_is_converted_once_and_copied_into_each_project(
    tmp_path, conversions, capsys
):
    params = BaseModelParams(source=EMBEDDED_MODEL)
    first = base_model.materialise(params, tmp_path, tmp_path / "a/models/base")
    second = base_model.materialise(params, tmp_path, tmp_path / "b/models/base")
    assert conversions.made == 1  # the second project copied the first's conversion
    assert first == second and first["source"] == EMBEDDED_MODEL and first["parameters"] > 0
    made = files(tmp_path / "a/models/base")
    assert made == files(tmp_path / "b/models/base")  # the same bytes: the same DVC hashes
    assert "model.safetensors" in made and "tokenizer.json" in made
    assert base_model.CONVERSION_FACTS not in made
    cached = base_model.conversion_dir()
    assert cached.parent == tmp_path / "cache/smollm2" and "transformers-" in cached.name
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == printed[-2].replace("/a/", "/b/")  # the same line either way


def test_an_interrupted_conversion_leaves_nothing_and_the_next_run_converts_again(
    tmp_path, conversions
):
    conversions.fail_next = True
    params = BaseModelParams(source=EMBEDDED_MODEL)
    with pytest.raises(RuntimeError):
        base_model.materialise(params, tmp_path, tmp_path / "a/models/base")
    assert not base_model.conversion_dir().exists() and not (tmp_path / "a/models").exists()
    base_model.materialise(params, tmp_path, tmp_path / "a/models/base")
    assert conversions.made == 2 and (tmp_path / "a/models/base/model.safetensors").is_file()
