"""How a training or tuning process stands, and what to do about it. Standard library only.

Each process (role train, tune, or tune-wK for a tuning helper) has a record,
status/<role>.properties, written and read only here. The job scripts start, follow and restart
the process (docker or a local child) and ask this module once per decision:

    python3 -m ct.pipeline.process start   --role R --runtime RT --container C --image I --commit X
    python3 -m ct.pipeline.process get     --role R KEY
    python3 -m ct.pipeline.process ended   --role R --exit-code N --oom true|false|unknown
    python3 -m ct.pipeline.process cycle   --role R --runtime RT --max-restarts N [--follow]
                                           --seen running|ended|missing [--exit-code N --oom X]
    python3 -m ct.pipeline.process restarted --role R --container C
    python3 -m ct.pipeline.process handed-over --role R
    python3 -m ct.pipeline.process tune-round --commit X --max-rounds N
    python3 -m ct.pipeline.process tune-deadline --budget SECONDS

`cycle` is job6's decision for one role: one action word (ACTIONS) on stdout, why on stderr. A
record that fails its check is one line naming it and what to do, exit 2, and no action. The
runtime is the settings' (CT_RUNTIME), never a record's: another runtime's record is refused.
"""

from __future__ import annotations

import hashlib
import os
import re
from argparse import ArgumentParser, ArgumentTypeError, Namespace
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ct import workspace as names
from ct.pipeline import cli, push_queue, records
from ct.pipeline.errors import PipelineError
from ct.pipeline.records import (
    ANY_TEXT,
    BOOL,
    COMMIT,
    IMAGE,
    TIME,
    WHOLE,
    Record,
)
from ct.pipeline.run_facts import finished_since, trained_since

ROLE = r"train|tune|tune-w\d{1,2}"
RUNTIMES = ("docker", "local")
EXIT_CODE = r"(-?\d{1,3})?"
OOM_VALUES = ("true", "false", "unknown")
OOM = rf"({'|'.join(OOM_VALUES)})?"
ACTIONS = ("none", "running", "finished", "judge", "handed-over", "restart", "gave-up")
EXIT_BAD_INPUT = 2  # train.py's status for bad input: a restart would only repeat it


def process_record(role: str) -> Record:
    return Record(
        path=names.process_status(role),
        required={"ROLE": ROLE, "RUNTIME": "|".join(RUNTIMES),
                  "CONTAINER": r"ct-[a-z0-9-]{1,80}|pid-\d{1,10}", "IMAGE": IMAGE,
                  "COMMIT": COMMIT, "RESTARTS": WHOLE,
                  "STATUS": "running|exited|gave-up", "STARTED_AT": TIME},
        optional={"EXIT_CODE": EXIT_CODE, "OOM_KILLED": OOM, "FINISHED_AT": TIME,
                  "GAVE_UP": ANY_TEXT, "HANDED_OVER": BOOL},
        remedy="inspect it; remove it to forget that process (job6 acts on nothing until then)",
    )


ROUNDS_RECORD = Record(path=names.TUNE_ROUNDS_STATUS, required={"COMMIT": COMMIT, "ROUNDS": WHOLE},
                       optional={}, remedy="remove it to count this commit's tuning rounds anew")


# ---------------------------------------------------------------- decisions (pure)


@dataclass(frozen=True)
class Seen:
    """What the job script saw of the process just now: `running`, `ended` (with its exit code
    and OOM flag, from `docker inspect` or a child's wait) or `missing` (no such container, or a
    local process that is gone and no child of this script)."""

    state: str
    exit_code: int | None = None
    oom: str = ""


@dataclass(frozen=True)
class End:
    kind: str  # ok | final (a restart would only repeat it) | failed (a restart may help)
    why: str


@dataclass(frozen=True)
class Decision:
    action: str
    message: str
    changes: dict[str, str] = field(default_factory=dict)


def classify_end(exit_code: int, oom: str, memory: str, in_training: bool) -> End:
    """How an ended process ended. An OOM kill recurs under the same memory, exit 2 is bad
    input: both are final. Anything else (killed, crashed) is worth a restart."""
    limit = f"CT_MEMORY={memory or 'unset'}"
    if oom == "true" and not in_training:
        return End("final", f"OOM-killed before its first epoch, while starting and loading "
                            f"the data (exit code {exit_code}, {limit}): the batch size does not "
                            "matter there; raise CT_MEMORY (a full run peaks at about 1.5 GB), "
                            "then run job3 again")
    if oom == "true":
        return End("final", f"OOM-killed (exit code {exit_code}, {limit}): raise CT_MEMORY or "
                            "lower --batch-size in CT_TRAIN_ARGS/CT_TUNE_ARGS, then run job3 again")
    if exit_code == 0:
        return End("ok", "finished")
    if exit_code == EXIT_BAD_INPUT:
        return End("final", "bad input (exit code 2, see the log's last line): fix it, then push "
                            "again or rerun job3")
    unknown = ", OOM-killed unknown" if oom == "unknown" else ""
    return End("failed", f"exit code {exit_code}{unknown}")


