"""The stage table: dvc.yaml is its rendering, every stage depends on all the code it runs, and the
data flows forward through the table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from steps import stages
from steps.arguments import stage_arguments
from steps.stages import STAGES, code_deps, command, dvc_stages, render_dvc_yaml

pytestmark = pytest.mark.unit

ROOT = stages.ROOT


def committed_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def dep_paths(entry: dict) -> set[str]:
    return {next(iter(d)) if isinstance(d, dict) else d for d in entry.get("deps", [])}


def test_dvc_yaml_is_the_rendering_of_the_table():
    assert (ROOT / "dvc.yaml").read_text() == render_dvc_yaml(), (
        "dvc.yaml is stale: run `python -m steps.stages --write` and commit it"
    )
    assert list(committed_stages()) == [s.name for s in dvc_stages()]


def runtime_imports(module: str) -> set[str]:
    """Project files that importing `module` loads (module-level imports, seen by Python itself)."""
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        "print(json.dumps([getattr(m, '__file__', None) or ''"
        " for m in list(sys.modules.values())]))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    files = {Path(f) for f in json.loads(done.stdout.splitlines()[-1]) if f}
    return {
        str(f.relative_to(ROOT))
        for f in files
        if f.is_relative_to(ROOT) and f.suffix == ".py" and ".venv" not in f.parts
        and (f.name != "__init__.py" or f.read_text().strip().count("\n") > 2)
    }  # fmt: skip


@pytest.mark.parametrize("stage", dvc_stages(), ids=lambda s: s.name)
def test_every_project_module_a_stage_imports_is_one_of_its_deps(stage):
    deps = dep_paths(committed_stages()[stage.name])
    walked = set(code_deps(stage.module))  # function-local imports included
    assert f"{stage.module.replace('.', '/')}.py" in walked
    assert walked <= deps, f"{stage.name}: missing deps {sorted(walked - deps)}"
    seen = runtime_imports(stage.module)  # an independent check of the walker
    assert seen <= walked, f"{stage.name}: the import walk missed {sorted(seen - walked)}"


def test_the_import_walk_follows_every_kind_of_import(tmp_path):
    pkg = tmp_path / "steps"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""docstring only: runs nothing"""\n')
    (pkg / "sub" / "__init__.py").write_text("LIMIT = 3  # code that runs on import\n")
    (pkg / "a.py").write_text("import json\nfrom steps import b\n\ndef f():\n    import steps.c\n")
    (pkg / "b.py").write_text("from steps.sub.d import x\n")
    (pkg / "c.py").write_text("import torch  # third party: not a project file\n")
    (pkg / "sub" / "d.py").write_text("x = 1\n")
    (pkg / "unused.py").write_text("")
    assert code_deps("steps.a", tmp_path) == [
        "steps/a.py", "steps/b.py", "steps/c.py", "steps/sub/__init__.py", "steps/sub/d.py",
    ]  # fmt: skip


def test_inputs_come_from_earlier_stages_or_from_params():
    produced: set[str] = set()
    for stage in STAGES:
        for name, path in stage.inputs.items():
            from_params = path.startswith("${")
            assert from_params or path in produced, (
                f"{stage.name} --{name} {path}: made by no stage"
            )
        produced |= {out.path for out in stage.outputs.values()}
    outs = [out.path for s in STAGES for out in s.outputs.values()]
    assert len(outs) == len(set(outs)), "two stages write the same path"
    scratch = {p for s in STAGES for p in s.scratch.values()}
    assert not scratch & set(outs)  # DVC deletes outs before a run: checkpoints must not be one


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_each_step_reads_the_command_line_the_table_writes(stage):
    args = stage_arguments(command(stage)[3:])
    assert args.params == Path("params.yaml")
    for name in [*stage.inputs, *stage.outputs, *stage.scratch]:
        assert getattr(args, name) == Path(stage.path(name))
    doc = __import__(stage.module, fromlist=["_"]).__doc__
    assert f"python -m {stage.module}" in doc.split("\n\n")[1], (
        "the docstring opens with its command"
    )


def test_a_missing_or_malformed_argument_is_a_one_line_user_error():
    from steps.errors import UserError

    with pytest.raises(UserError, match=r"--tuned-model missing from the command line"):
        _ = stage_arguments(["--out", "x"]).tuned_model
    with pytest.raises(UserError, match=r"--out needs a value"):
        stage_arguments(["--out"])
    with pytest.raises(UserError, match=r"unexpected argument 'stray'"):
        stage_arguments(["stray"])
    flags = stage_arguments(["--no-promote", "--out", "x"], flags=["--no-promote"])
    assert flags.no_promote is True and flags.out == Path("x")
    texts = stage_arguments(["--version", "3", "--out", "x"], text=["version"])
    assert texts.version == "3" and texts.out == Path("x")
