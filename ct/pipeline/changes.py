"""Has anything changed since a judged run? What decides that a retrain trains nothing.

    python3 -m ct.pipeline.changes check [--commit C] [--increments DIR] [--force]
                                         [--workspace W]

A training request is three things: the code (a commit), the data (its version: the CIFAR-10 base
plus the increments, ct.data_version) and the training flags (CT_TRAIN_ARGS). A judged run whose
lineage records the same three, the champion's or any in accuracy-history.csv, means nothing has
changed since that run: training again would give the same model (runs are reproducible). `check`
prints one line on stdout, `unchanged DATA_VERSION` or `changed DATA_VERSION`, and says why on
stderr: "nothing changed since run X", or what differs from the champion. --force (Jenkins'
FORCE parameter) prints `changed` whatever the record says.

job3 asks before it trains a push it took; job6's `check` and `weekly` ask before they start a
retrain. The commit is --commit, else the latest push (commit.txt). Standard library only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ct import data_version
from ct import workspace as names
from ct.pipeline import cli, records, report_inputs
from ct.pipeline.errors import PipelineError


@dataclass(frozen=True)
class Request:
    commit: str
    data_version: str
    train_args: str

    def differences(self, lineage: Mapping[str, Any]) -> list[str]:
        """What differs between this request and a run's lineage, in words ([] for nothing)."""
        said = []
        for key, now in (("commit", self.commit), ("data_version", self.data_version),
                         ("train_args", self.train_args)):
            then = lineage.get(key)
            if then != now:
                shown = "not recorded" if then is None else repr(then)
                said.append(f"{key.replace('_', ' ')} {now!r} (was {shown})")
        return said


def normal_args(text: str) -> str:
    """CT_TRAIN_ARGS as the trainer records it (ct.workspace.canonical_flags)."""
    try:
        return names.canonical_flags(text)
    except ValueError as err:
        raise PipelineError(f"CT_TRAIN_ARGS cannot be read as flags ({err}): {text!r}") from None


def judged_runs(workspace: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(run id, lineage) of the champion, then of every judged run, newest first."""
    best, _ = records.read_json_object(workspace / names.BEST_FILE)
    if best and isinstance(best.get(names.LINEAGE), dict):
        yield str(best.get("run_id", "the champion")), best[names.LINEAGE]
    rows, _ = report_inputs.read_history(workspace / names.HISTORY_FILE)
    for run_id in reversed([row.get("run", "") for row in rows]):
        if not records.is_workspace_file(run_id) or "/" in run_id:
            continue
        metrics, _ = records.read_json_object(
            workspace / names.RUNS_DIR / run_id / names.RUN_METRICS)
        if metrics and isinstance(metrics.get(names.LINEAGE), dict):
            yield run_id, metrics[names.LINEAGE]


def decide(request: Request, runs: Iterator[tuple[str, dict[str, Any]]], force: bool
           ) -> tuple[bool, str]:
    """(changed, why). Pure, but for the runs it is given."""
    first: tuple[str, list[str]] | None = None
    for run_id, lineage in runs:
        differences = request.differences(lineage)
        if not differences:
            if force:
                return True, f"nothing changed since run {run_id}, but FORCE is set: retraining"
            return False, f"nothing changed since run {run_id}: not training"
        first = first or (run_id, differences)
    if first is None:
        return True, "no judged run records what it trained: training"
    run_id, differences = first
    return True, f"changed since run {run_id}: {'; '.join(differences)}"


def current(workspace: Path, commit: str, increments: Path | None, train_args: str) -> Request:
    commit = commit or names.recorded_commit(workspace)
    if not commit:
        raise PipelineError(f"no commit: {workspace / names.COMMIT_FILE} names none; run job1")
    data = workspace / names.DATA_DIR
    if names.dataset_source(data) is None:
        version = ""  # no dataset yet (the run downloads it): nothing to compare, so changed
    else:
        try:
            version = data_version.compute(data, increments, cache_dir=data).version
        except data_version.DataVersionError as err:
            raise PipelineError(f"{err}; nothing trained") from None
    return Request(commit, version, normal_args(train_args))


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.parser("ct.changes", __doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="has the code, the data or the flags changed?")
    check.add_argument("--commit", default="")
    check.add_argument("--increments", type=Path,
                       default=os.environ.get("CT_INCREMENTS_DIR") or None)
    check.add_argument("--train-args", default=os.environ.get("CT_TRAIN_ARGS", ""))
    check.add_argument("--force", action="store_true",
                       default=os.environ.get("FORCE", "") == "true")
    args = parser.parse_args(argv)
    workspace = cli.workspace_or_exit(parser, args.workspace)

    def action() -> int:
        request = current(workspace, args.commit, args.increments, args.train_args)
        changed, why = decide(request, judged_runs(workspace), args.force)
        cli.say(why)
        print(f"{'changed' if changed else 'unchanged'} {request.data_version}")
        return 0

    return cli.run("ct.changes", action)


if __name__ == "__main__":
    raise SystemExit(main())