def observed_end(record: Mapping[str, str], seen: Seen, finished_well: bool
                 ) -> dict[str, str]:
    """The record's changes when a process recorded as running is seen to have ended: its exit
    code from `seen`, else 0 when its run wrote its results after it started (a local process
    that is no child of this cycle), else none (vanished)."""
    if record["STATUS"] != "running" or seen.state == "running":
        return {}
    if seen.state == "ended" and seen.exit_code is not None:
        code, oom = seen.exit_code, seen.oom or "false"
    elif finished_well:
        code, oom = 0, "false"
    else:
        return {}
    return {"STATUS": "exited", "EXIT_CODE": str(code), "OOM_KILLED": oom,
            "FINISHED_AT": records.utc_now()}


def decide(record: Mapping[str, str], seen: Seen, *, max_restarts: int, follow: bool,
           finished_well: bool, memory: str = "", in_training: bool = True) -> Decision:
    """job6's decision for one process: keep watching, hand a finished restarted run on,
    restart a failed one within the budget, or give up."""
    name, restarts = record["CONTAINER"], int(record["RESTARTS"])
    if record["STATUS"] == "gave-up":
        return Decision("gave-up", f"gave up on {name} earlier ({record.get('GAVE_UP', '')}); "
                                   "a new run (job3/job5) resets this")
    if record["STATUS"] == "running" and seen.state == "running":
        return Decision("running", f"{name} is running (restarts so far: {restarts})")
    changes = observed_end(record, seen, finished_well)
    now = {**record, **changes}
    if not now.get("EXIT_CODE"):
        end = End("failed", f"vanished (no {name}, no exit code, no finished run)")
    else:
        end = classify_end(int(now["EXIT_CODE"]), now.get("OOM_KILLED", ""), memory, in_training)
    if end.kind == "ok":
        return finished(now, changes, follow)
    if end.kind == "final":
        return give_up(name, changes, f"{end.why} (a restart would only repeat it)")
    if restarts >= max_restarts:
        return give_up(name, changes, f"{end.why} after {restarts} restart(s) "
                                      f"(CT_MAX_RESTARTS={max_restarts})")
    return Decision("restart", f"{name} {end.why}: restarting it ({restarts + 1} of "
                               f"{max_restarts}), resuming from its last checkpoint",
                    {**changes, "RESTARTS": str(restarts + 1)})


def finished(record: Mapping[str, str], changes: dict[str, str], follow: bool) -> Decision:
    """A run job3/job5 saw end is theirs to hand on; one job6 restarted is job6's, once."""
    name = record["CONTAINER"]
    if int(record["RESTARTS"]) == 0 or record.get("HANDED_OVER") == "true":
        return Decision("finished", f"{name} finished", changes)
    if follow:
        return Decision("judge", f"{name} finished: judging the restarted run", changes)
    return Decision("handed-over", f"{name} finished: handing the restarted run over to job4 "
                                   f"({names.HANDOVER_PROPERTIES})",
                    {**changes, "HANDED_OVER": "true"})


def give_up(name: str, changes: dict[str, str], why: str) -> Decision:
    return Decision("gave-up", f"giving up on {name}: {why}",
                    {**changes, "STATUS": "gave-up", "GAVE_UP": why})


def ended_line(role: str, end: End) -> str:
    """job3/job5's one line after a failed run: whether job6 will restart it."""
    if end.kind == "final":
        return f"{role} ended for good: {end.why}; job6 will not restart it"
    return (f"{role} ended with {end.why}; job6 (scripts/job6-monitor.sh) restarts it from its "
            "last checkpoint")


def next_round(record: Mapping[str, str], commit: str, max_rounds: int) -> int | None:
    """The number of this commit's next tuning round, or None when it had max_rounds already."""
    done = int(record["ROUNDS"]) if record.get("COMMIT") == commit else 0
    return done + 1 if done < max_rounds else None


# ---------------------------------------------------------------- facts from the workspace


