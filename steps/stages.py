"""Stage table: every stage's module, inputs, outputs, params, timeout and retries, declared once.

    python -m steps.stages            # print the dvc.yaml this table renders
    python -m steps.stages --write    # write it (tests/steps/test_stages.py fails while stale)

dvc.yaml is generated from this table and committed, so `dvc repro` needs nothing but DVC. Each DVC
stage's command carries its paths (`python -m steps.train --base-model models/base ...`), and its
deps are its inputs plus every project module its module imports, directly or not (found by walking
the imports): edit steps/prepare.py and DVC re-runs every stage that reads documents through it.
The flow (flows/finetune.py) runs the stages in this order with these timeouts and retries; a step's
main() reads its paths from that command line (steps/arguments.py) and never imports this table, so
editing one row re-runs only the stage whose command or deps it changes. register, smoke_serve and
promote change MLflow, not files: they are flow tasks with no DVC stage (`dvc=False`).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from steps.params import EMBEDDED_CHAT, EMBEDDED_CORPUS, PARAMS_FILE

ROOT = Path(__file__).resolve().parents[1]  # the project: dvc.yaml, params.yaml, steps/, flows/
PROJECT_PACKAGES = ("steps", "flows")


@dataclass(frozen=True)
class Output:
    path: str
    kind: Literal["outs", "metrics", "plots"] = "outs"
    cache: bool = True  # False: small files kept in git (metrics, plots), not in DVC's cache
    plot: dict[str, str] = field(default_factory=dict)  # DVC plot options: x, y, template


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # run as `python -m <module>`
    inputs: dict[str, str] = field(default_factory=dict)  # option -> path (or ${params.key})
    outputs: dict[str, Output] = field(default_factory=dict)  # option -> output
    params: tuple[str, ...] = ()  # sections of params.yaml it reads
    scratch: dict[str, str] = field(default_factory=dict)  # option -> path DVC does not track
    timeout_s: int = 3600
    retries: int = 2
    dvc: bool = True  # False: a flow task that changes MLflow, not files
    always_changed: bool = False  # DVC runs it every time (it fingerprints something outside)
    lineage: dict[str, str] = field(
        default_factory=dict
    )  # MLflow tag -> option whose DVC md5 it is

    def path(self, option: str) -> str:
        """The path behind an input, output or scratch option."""
        if option in self.outputs:
            return self.outputs[option].path
        return {**self.inputs, **self.scratch}[option]


BASE_MODEL, PREPARED, TUNED_MODEL = "models/base", "data/prepared", "models/tuned"
DATA_CARD = "metrics/data.json"  # what prepare kept and removed, per split (a DVC metric)
EVAL_METRICS, TRAIN_METRICS, LOSS_CURVE = (
    "metrics/eval.json",
    "metrics/train.json",
    "metrics/train_loss.csv",
)

STAGES: tuple[Stage, ...] = (
    Stage(
        "corpus",
        "steps.corpus",
        outputs={"out": Output(EMBEDDED_CORPUS)},
        timeout_s=600,
    ),
    Stage(
        "model_source",
        "steps.model_source",
        outputs={"out": Output("models/base_source.json", cache=False)},
        params=("base_model",),
        timeout_s=600,
        always_changed=True,
    ),
    Stage(
        "qa_corpus",
        "steps.qa_corpus",
        outputs={"out": Output(EMBEDDED_CHAT)},
        timeout_s=600,
    ),
    Stage(
        "base_model",
        "steps.base_model",
        inputs={"source_record": "models/base_source.json"},
        outputs={"out": Output(BASE_MODEL)},
        params=("base_model",),
        timeout_s=3600,
        lineage={"base_model_hash": "out"},
    ),
    Stage(
        "prepare",
        "steps.prepare",
        inputs={"data": "${prepare.data}", "base_model": BASE_MODEL},
        outputs={"out": Output(PREPARED), "card": Output(DATA_CARD, "metrics", cache=False)},
        params=("prepare",),
        timeout_s=3600,
        lineage={"data_hash": "data"},
    ),
    Stage(
        "train",
        "steps.train",
        inputs={"base_model": BASE_MODEL, "prepared": PREPARED},
        outputs={
            "out": Output(TUNED_MODEL),
            "metrics": Output(TRAIN_METRICS, "metrics", cache=False),
            "loss_curve": Output(LOSS_CURVE, "plots", cache=False, plot={"x": "step", "y": "loss"}),
        },
        params=("train",),
        # outside DVC's outs, which DVC deletes before a stage runs: a retry resumes from here
        scratch={"checkpoints": "checkpoints"},
        timeout_s=86400,  # a day covers GPU runs of real size
        lineage={"model_hash": "out"},
    ),
    Stage(
        "evaluate",
        "steps.evaluate",
        inputs={
            "base_model": BASE_MODEL,
            "tuned_model": TUNED_MODEL,
            "prepared": PREPARED,
            "reference": "${evaluate.reference_data}",
            "loss_curve": LOSS_CURVE,
        },
        outputs={
            "metrics": Output(EVAL_METRICS, "metrics", cache=False),
            "samples": Output("metrics/samples.json", cache=False),
            "figure": Output("metrics/evaluation.png", cache=False),
            "perplexity_plot": Output(
                "metrics/perplexity.csv",
                "plots",
                cache=False,
                plot={"template": "bar_horizontal", "x": "perplexity", "y": "model"},
            ),
        },
        params=("evaluate",),
        timeout_s=7200,
    ),
    Stage(
        "register",
        "steps.register",
        inputs={"tuned_model": TUNED_MODEL, "metrics": EVAL_METRICS, "prepared": PREPARED},
        params=("base_model", "prepare", "train", "evaluate", "register"),
        timeout_s=3600,
        dvc=False,
    ),
    Stage(
        "smoke_serve",
        "steps.serve",
        inputs={"prepared": PREPARED},  # held-out prompts for the parity check
        params=("register", "serve"),
        timeout_s=1200,
        retries=1,
        dvc=False,
    ),
    Stage(  # the flow calls steps.promote.promote in its own process (MLflow is loaded there)
        "promote",
        "steps.promote",
        params=("register",),
        timeout_s=600,
        dvc=False,
    ),
)
STAGE = {stage.name: stage for stage in STAGES}


def interpolate(path: str, params: dict) -> str:
    """'${prepare.data}' -> that value of params (a nested dict, as in params.yaml); DVC does the
    same when it reads dvc.yaml."""
    if not (path.startswith("${") and path.endswith("}")):
        return path
    value: object = params
    for key in path[2:-1].split("."):
        value = value[key]  # type: ignore[index]
    return str(value)


def dvc_stages() -> list[Stage]:
    return [stage for stage in STAGES if stage.dvc]


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def command(stage: Stage) -> list[str]:
    """The stage's command line, paths included (relative to the project root, as DVC runs it)."""
    cmd = ["python", "-m", stage.module]
    if stage.params:
        cmd += ["--params", PARAMS_FILE]
    for name, path in [*stage.inputs.items(), *stage.scratch.items()]:
        cmd += [option(name), path]
    for name, out in stage.outputs.items():
        cmd += [option(name), out.path]
    return cmd


