"""The commits' code snapshots, code/<commit>/: their digest, and which of them to keep.

    python3 -m ct.pipeline.snapshots digest --commit C     the snapshot's code_sha256 (launchers)
    python3 -m ct.pipeline.snapshots prune                 job1, after queuing a push

job1 writes each pushed commit's tree to code/<commit>/, read-only: a run trains that folder, so a
later push never changes the code under a running or resumable run. `prune` removes the snapshots
nothing refers to any more, and prints what it kept and freed. Kept: the commits of the waiting
pushes, of every process record (a run job6 may restart), of the last verdict, of the champion
(best.json) and of the latest push, plus the CT_KEEP_SNAPSHOTS (default 5) newest others, which
`ct.pipeline.lineage --verify` checks recent runs against. So the space they take is bounded by
the queue's bound plus a handful. Standard library only; never follows a symlink.
"""

from __future__ import annotations

import os
import re
import shutil
from argparse import Namespace
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from ct import workspace as names
from ct.pipeline import cli, push_queue, records
from ct.pipeline.errors import PipelineError

DEFAULT_KEEP = 5
SNAPSHOT_NAME = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
LEFTOVER_NAME = re.compile(r"([0-9a-f]{40}|[0-9a-f]{64})\.\w+\.tmp")  # a job1 that died mid-copy


def keep_setting(env: Mapping[str, str] = os.environ) -> int:
    text = env.get("CT_KEEP_SNAPSHOTS", "") or str(DEFAULT_KEEP)
    if not text.isdigit() or int(text) > 1000:
        raise PipelineError(f"CT_KEEP_SNAPSHOTS must be a whole number in 0..1000, not {text!r}")
    return int(text)


def snapshot(workspace: Path, commit: str) -> Path:
    """code/<commit>/ of a full commit id: a real folder, never a link."""
    if not SNAPSHOT_NAME.fullmatch(commit):
        raise PipelineError(f"{commit!r} is not a full commit id")
    path = workspace / names.snapshot_dir(commit)
    if path.is_symlink() or not path.is_dir():
        raise PipelineError(f"{path} is not a snapshot folder; run job1 for commit {commit} again")
    return path


# ---------------------------------------------------------------- what is still needed


def referenced(workspace: Path) -> set[str]:
    """Every commit a waiting push, a status record (a process, the last verdict), the champion
    or the latest push names."""
    found = {push.commit for push in push_queue.load(workspace)}
    status = workspace / names.STATUS_DIR
    for path in sorted(status.glob("*.properties")) if status.is_dir() else []:
        try:
            found.add(records.parse_properties(path.read_text("utf-8")).get("COMMIT", ""))
        except (OSError, UnicodeDecodeError, ValueError):
            continue  # a damaged record names nothing; its own reader says what is wrong
    best, _ = records.read_json_object(workspace / names.BEST_FILE)
    lineage = (best or {}).get(names.LINEAGE)
    for commit in ((best or {}).get("commit"), (lineage or {}).get("commit")
                   if isinstance(lineage, dict) else None):
        if isinstance(commit, str):
            found.add(commit)
    found.add(names.recorded_commit(workspace))
    return {commit for commit in found if SNAPSHOT_NAME.fullmatch(commit)}


def to_remove(snapshots: Mapping[str, float], needed: Iterable[str], keep: int) -> list[str]:
    """The snapshots (commit -> mtime) to remove: neither needed nor among the `keep` newest
    of the rest. Pure."""
    needed = set(needed)
    others = sorted((c for c in snapshots if c not in needed), key=lambda c: -snapshots[c])
    return sorted(others[keep:])


# ---------------------------------------------------------------- the folders


def is_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def size_of(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total


def remove_tree(path: Path) -> None:
    """Remove a read-only snapshot: make its folders writable first (links are not followed)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    for dirpath, _dirs, _files in os.walk(path):
        os.chmod(dirpath, 0o755)
    shutil.rmtree(path)


def mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def prune(workspace: Path, keep: int) -> str:
    code = workspace / names.CODE_DIR
    if not code.is_dir():
        return "snapshots: none yet"
    entries = {entry.name: entry for entry in code.iterdir()}
    snapshots = {name: entry.lstat().st_mtime for name, entry in entries.items()
                 if SNAPSHOT_NAME.fullmatch(name) and is_folder(entry)}
    removed = to_remove(snapshots, referenced(workspace), keep)
    # a job1 that died mid-copy leaves NAME.XXXXXX.tmp; a link or file is nobody's snapshot
    removed += [name for name, entry in entries.items() if LEFTOVER_NAME.fullmatch(name)
                or (SNAPSHOT_NAME.fullmatch(name) and not is_folder(entry))]
    freed = 0
    for name in removed:
        freed += size_of(entries[name])
        remove_tree(entries[name])
    kept = [entries[name] for name in snapshots if name not in removed]
    return (f"snapshots: {len(kept)} kept ({mb(sum(map(size_of, kept)))}), {len(removed)} "
            f"removed ({mb(freed)} freed); CT_KEEP_SNAPSHOTS={keep}")


# ---------------------------------------------------------------- command line


def cmd_digest(workspace: Path, args: Namespace) -> str:
    return names.code_sha256(snapshot(workspace, args.commit))


def cmd_prune(workspace: Path, _args: Namespace) -> str:
    return prune(workspace, keep_setting())


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.parser("ct.snapshots", __doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("digest", help="a snapshot's code_sha256").add_argument("--commit",
                                                                          required=True)
    sub.add_parser("prune", help="remove the snapshots nothing refers to")
    args = parser.parse_args(argv)
    workspace = cli.workspace_or_exit(parser, args.workspace)
    commands = {"digest": cmd_digest, "prune": cmd_prune}

    def action() -> int:
        print(commands[args.command](workspace, args))
        return 0

    return cli.run("ct.snapshots", action)


if __name__ == "__main__":
    raise SystemExit(main())