def write_handover(workspace: Path, record: Mapping[str, str]) -> None:
    """handover.properties for job6's trigger of job4: the restarted run's COMMIT and RUN_DIR
    (metrics.json's, which the container wrote: a RUN_DIR that is no runs/<id> is refused)."""
    try:
        run_dir = records.load_metrics(workspace)["run_dir"]
    except PipelineError:
        run_dir = ""  # job4 then judges the latest run and says what is wrong with it
    handover = {"COMMIT": record["COMMIT"], "RUN_DIR": run_dir}
    records.save_record(workspace, records.HANDOVER_RECORD, handover, "ct.process: job6 -> job4")


# ---------------------------------------------------------------- command line


def container_of(workspace: Path, role: str) -> str:
    """The name lib-process.sh gives ROLE's container in this workspace (container_name)."""
    return f"ct-{role}-{hashlib.sha256(os.path.realpath(workspace).encode()).hexdigest()[:12]}"


def load(workspace: Path, role: str, runtime: str | None = None) -> dict[str, str]:
    record, kind = records.load_record(workspace, process_record(role)), process_record(role)
    # the container can write this record: a name it chose would have job5/job6 stop, start or
    # follow another container (the service's, another workspace's)
    if record["ROLE"] != role or (record["RUNTIME"] == "docker"
                                  and record["CONTAINER"] != container_of(workspace, role)):
        raise PipelineError(f"{kind.file(workspace)} is damaged (it names role {record['ROLE']!r}"
                            f", container {record['CONTAINER']!r}); {kind.remedy}")
    if runtime is not None and record["RUNTIME"] != runtime:
        raise PipelineError(
            f"{process_record(role).file(workspace)} records a {record['RUNTIME']} process, but "
            f"CT_RUNTIME is {runtime}: set CT_RUNTIME={record['RUNTIME']} to watch it, or remove "
            "the record to forget it; nothing done")
    return record


def save(workspace: Path, role: str, record: Mapping[str, str]) -> None:
    records.save_record(workspace, process_record(role), record, "ct.process")


def cmd_start(workspace: Path, args: Namespace) -> int:
    save(workspace, args.role, {
        "ROLE": args.role, "RUNTIME": args.runtime, "CONTAINER": args.container,
        "IMAGE": args.image, "COMMIT": args.commit, "RESTARTS": "0", "STATUS": "running",
        "STARTED_AT": records.utc_now()})
    return 0


def cmd_get(workspace: Path, args: Namespace) -> int:
    if not process_record(args.role).file(workspace).exists():
        print("")
        return 0
    print(load(workspace, args.role).get(args.key, ""))
    return 0


def cmd_ended(workspace: Path, args: Namespace) -> int:
    record = load(workspace, args.role)
    oom = args.oom or "false"
    save(workspace, args.role, {**record, "STATUS": "exited", "EXIT_CODE": str(args.exit_code),
                                "OOM_KILLED": oom, "FINISHED_AT": records.utc_now()})
    end = classify_end(args.exit_code, oom, args.memory,
                       in_training=oom != "true" or trained_since(workspace, args.role,
                                                                  record["STARTED_AT"]))
    if end.kind == "ok":
        return 0
    cli.say(f"error: {ended_line(args.role, end)}")
    return 1


def cmd_cycle(workspace: Path, args: Namespace) -> int:
    if not process_record(args.role).file(workspace).exists():
        print("none")
        return 0
    record = load(workspace, args.role, args.runtime)
    seen = Seen(args.seen, args.exit_code, args.oom or "")
    started = record["STARTED_AT"]
    # each fact costs a look into the workspace: taken only where the decision can turn on it
    ended = seen.state != "running"
    oom_killed = "true" in (seen.oom, record.get("OOM_KILLED"))
    decision = decide(
        record, seen, max_restarts=args.max_restarts, follow=args.follow,
        finished_well=ended and finished_since(workspace, args.role, started), memory=args.memory,
        in_training=not oom_killed or trained_since(workspace, args.role, started))
    if decision.action == "restart":
        decision = unless_superseded(workspace, record, decision)
    if decision.action == "handed-over":
        write_handover(workspace, record)
    if decision.changes:
        save(workspace, args.role, {**record, **decision.changes})
    cli.say(f"{args.role}: {decision.message}")
    print(decision.action)
    return 0


