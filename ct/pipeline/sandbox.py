"""What of the workspace a training container sees: its `docker run` mounts, decided here.

    python3 -m ct.pipeline.sandbox --workspace W mounts --commit C     one argument a line

The container runs pushed code, so it may write only what the trainer writes: runs/, data/ (the
dataset's caches), studies/ and the latest run's accuracy.txt and metrics.json, which it replaces
at the top of the workspace (so /workspace itself stays writable). The commit's code is mounted
read-only at /code: its snapshot, which has no .git. The rest is the host's:

- hidden behind an empty read-only tmpfs: code/ (the git repository, whose hooks and config would
  run on the host, and every snapshot the host builds and runs), status/ (the process records),
  serving/ (what the service loads, the local service's pid), outbox/ (mail the host sends),
  report/, plot/ and artifacts/ (what Jenkins publishes);
- read-only: models/, whose champion ct.trainer.evaluate and ct.trainer.export read, and the
  host's records at the top that exist as regular files when the container starts (best.json,
  gate.properties, commit.txt, ...): a mount point cannot be replaced or removed. One that does
  not exist yet, or is a symlink, the container can still write: their readers check them
  (ct.pipeline.records) like every other file a container can write.

Each of these, and runs/ and data/ (which the job scripts chown to the container's user as
root), must be a real folder: a symlink there is refused (a mount or chown would follow it), and a
missing one is made first, so that the engine does not make it as root. A mount point cannot be
renamed or replaced from inside the container. Standard library only.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Sequence
from pathlib import Path

from ct import workspace as names
from ct.pipeline import cli
from ct.pipeline.deploy_records import SERVING_DIR
from ct.pipeline.errors import PipelineError
from ct.pipeline.snapshots import snapshot

MOUNT_POINT = "/workspace"
CODE_MOUNT = "/code"
HIDDEN = (names.CODE_DIR, names.STATUS_DIR, SERVING_DIR, names.OUTBOX_DIR, names.REPORT_DIR,
          names.PLOT_FILE.split("/")[0], names.ARTIFACTS_DIR)
READ_ONLY = (names.MODELS_DIR,)
WRITABLE = (names.RUNS_DIR, names.DATA_DIR)  # chowned to the container's user by the scripts
# replaced by a rename, never removed by the pipeline (job6 removes the hand-over records): a
# container that job6 starts again finds each where it was (else it is made anew, lib-process.sh)
HOST_RECORDS = (names.COMMIT_FILE, names.BEST_FILE, names.GATE_PROPERTIES, names.HISTORY_FILE,
                names.PROMOTION_PROPERTIES)


def real_folder(workspace: Path, name: str) -> Path:
    """workspace/name as a real folder (made when missing); PipelineError for a symlink or file."""
    path = workspace / name
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise PipelineError(f"{path} is {'a symlink' if path.is_symlink() else 'not a folder'}, "
                            "not the workspace's folder (a container may have planted it): no "
                            "container started; remove it, then rerun")
    path.mkdir(exist_ok=True)
    return path


def mounts(workspace: Path, commit: str) -> list[str]:
    """The `docker run` arguments that mount the workspace and the commit's code."""
    workspace = workspace.resolve()
    code = snapshot(workspace, commit)
    if any(char in str(workspace) for char in ":,\n"):
        raise PipelineError(f"the workspace path {str(workspace)!r} holds ':', ',' or a newline, "
                            "which docker's mount options cannot carry; move it")
    for name in (*HIDDEN, *READ_ONLY, *WRITABLE):
        real_folder(workspace, name)
    args = ["-v", f"{workspace}:{MOUNT_POINT}", "-v", f"{code}:{CODE_MOUNT}:ro"]
    for name in HIDDEN:
        args += ["--mount", f"type=tmpfs,destination={MOUNT_POINT}/{name},tmpfs-mode=0555"]
    records = [name for name in HOST_RECORDS
               if (workspace / name).is_file() and not (workspace / name).is_symlink()]
    for name in (*READ_ONLY, *records):
        args += ["--mount", f"type=bind,source={workspace / name},"
                            f"destination={MOUNT_POINT}/{name},readonly"]
    return args


def cmd_mounts(workspace: Path, args: Namespace) -> str:
    return "\n".join(mounts(workspace, args.commit))


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.parser("ct.sandbox", __doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("mounts", help="the container's mounts, one argument a line").add_argument(
        "--commit", required=True)
    args = parser.parse_args(argv)
    workspace = cli.workspace_or_exit(parser, args.workspace)

    def action() -> int:
        print(cmd_mounts(workspace, args))
        return 0

    return cli.run("ct.sandbox", action)


if __name__ == "__main__":
    raise SystemExit(main())
