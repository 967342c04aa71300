"""Which push trains when: one commit's chain at a time per workspace. Standard library only.

    python3 -m ct.pipeline.pushes add --commit C [--ref R]          job1: queue a push
    python3 -m ct.pipeline.pushes head [--retrain]                  job2: the next commit to train
    python3 -m ct.pipeline.pushes take --max-restarts N --seen ROLE=STATE ...        job3
    python3 -m ct.pipeline.pushes dispatch --max-restarts N --seen ROLE=STATE ...    job6
    python3 -m ct.pipeline.pushes list

A commit's chain is its training run, the run's verdict, and the tuning it may be handed to. While
one is under way (a process running, or failed and about to be restarted by job6, or a finished
run awaiting its verdict or its tuning), job3 leaves the next push waiting, prints nothing and
says why; otherwise it takes the oldest waiting push and prints its commit. Pushes wait in
ct.pipeline.push_queue (order and bound: CT_PUSH_ORDER, CT_PUSH_QUEUE_MAX). Under Jenkins job6's
`dispatch` hands the oldest waiting push to job3 (next-push.properties) once the workspace is
idle; the local chain runner (scripts/pipeline.sh) trains the waiting pushes one after another.

`head --retrain` (job2, also the weekly retrain): the oldest waiting push; with none waiting, the
latest push (commit.txt) is queued again, so a retrain trains the current code.

STATE is what the job script saw of each process: running, missing or ended:EXIT_CODE:OOM
(scripts/lib-process.sh seen_spec).
"""

from __future__ import annotations

import os
import re
from argparse import ArgumentTypeError, Namespace
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ct import workspace as names
from ct.pipeline import cli, process, push_queue, records
from ct.pipeline.errors import PipelineError
from ct.pipeline.push_queue import Push
from ct.pipeline.records import VERDICT_RECORD
from ct.pipeline.run_facts import finished_since

ROLES = ("train", "tune")  # the processes a chain runs (tuning helpers follow their round)


@dataclass(frozen=True)
class Busy:
    """A chain under way: its commit, why, and the role of a failed process that job6 would
    restart (only such a chain can be superseded by a newer push)."""

    commit: str
    why: str
    restartable_role: str = ""


# ---------------------------------------------------------------- decisions


def busy(workspace: Path, seen: Mapping[str, process.Seen], max_restarts: int) -> Busy | None:
    """The chain under way in the workspace, or None when it is idle."""
    verdict = records.load_record(workspace, VERDICT_RECORD, missing_ok=True)
    actions: dict[str, str] = {}
    for role in ROLES:
        if not process.process_record(role).file(workspace).exists():
            continue
        record = process.load(workspace, role)
        state = seen.get(role, process.Seen("missing"))
        action = process.decide(
            record, state, max_restarts=max_restarts, follow=False,
            finished_well=finished_since(workspace, role, record["STARTED_AT"]),
            memory=os.environ.get("CT_MEMORY", "")).action
        actions[role] = action
        found = busy_process(workspace, role, record, action, verdict)
        if found:
            return found
    if verdict.get("TUNE") == "true" and not tuning_settled(workspace, verdict,
                                                             actions.get("tune", "")):
        return Busy(verdict["COMMIT"], f"run {verdict['RUN_ID']} of commit {verdict['COMMIT']} "
                                       "was handed to tuning (job5), which has not ended")
    return None


def busy_process(workspace: Path, role: str, record: Mapping[str, str], action: str,
                 verdict: Mapping[str, str]) -> Busy | None:
    commit, name = record["COMMIT"], record["CONTAINER"]
    what = f"the {role} process {name} (commit {commit})"
    if action == "running":
        return Busy(commit, f"{what} is running")
    if action == "restart":
        return Busy(commit, f"{what} ended badly and job6 restarts it", role)
    if action in ("judge", "handed-over"):
        return Busy(commit, f"{what} finished after a restart; its run awaits its verdict (job4)")
    if action == "finished" and finished_since(workspace, role, record["STARTED_AT"]):
        try:
            latest = records.load_metrics(workspace).get("run_id")
        except PipelineError:
            latest = None  # the gate will say what is wrong with it
        if latest != verdict.get("RUN_ID"):
            return Busy(commit, f"{what} finished; its run {latest} awaits its verdict (job4)")
    return None


def tuning_settled(workspace: Path, verdict: Mapping[str, str], tune_action: str) -> bool:
    """job5 ran for the run handed to it and gave up for good (a tuning run that ended well is
    judged, which replaces the verdict; job5 with no round left clears TUNE itself)."""
    if tune_action != "gave-up":
        return False
    record = process.load(workspace, "tune")
    return (record["COMMIT"] == verdict["COMMIT"]
            and record["STARTED_AT"] >= verdict["JUDGED_AT"])


def supersede(workspace: Path, role: str, newer: str) -> None:
    """Mark a failed run of an older commit as given up, so that job6 never restarts it."""
    record = process.load(workspace, role)
    why = (f"superseded by the newer push {newer} (CT_PUSH_ORDER=newest): not restarted, "
           f"{newer} trains instead")
    decision = process.give_up(record["CONTAINER"], {}, why)
    process.save(workspace, role, {**record, **decision.changes})
    cli.say(decision.message)


