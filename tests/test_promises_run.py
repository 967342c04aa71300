"""The README's first command: `make run` runs scripts/pipeline.sh with no argument, which trains
this checkout's committed HEAD (not its working tree, not another branch). Run for real in a
clone: a real git repository, the local runtime, a tiny training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, git, read_props

# the environment running these tests (make test's VENV), which make run of the clone then uses
VENV = Path(sys.prefix) if sys.prefix != sys.base_prefix else REPO / ".venv"


@pytest.fixture
def checkout(source_repo: Path) -> Path:
    """A clone of the project whose HEAD is a branch other than main, with an uncommitted change
    to network.py on top: what HEAD means is then checked three ways."""
    git(source_repo, "checkout", "-qb", "feature")
    network = source_repo / "network.py"
    network.write_text(network.read_text() + "\n# committed on the feature branch\n")
    git(source_repo, "commit", "-qam", "feature: a comment")
    network.write_text(network.read_text() + "\nraise SystemExit('the working tree was run')\n")
    return source_repo


def make(checkout: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-C", str(checkout), f"VENV={VENV}", *args], env=env,
                          capture_output=True, text=True, timeout=900, check=False)


@pytest.mark.slow  # a second whole chain; the fast one is test_chains_local.py
def test_make_run_trains_the_checkouts_committed_head(checkout, script_env):
    env = {k: v for k, v in script_env.items()
           if k not in ("GIT_URL", "GIT_COMMIT", "MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    # a run in seconds (one epoch of a narrow net on 256 images) that passes a threshold of 1%:
    # no tuning, the chain ends at the verdict
    env |= {"CT_THRESHOLD": "1", "CT_TRAIN_ARGS": "--batch-size 64 --epochs 1 --subset 256 "
            "--block-widths 16,32,32 --tta no --tta-translate no --seed 1"}
    # the checkout's make uses this project's environment as it is: never a reinstall into it
    if make(checkout, env, "-q", "venv").returncode != 0:
        pytest.skip(f"{VENV} is not set up for these requirements: run `make venv` first")
    proc = make(checkout, env, "run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    head = git(checkout, "rev-parse", "HEAD")
    assert head != git(checkout, "rev-parse", "main")
    ws = Path(env["CT_WORKSPACE"])
    assert (ws / "commit.txt").read_text().strip() == head
    assert read_props(ws / "status" / "train.properties")["COMMIT"] == head
    metrics = json.loads((ws / "metrics.json").read_text())
    assert metrics["commit"] == metrics["lineage"]["commit"] == head
    assert json.loads((ws / "best.json").read_text())["commit"] == head
    # the run trained the commit, not the uncommitted change beside it
    snapshot = ws / "code" / head / "network.py"
    assert snapshot.read_text() == git(checkout, "show", "HEAD:network.py") + "\n"
    assert "the working tree was run" not in snapshot.read_text()
    # job1 pulled HEAD of this checkout: `pipeline.sh` with no REPO, no REF
    assert f"commit {head} of {checkout.resolve()} HEAD" in proc.stderr
