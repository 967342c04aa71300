"""Recording stand-ins, for tests where the part they replace is not the point (not a test module):

- `FakeDocker`: a `docker` command that answers like an engine (or like one that is down),
  records every call and keeps the tags it "built", for tests of which runtime the scripts pick
  and which image tag job2 asks for. The real engine runs in the slow suite
  (tests/docker_engine.py).
- `stand_in_jobs`: a copy of scripts/ whose job scripts only log their name and do the least the
  chain runner reads (queue a push, take it, write the gate's TUNE), for tests of the order in
  which the real scripts/pipeline.sh runs the jobs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.conftest import REPO, SCRIPTS

FAKE_DOCKER = r"""#!/usr/bin/env bash
# stand-in docker (tests/stand_ins.py): records its arguments, one call a line
printf '%s\n' "$*" >>"$FAKE_DOCKER_LOG"
answers=__ANSWERS__
if [[ "$answers" != 1 ]]; then
  echo "Cannot connect to the Docker daemon at unix:///var/run/docker.sock (stand-in)" >&2
  exit 1
fi
case "$1 ${2:-}" in
  "version "* | "info "*) echo "27.5.1" ;;
  "image inspect") grep -qxF -- "$3" "$FAKE_DOCKER_LOG.built" 2>/dev/null ;;
  "build "*)
    while (($#)); do
      [[ "$1" == -t ]] && printf '%s\n' "$2" >>"$FAKE_DOCKER_LOG.built"
      shift
    done ;;
  *) echo "stand-in docker: no answer for: $*" >&2; exit 97 ;;
esac
"""


class FakeDocker:
    """A stand-in `docker` in its own folder; `path` is a PATH with it first."""

    def __init__(self, folder: Path, answers: bool, path: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.log = folder / "calls.log"
        self.log.touch()
        command = folder / "docker"
        command.write_text(FAKE_DOCKER.replace("__ANSWERS__", "1" if answers else "0"))
        command.chmod(0o755)
        self.env = {"FAKE_DOCKER_LOG": str(self.log), "PATH": f"{folder}:{path}",
                    "DOCKER_HOST": "unix:///nonexistent/stand-in.sock"}

    def calls(self) -> list[list[str]]:
        return [line.split() for line in self.log.read_text().splitlines()]

    def built(self) -> list[str]:
        """The tags passed to `docker build -t`, in order."""
        return [call[call.index("-t") + 1] for call in self.calls() if call[0] == "build"]


def path_without_docker(folder: Path, path: str) -> str:
    """PATH with every `docker` command taken off: each folder on PATH that holds one is replaced
    by a folder of links to its other commands."""
    parts = []
    for entry in path.split(os.pathsep):
        if not (Path(entry) / "docker").exists():
            parts.append(entry)
            continue
        farm = folder / f"no-docker-{len(parts)}"
        farm.mkdir(parents=True)
        for tool in Path(entry).iterdir():
            if tool.name != "docker":
                (farm / tool.name).symlink_to(tool)
        parts.append(str(farm))
    return os.pathsep.join(parts)


JOB = r"""#!/usr/bin/env bash
# stand-in job (tests/stand_ins.py): logs its Jenkins name (job1 ...), the runtime it was given
# and its arguments
set -euo pipefail
source "$(dirname "$0")/lib.sh"
job="$(basename "$0")"
printf '%s %s %s\n' "${job%%-*}" "${CT_RUNTIME:-unset}" "$*" >>"$STAND_IN_LOG"
"""
# What each job does for the runner to go on: job1 queues the pushes (STAND_IN_COMMITS), job3
# takes one (STAND_IN_JOB3_EXIT: its exit code), job4 writes the verdict with TUNE (STAND_IN_TUNE).
JOB_EFFECTS = {
    "job1-pull.sh": 'mkdir -p "$CT_WORKSPACE"\n'
                    'for c in $STAND_IN_COMMITS; do pushes add --commit "$c" >/dev/null; done\n',
    "job3-train.sh": 'echo "took $(ct_py ct.pipeline.pushes --workspace "$CT_WORKSPACE" take'
                     ' --max-restarts 0)" >>"$STAND_IN_LOG"\nexit "${STAND_IN_JOB3_EXIT:-0}"\n',
    "job4-gate.sh": 'passed=true; [[ $STAND_IN_TUNE != true ]] || passed=false\n'
                    'record_set gate ACCURACY 50 THRESHOLD 80 PASSED "$passed" COMMIT ""'
                    ' RUN_DIR "" RUN_ID "" TUNE "$STAND_IN_TUNE"\n',
}


def stand_in_jobs(root: Path) -> Path:
    """A checkout under `root` with the real pipeline.sh and lib*.sh, stand-ins for the job
    scripts, and the real ct/ (lib.sh's CT_ROOT is the folder above scripts/); its pipeline.sh."""
    scripts = root / "scripts"
    scripts.mkdir(parents=True)
    for script in SCRIPTS.glob("*.sh"):
        shutil.copy2(script, scripts / script.name)
    (root / "ct").symlink_to(REPO / "ct")
    for job in scripts.glob("job*-*.sh"):
        job.write_text(JOB + JOB_EFFECTS.get(job.name, ""))
    return scripts / "pipeline.sh"


def logged_jobs(log: Path) -> list[str]:
    """The stand-ins' log: 'job2 docker' per run, arguments appended when there were any."""
    return [" ".join(line.split()) for line in log.read_text().splitlines()]


def run_chain(root: Path, env: dict[str, str], commits: tuple[str, ...], **settings: str
              ) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """The real pipeline.sh over stand-in jobs; its result and the stand-ins' log."""
    pipeline = stand_in_jobs(root)
    log = root / "jobs.log"
    log.touch()
    run_env = {**env, "STAND_IN_LOG": str(log), "STAND_IN_COMMITS": " ".join(commits),
               "STAND_IN_TUNE": "false", "CT_DEPLOY": "1", **settings}
    proc = subprocess.run([str(pipeline)], env=run_env, capture_output=True, text=True,
                          timeout=300, check=False)
    return proc, logged_jobs(log)