def take(workspace: Path, seen: Mapping[str, process.Seen], max_restarts: int) -> str:
    """job3: the commit to train now, taken off the queue; "" (after saying why) for none."""
    given = push_queue.settings()
    with push_queue.locked(workspace):
        queue = push_queue.load(workspace)
        if not queue:
            cli.say("no push is waiting: nothing to train (job1 queues pushes; job2 queues the "
                    "latest one again for a retrain)")
            return ""
        found = busy(workspace, seen, max_restarts)
        newer = push_queue.superseding(queue, found.commit, given) if found else ""
        if found and not (found.restartable_role and newer):
            cli.say(f"commit {queue[0].commit} stays queued ({len(queue)} waiting): {found.why}; "
                    "it trains when that chain has ended (job6 hands it on)")
            return ""
        if found:
            supersede(workspace, found.restartable_role, newer)
        push_queue.save(workspace, queue[1:])
    cli.say(f"training commit {queue[0].commit} ({queue[0].ref or 'no ref'}, queued "
            f"{queue[0].pushed_at}); {len(queue) - 1} more waiting")
    return queue[0].commit


def dispatch(workspace: Path, seen: Mapping[str, process.Seen], max_restarts: int) -> str:
    """job6 under Jenkins: hand the oldest waiting push to job3 when the workspace is idle."""
    queue = push_queue.load(workspace)
    if not queue:
        return ""
    found = busy(workspace, seen, max_restarts)
    if found:
        cli.say(f"{len(queue)} push(es) waiting behind commit {found.commit}: {found.why}")
        return ""
    text = records.format_properties({"COMMIT": queue[0].commit}, "written by ct.pushes: job6 -> "
                                     "job3, the next push to train")
    remedy = records.fix_workspace(workspace, "nothing handed on", "rerun job6")
    records.write_files({workspace / names.NEXT_PUSH_PROPERTIES: text}, remedy)
    cli.say(f"the workspace is idle: handing commit {queue[0].commit} to job3 "
            f"({names.NEXT_PUSH_PROPERTIES}); {len(queue)} waiting")
    return queue[0].commit


def head(workspace: Path, retrain: bool) -> str:
    """The oldest waiting push; with --retrain and none waiting, the latest push queued again."""
    with push_queue.locked(workspace):
        queue = push_queue.load(workspace)
        if queue or not retrain:
            return queue[0].commit if queue else ""
        latest = names.recorded_commit(workspace)
        if not push_queue.COMMIT_ID.fullmatch(latest):
            raise PipelineError(f"no push is waiting and {workspace / names.COMMIT_FILE} names "
                                "no commit to retrain: run job1 first")
        push_queue.save(workspace, [Push(latest, "retrain", records.utc_now())])
    cli.say(f"no push is waiting: queuing the latest push, {latest}, again (a retrain)")
    return latest


# ---------------------------------------------------------------- command line


def seen_arg(text: str) -> tuple[str, process.Seen]:
    """ROLE=running|missing|ended:EXIT_CODE:OOM, as lib-process.sh seen_spec prints it."""
    role, _, state = text.partition("=")
    kind, *rest = state.split(":")
    if role not in ROLES or kind not in ("running", "missing", "ended"):
        raise ArgumentTypeError(f"{text!r} is not ROLE=running|missing|ended:CODE:OOM")
    if kind != "ended":
        return role, process.Seen(kind)
    if len(rest) != 2 or not rest[0].lstrip("-").isdigit() or rest[1] not in process.OOM_VALUES:
        raise ArgumentTypeError(f"{text!r}: an ended process is ended:EXIT_CODE:true|false|unknown")
    return role, process.Seen("ended", int(rest[0]), rest[1])


def cmd_add(workspace: Path, args: Namespace) -> str:
    if not push_queue.COMMIT_ID.fullmatch(args.commit):
        raise PipelineError(f"{args.commit!r} is not a full commit id; nothing queued")
    ref = re.sub(r"[\x00-\x1f\x7f]", " ", args.ref)[:200]  # shown in logs: one line, no controls
    push = Push(args.commit, ref, records.utc_now())
    given = push_queue.settings()
    with push_queue.locked(workspace):
        queue, message = push_queue.add(push_queue.load(workspace), push, given)
        push_queue.save(workspace, queue)
    cli.say(message)
    return args.commit


def cmd_list(workspace: Path, _args: Namespace) -> str:
    queue = push_queue.load(workspace)
    lines = [f"{n}. {push.commit} {push.ref} (queued {push.pushed_at})"
             for n, push in enumerate(queue, 1)]
    return "\n".join(lines) if lines else "no push is waiting"


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.parser("ct.pushes", __doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_cmd = sub.add_parser("add", help="job1: queue a pushed commit")
    add_cmd.add_argument("--commit", required=True)
    add_cmd.add_argument("--ref", default="")
    sub.add_parser("head", help="job2: the next commit to train").add_argument(
        "--retrain", action="store_true", help="none waiting: queue the latest push again")
    for name in ("take", "dispatch"):
        command = sub.add_parser(name)
        command.add_argument("--max-restarts", required=True, type=int)
        command.add_argument("--seen", action="append", type=seen_arg, default=[])
    sub.add_parser("list", help="the waiting pushes, oldest first")
    args = parser.parse_args(argv)
    workspace = cli.workspace_or_exit(parser, args.workspace)

    def action() -> int:
        seen = dict(getattr(args, "seen", []))
        if args.command == "take":
            out = take(workspace, seen, args.max_restarts)
        elif args.command == "dispatch":
            out = dispatch(workspace, seen, args.max_restarts)
        elif args.command == "head":
            out = head(workspace, args.retrain)
        else:
            out = {"add": cmd_add, "list": cmd_list}[args.command](workspace, args)
        print(out)
        return 0

    return cli.run("ct.pushes", action)


if __name__ == "__main__":
    raise SystemExit(main())
