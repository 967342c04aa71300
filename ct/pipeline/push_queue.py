"""The pushes waiting to be trained: status/pushes.json, oldest first. Standard library only.

Written and read only here, always under one lock (status/pushes.lock): job1 of a new push may
add while job3 takes. job1 adds the pushed commit, job3 takes the oldest, job6 hands the oldest
to job3 when the workspace is idle (ct.pipeline.pushes decides when).

Two settings (environment; the defaults are written here, once):

    CT_PUSH_ORDER      all (default): every push is trained, oldest first.
                       newest: only the newest waiting push is kept (an older waiting one is
                       dropped when a newer arrives, and said), and a failed run of an older commit
                       is not restarted while a newer push waits: the newer one trains instead.
    CT_PUSH_QUEUE_MAX  how many pushes may wait (default 20). A push beyond it is refused with a
                       clear error (job1 fails), never dropped silently.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from ct import untrusted
from ct import workspace as names
from ct.pipeline import records
from ct.pipeline.errors import PipelineError

ORDERS = ("all", "newest")
DEFAULT_ORDER = "all"
DEFAULT_MAX = 20
COMMIT_ID = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
REF = re.compile(r"[^\x00-\x1f\x7f]{0,200}")
LOCK_FILE = f"{names.STATUS_DIR}/pushes.lock"
MAX_QUEUE = 1 << 20  # thousands of pushes; more is not a queue job1 wrote
REMEDY = "remove it to forget the waiting pushes (push again to queue them anew)"


@dataclass(frozen=True)
class Push:
    commit: str
    ref: str
    pushed_at: str


@dataclass(frozen=True)
class Settings:
    order: str = DEFAULT_ORDER
    limit: int = DEFAULT_MAX


def settings(env: Mapping[str, str] = os.environ) -> Settings:
    """CT_PUSH_ORDER and CT_PUSH_QUEUE_MAX, checked; empty means the default."""
    order = env.get("CT_PUSH_ORDER", "") or DEFAULT_ORDER
    if order not in ORDERS:
        raise PipelineError(f"CT_PUSH_ORDER must be all or newest, not {order!r}")
    limit = env.get("CT_PUSH_QUEUE_MAX", "") or str(DEFAULT_MAX)
    if not limit.isdigit() or not 1 <= int(limit) <= 1000:
        raise PipelineError(f"CT_PUSH_QUEUE_MAX must be a whole number in 1..1000, not {limit!r}")
    return Settings(order, int(limit))


# ---------------------------------------------------------------- decisions (pure)


def add(queue: Sequence[Push], push: Push, given: Settings) -> tuple[list[Push], str]:
    """The queue with `push` added, and what happened, in words."""
    if any(waiting.commit == push.commit for waiting in queue):
        return list(queue), f"commit {push.commit} is queued already: not queued twice"
    if given.order == "newest" and queue:
        dropped = ", ".join(waiting.commit for waiting in queue)
        return [push], (f"commit {push.commit} queued; it replaces the older waiting "
                        f"push(es) {dropped} (CT_PUSH_ORDER=newest)")
    if len(queue) >= given.limit:
        raise PipelineError(
            f"{len(queue)} pushes are waiting already (CT_PUSH_QUEUE_MAX={given.limit}): commit "
            f"{push.commit} is NOT queued; push it again once the queue is shorter, or raise "
            "CT_PUSH_QUEUE_MAX, or set CT_PUSH_ORDER=newest")
    position = len(queue) + 1
    return [*queue, push], f"commit {push.commit} queued (position {position})"


def superseding(queue: Sequence[Push], commit: str, given: Settings) -> str:
    """The waiting push that makes a failed run of `commit` not worth restarting: with
    CT_PUSH_ORDER=newest, the newest waiting push of another commit; "" otherwise."""
    if given.order != "newest" or not queue or queue[-1].commit == commit:
        return ""
    return queue[-1].commit


# ---------------------------------------------------------------- the record


def queue_file(workspace: Path) -> Path:
    return workspace / names.PUSHES_STATUS


def parse(text: str, path: Path) -> list[Push]:
    """The queue in `text`; anything but the exact shape written here is a PipelineError."""
    obj, problem = records.parse_json_object(text)
    entries = obj.get("pushes") if obj is not None else None
    if obj is None or obj.get("format") != 1 or not isinstance(entries, list):
        raise PipelineError(f"{path} is damaged ({problem or 'not a push queue'}); {REMEDY}")
    queue = []
    for entry in entries:
        fields = entry if isinstance(entry, dict) else {}
        ok = (set(fields) == {"commit", "ref", "pushed_at"}
              and all(isinstance(value, str) for value in fields.values())
              and COMMIT_ID.fullmatch(fields["commit"]) and REF.fullmatch(fields["ref"])
              and re.fullmatch(records.TIME, fields["pushed_at"]))
        if not ok:
            raise PipelineError(f"{path} is damaged (an entry is not a push: {entry!r:.80}); "
                                f"{REMEDY}")
        queue.append(Push(**fields))
    return queue


def load(workspace: Path) -> list[Push]:
    """The waiting pushes, oldest first ([] when none ever waited). Never follows a symlink."""
    path = queue_file(workspace)
    try:
        text = untrusted.read_text(path, MAX_QUEUE, root=workspace)
    except untrusted.Missing:
        return []
    except untrusted.UntrustedFile as err:
        raise PipelineError(f"{path} cannot be read ({err.cause}); {REMEDY}") from None
    return parse(text, path)


def save(workspace: Path, queue: Sequence[Push]) -> None:
    text = json.dumps({"format": 1, "pushes": [asdict(push) for push in queue]}, indent=1)
    remedy = records.fix_workspace(workspace, "the push queue is unchanged", "rerun this job")
    status_folder(workspace, remedy)
    records.write_files({queue_file(workspace): text + "\n"}, remedy)


def status_folder(workspace: Path, remedy: str) -> None:
    """status/, made when missing, a real folder of W: the queue and its lock are never written
    through a link the container planted."""
    try:
        untrusted.real_folder(workspace, names.STATUS_DIR, create=True)
    except untrusted.UntrustedFile as err:
        raise PipelineError(f"cannot use {err.path} ({err.cause}); {remedy}") from None


@contextmanager
def locked(workspace: Path) -> Iterator[None]:
    """Hold the queue's lock (an flock, released when the holder dies) for a read-modify-write."""
    path = workspace / LOCK_FILE
    status_folder(workspace, "move it away, then rerun this job")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        raise PipelineError(f"cannot open the queue's lock {path} "
                            f"({records.os_reason(err)}); remove it if it is not a file") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