def unless_superseded(workspace: Path, record: Mapping[str, str], restart: Decision
                      ) -> Decision:
    """A failed run of a commit that is no longer the one to train (CT_PUSH_ORDER=newest and a
    newer push waits) is given up, said, instead of restarted; job6 then hands the newer on."""
    newer = push_queue.superseding(push_queue.load(workspace), record["COMMIT"],
                                   push_queue.settings())
    if not newer:
        return restart
    changes = {k: v for k, v in restart.changes.items() if k != "RESTARTS"}
    return give_up(record["CONTAINER"], changes,
                   f"superseded by the newer push {newer} (CT_PUSH_ORDER=newest): not "
                   f"restarted, {newer} trains instead")


def cmd_restarted(workspace: Path, args: Namespace) -> int:
    record = load(workspace, args.role)
    kept = {key: value for key, value in record.items()
            if key not in ("EXIT_CODE", "OOM_KILLED", "FINISHED_AT")}
    save(workspace, args.role, {**kept, "CONTAINER": args.container, "STATUS": "running"})
    return 0


def cmd_handed_over(workspace: Path, args: Namespace) -> int:
    save(workspace, args.role, {**load(workspace, args.role), "HANDED_OVER": "true"})
    return 0


def cmd_tune_round(workspace: Path, args: Namespace) -> int:
    record = records.load_record(workspace, ROUNDS_RECORD, missing_ok=True)
    number = next_round(record or {"COMMIT": "", "ROUNDS": "0"}, args.commit, args.max_rounds)
    if number is None:
        cli.say(f"commit {args.commit} was tuned {record['ROUNDS']} time(s) already "
                f"(CT_MAX_TUNE_ROUNDS={args.max_rounds}): not tuning again")
        print("none")
        return 0
    records.save_record(workspace, ROUNDS_RECORD, {"COMMIT": args.commit, "ROUNDS": str(number)},
                        "ct.process")
    print(number)
    return 0


def cmd_tune_deadline(_workspace: Path, args: Namespace) -> int:
    """job5's watchdog: the seconds after which tuning is stopped (its budget and half again,
    plus five minutes to start and to test the winner), so job5 does no arithmetic."""
    print(args.budget + args.budget // 2 + 300)
    return 0


COMMANDS = {"start": cmd_start, "get": cmd_get, "ended": cmd_ended, "cycle": cmd_cycle,
            "restarted": cmd_restarted, "handed-over": cmd_handed_over,
            "tune-round": cmd_tune_round, "tune-deadline": cmd_tune_deadline}


def build_parser() -> ArgumentParser:
    parser = cli.parser("ct.process", __doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {name: sub.add_parser(name) for name in COMMANDS}
    for name, command in commands.items():
        if not name.startswith("tune-"):
            command.add_argument("--role", required=True, type=_pattern(ROLE, "a role"))
    for name in ("start", "restarted"):
        commands[name].add_argument("--container", required=True)
    commands["start"].add_argument("--runtime", required=True, choices=RUNTIMES)
    commands["start"].add_argument("--image", required=True)
    commands["start"].add_argument("--commit", required=True)
    commands["get"].add_argument("key")
    cycle, ended = commands["cycle"], commands["ended"]
    cycle.add_argument("--runtime", required=True, choices=RUNTIMES)
    cycle.add_argument("--max-restarts", required=True, type=_whole)
    cycle.add_argument("--follow", action="store_true")
    cycle.add_argument("--seen", required=True, choices=("running", "ended", "missing"))
    for command in (cycle, ended):
        command.add_argument("--exit-code", type=int, required=command is ended)
        command.add_argument("--oom", choices=("true", "false", "unknown"), default="")
        command.add_argument("--memory", default=os.environ.get("CT_MEMORY", ""))
    commands["tune-round"].add_argument("--commit", required=True)
    commands["tune-round"].add_argument("--max-rounds", required=True, type=_whole)
    commands["tune-deadline"].add_argument("--budget", required=True, type=_whole)
    return parser


def _whole(text: str) -> int:
    # decimal ASCII digits only: a setting (CT_MAX_RESTARTS, CT_TUNE_BUDGET, ...) is a number
    # here, never something bash would read as octal or an expression
    if not re.fullmatch(r"[0-9]{1,9}", text, re.ASCII):
        raise ArgumentTypeError(f"must be a whole number (at most 9 digits), not {text!r}")
    return int(text)


def _pattern(pattern: str, what: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        if not re.fullmatch(pattern, text):
            raise ArgumentTypeError(f"{text!r} is not {what}")
        return text
    return check


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    workspace = cli.workspace_or_exit(parser, args.workspace)
    return cli.run("ct.process", lambda: COMMANDS[args.command](workspace, args))


if __name__ == "__main__":
    raise SystemExit(main())
