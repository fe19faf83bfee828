"""A full disk, simulated on a small tmpfs: the write fails in one line naming the path, the
previous output stays whole, and nothing half-written is left.

The tmpfs is mounted in a private mount namespace (`unshare --mount` as root, or an unprivileged
user namespace), so the host's mounts are never touched and it vanishes with the process; where
neither is allowed (a container without CAP_SYS_ADMIN or user namespaces) the tests are skipped.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.workloads import REPO

pytestmark = pytest.mark.unit

WAYS = (
    ("unshare", "--mount"),  # root, or CAP_SYS_ADMIN
    ("unshare", "--user", "--map-root-user", "--mount"),  # unprivileged user namespaces
)
# sh -c SCRIPT sh MOUNTPOINT SIZE LISTING CMD...: mount, run CMD, list what it left, exit as it
SCRIPT = (
    'mnt=$1 size=$2 listing=$3; shift 3; mount -t tmpfs -o size="$size" tmpfs "$mnt" || exit 125; '
    '"$@"; rc=$?; ls -A "$mnt" > "$listing"; exit $rc'
)


class SmallFs:
    """Runs a command with a small tmpfs mounted at a directory, in a private mount namespace."""

    def __init__(self, way: tuple[str, ...]):
        self.way = way

    def run(self, mountpoint: Path, cmd: list[str], size: str = "64k", **kwargs):
        """(the finished command, the names it left on the small filesystem)."""
        mountpoint.mkdir(parents=True, exist_ok=True)
        listing = mountpoint.parent / f".{mountpoint.name}.listing"
        done = subprocess.run(
            [*self.way, "sh", "-c", SCRIPT, "sh", str(mountpoint), size, str(listing), *cmd],
            capture_output=True, text=True, timeout=120, **kwargs,
        )  # fmt: skip
        assert done.returncode != 125, f"mount failed: {done.stderr}"
        left = listing.read_text().split() if listing.is_file() else None
        return done, left


@pytest.fixture(scope="module")
def small_fs(tmp_path_factory) -> SmallFs:
    if shutil.which("unshare") is None:
        pytest.skip("no `unshare` (util-linux) to mount a small filesystem in a private namespace")
    probe = tmp_path_factory.mktemp("probe")
    for way in WAYS:
        done = subprocess.run([*way, "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$0"', probe],
                              capture_output=True, timeout=30)  # fmt: skip
        if done.returncode == 0:
            return SmallFs(way)
    pytest.skip(
        "cannot mount a small tmpfs: needs root with CAP_SYS_ADMIN (unshare --mount) or "
        "unprivileged user namespaces (unshare --user --map-root-user --mount)"
    )


FILL = """
import json, os, sys
from pathlib import Path
from steps.outputs import DiskFull, atomic_dir, write_bytes, write_json

full = Path(sys.argv[1])
report = {}
write_json(full / "eval.json", {"perplexity": 9.6})
before = (full / "eval.json").read_bytes()
try:
    write_bytes(full / "eval.json", b"x" * 1_000_000)  # larger than the filesystem
except DiskFull as err:
    report["file"] = str(err)
report["file_kept"] = (full / "eval.json").read_bytes() == before

with atomic_dir(full / "tuned") as tmp:
    (tmp / "config.json").write_text("{}")
try:
    with atomic_dir(full / "tuned") as tmp:
        (tmp / "config.json").write_text('{"new": 1}')
        (tmp / "model.safetensors").write_bytes(b"w" * 1_000_000)
except DiskFull as err:
    report["dir"] = str(err)
report["dir_kept"] = os.listdir(full / "tuned") == ["config.json"] and (
    (full / "tuned" / "config.json").read_text() == "{}"
)
print(json.dumps(report))
"""


def test_a_write_that_fills_the_disk_keeps_the_previous_output(small_fs, tmp_path):
    full = tmp_path / "full"
    done, left = small_fs.run(full, [sys.executable, "-c", FILL, str(full)], cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["file"] == (
        f"{full}/eval.json: no space left on device; free some space there and run again"
    )
    assert report["dir"] == (
        f"{full}/tuned: no space left on device; free some space there and run again"
    )
    assert report["file_kept"] and report["dir_kept"]
    assert sorted(left) == ["eval.json", "tuned"]  # no .eval.json.tmp-* or .tuned.tmp-* left


STEP = """
import sys
from pathlib import Path
from steps.outcome import run_main
from steps.outputs import write_bytes

target, how = Path(sys.argv[1]), sys.argv[2]
if how == "outputs":  # a step's output, written atomically
    run_main(lambda: write_bytes(target, b"x" * 1_000_000))
else:  # a library writing on its own (a checkpoint, a cache): a bare OSError
    run_main(lambda: target.write_bytes(b"x" * 1_000_000))
"""


@pytest.mark.parametrize("how", ["outputs", "library"])
def test_a_step_on_a_full_disk_fails_in_one_line_with_exit_2(small_fs, tmp_path, how):
    full, record = tmp_path / "full", tmp_path / "outcome.json"
    target = full / "train.json"
    done, left = small_fs.run(
        full, [sys.executable, "-c", STEP, str(target), how], cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "LLMPIPE_OUTCOME": str(record)},
    )  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    if how == "outputs":
        assert lines[0] == (
            f"error: {target}: no space left on device; free some space there and run again"
        )
        assert left == []
    else:  # write() failing does not say which file; the step still fails in one line
        assert lines[0].startswith("error: ") and "no space left on device" in lines[0]
    assert json.loads(record.read_text())["status"] == "user_error"  # not retried by the flow


def test_data_add_onto_a_full_data_directory_adds_nothing(small_fs, tmp_path):
    from benchmarks.workloads import make_project

    project = make_project(tmp_path / "project", {})
    big = tmp_path / "support.jsonl"
    big.write_text("".join(json.dumps({"text": f"ticket {i}: " + "x" * 200}) + "\n"
                           for i in range(1000)))  # fmt: skip
    params_before = (project / "params.yaml").read_bytes()
    llmpipe = Path(sys.executable).parent / "llmpipe"
    done, left = small_fs.run(
        project / "data" / "raw", [str(llmpipe), "data", "add", str(big)], cwd=project,
        env={"PATH": "/usr/bin:/bin", "LLMPIPE_CACHE": str(tmp_path / "cache"),
             "HOME": str(tmp_path)},
    )  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0] == (
        f"error: {project}/data/raw/support.jsonl: no space left on device; "
        "free some space there and run again"
    )
    assert left == []  # no partial copy, no temporary file
    assert (project / "params.yaml").read_bytes() == params_before
    assert not (project / "data/raw/support.jsonl.dvc").exists()
    assert (project / ".llmpipe.lock").read_text() == ""  # the workspace lock was released