def module_file(module: str, root: Path = ROOT) -> Path | None:
    """steps.prepare -> <root>/steps/prepare.py (or a package's __init__.py); None if not ours."""
    if module.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement in `path` names, function-local imports included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _has_code(path: Path) -> bool:
    """A package __init__ that holds more than a docstring runs code on import."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


def code_deps(module: str, root: Path = ROOT) -> list[str]:
    """Project files that `python -m module` imports, directly or not, relative to `root`."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = module_file(name, root)
        if path is None or path in seen:
            continue
        seen.add(path)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run too
        todo += sorted(imported_modules(path))
    keep = [p for p in seen if p.name != "__init__.py" or _has_code(p)]
    return sorted(str(p.relative_to(root)) for p in keep)


def dvc_stage_entry(stage: Stage, root: Path = ROOT) -> dict:
    entry: dict = {"cmd": " ".join(command(stage))}
    entry["deps"] = code_deps(stage.module, root) + list(stage.inputs.values())
    if stage.params:
        entry["params"] = list(stage.params)
    for kind in ("outs", "metrics", "plots"):
        items = []
        for out in stage.outputs.values():
            if out.kind != kind:
                continue
            opts = {**({} if out.cache else {"cache": False}), **out.plot}
            items.append({out.path: opts} if opts else out.path)
        if items:
            entry[kind] = items
    if stage.always_changed:
        entry["always_changed"] = True
    return entry


HEADER = """\
# Generated from steps/stages.py by `python -m steps.stages --write`: edit the table, not this file.
# The pipeline without Prefect: `dvc repro` runs what changed; `dvc metrics show` shows the metrics.
"""


def render_dvc_yaml(root: Path = ROOT) -> str:
    import yaml

    stages = {stage.name: dvc_stage_entry(stage, root) for stage in dvc_stages()}
    body = yaml.safe_dump({"stages": stages}, sort_keys=False, width=100)
    return HEADER + body


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="render dvc.yaml from the stage table")
    parser.add_argument("--write", action="store_true", help="write dvc.yaml at the project root")
    args = parser.parse_args(argv)
    text = render_dvc_yaml()
    if args.write:
        from steps.outputs import write_text

        write_text(ROOT / "dvc.yaml", text)
        print(f"wrote {ROOT / 'dvc.yaml'}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
