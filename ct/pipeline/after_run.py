"""What follows every finished training or tuning run, whoever started it. Standard library only.

    python3 -m ct.pipeline.after_run judge --threshold T [--run-dir RUN_DIR] [--outbox-only]
                                           [--measured] [--rescored] [--artifacts DIR]
                                           [--workspace W]
    python3 -m ct.pipeline.after_run handed-to-tuning [--artifacts DIR] [--workspace W]
    python3 -m ct.pipeline.after_run tuning-commit [--workspace W]
    python3 -m ct.pipeline.after_run tuning-skipped [--workspace W]

`judge` (job4 after job3 or after job6 restarted the run; job5 after tuning; job6 --follow) runs
the gate on the workspace's latest run. A tuning run, or a training run at or above the
threshold, is promoted when it beats the best model and mailed (ct.pipeline.notify), and the
report is rewritten: it prints `done`. A training run below the threshold prints `tune`: the job
script gets the tuning image ready, then calls `handed-to-tuning`, which sets TUNE=true in
gate.properties, the one key job4's conditional step reads to start job5. When the best model has
no score on the run's test set (an increment added test images since it was measured), nothing
is decided yet: `judge` prints `rescore COMMIT MODEL`, the job script evaluates MODEL (a
workspace path) with COMMIT's code on the test set now (python -m ct.trainer.evaluate), then
calls `judge --rescored`, which compares on the re-scored number, and once only: still no score
is one line and exit 2, nothing promoted (ct.pipeline.rescore).

Before a run can be promoted (at or above the threshold, or a tuning run), the pipeline measures
its model itself (ct.pipeline.measured): without a measurement, `judge` prints `measure COMMIT
MODEL`; the job script exports MODEL with COMMIT's code and scores the export with the
pipeline's evaluator, then calls `judge --measured`. The measured accuracy is then the run's,
in the verdict and in promotion; a claim further from it than CT_MEASURE_TOLERANCE is refused:
recorded as a verdict that did not pass, one line naming both figures, exit 2, nothing
promoted, the run's chain ended.

`tuning-commit` prints the commit whose run was judged last (job5 tunes that commit's code);
`tuning-skipped` records that job5 will not tune the run handed to it (its commit had its tuning
rounds), which ends that commit's chain: the next queued push may train (ct.pipeline.pushes).

Each run is judged once: status/after-run.properties keeps the last judged run's verdict. Asked
again for that run (job4 rebuilt by hand or from the view), `judge` writes that verdict into this
build's gate.properties with TUNE=false and does nothing else, so the job4 -> job5 condition can
never act on a stale file nor start a second tuning round. --artifacts DIR (Jenkins' per-build
CT_ARTIFACTS_DIR) receives the files this build keeps: gate.properties, the plot point of a run
judged for the first time, and the run's curves.png for the mail.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from contextlib import redirect_stdout
from dataclasses import replace
from pathlib import Path
from typing import Any

from ct import atomic
from ct import workspace as names
from ct.pipeline import cli, gate, measured, notify, promote, records, report
from ct.pipeline.errors import PipelineError
from ct.pipeline.records import GATE_RECORD, VERDICT_FIELDS, VERDICT_RECORD
from ct.pipeline.rescore import NeedsRescore


def latest_run(workspace: Path) -> dict[str, Any]:
    """The workspace's latest finished run (its metrics.json); {} when that cannot be read (the
    gate then says what is wrong with it)."""
    try:
        return records.load_metrics(workspace)
    except PipelineError:
        return {}


def require_run(workspace: Path, wanted: str, latest: dict[str, Any]) -> None:
    """job4 asked (by job6's hand-over: its RUN_DIR build parameter) to judge one run judges
    nothing else, and only a run folder of the workspace (runs/<id>, no link on the way)."""
    if not wanted:
        return
    if latest.get("run_dir") != wanted and re.fullmatch(records.RUN_DIR, wanted, re.ASCII):
        shown = latest.get("run_dir") or f"unreadable (see {workspace / names.METRICS_FILE})"
        shown = shown[:200].encode("unicode_escape").decode()  # the container wrote it: one line
        raise PipelineError(f"asked to judge {wanted}, but the workspace's latest run is "
                            f"{shown}: nothing judged")
    try:
        records.run_folder(workspace, wanted)
    except PipelineError as err:
        raise PipelineError(f"{err}: nothing judged") from None


def keep(artifacts: Path | None, *paths: Path) -> None:
    """Copy files into this build's artifacts folder (Jenkins archives and plots from it)."""
    if artifacts is None:
        return
    for path in paths:
        if path.is_file() and not path.is_symlink():
            atomic.copy_file(path, artifacts / path.name)


def emit(workspace: Path, values: dict[str, str], artifacts: Path | None) -> None:
    records.save_record(workspace, GATE_RECORD, values, "ct.after_run")
    keep(artifacts, GATE_RECORD.file(workspace))


def save_verdict(workspace: Path, values: dict[str, str]) -> None:
    verdict = {key: values[key] for key in VERDICT_RECORD.required if key in values}
    records.save_record(workspace, VERDICT_RECORD,
                        {**verdict, "JUDGED_AT": records.utc_now()}, "ct.after_run")


def judged_already(workspace: Path, run_id: str, artifacts: Path | None) -> bool:
    """Re-emit the verdict of a run judged before, with TUNE=false; False for a new run."""
    verdict = records.load_record(workspace, VERDICT_RECORD, missing_ok=True)
    if not run_id or verdict.get("RUN_ID") != run_id:
        return False
    emit(workspace, {key: verdict[key] for key in VERDICT_FIELDS} | {"TUNE": "false"}, artifacts)
    cli.say(f"run {run_id} was judged already (passed={verdict['PASSED']}): nothing to do")
    return True


class MailFailed(PipelineError):
    """The message could not be mailed (it is kept in outbox/): exit 1, not bad input."""


def mail(workspace: Path, event: str, outbox_only: bool) -> None:
    argv = ["--workspace", str(workspace), "--event", event]
    if notify.main([*argv, "--outbox-only"] if outbox_only else argv) != 0:
        raise MailFailed(f"the notification could not be sent (kept in "
                         f"{workspace / names.OUTBOX_DIR}/)")


def write_report(workspace: Path, run_dir: str, artifacts: Path | None) -> None:
    """The report page, and the judged run's curves for this build's mail. A report that cannot
    be written is said, not fatal: the verdict is what the build is for."""
    try:  # metrics.json names it: only a real run folder, never through a link
        keep(artifacts, records.run_folder(workspace, run_dir) / names.RUN_CURVES)
    except PipelineError:
        pass
    try:
        report.write_report(workspace)
    except (report.ReportError, OSError) as err:
        cli.say(f"warning: the report could not be written ({err}); the verdict stands")


class Measure(Exception):
    """The candidate is measured first: `word` is what the job script acts on."""

    def __init__(self, word: str) -> None:
        super().__init__(word)
        self.word = word


def measured_verdict(workspace: Path, verdict: gate.Verdict, asked: bool, build_id: str,
                     artifacts: Path | None) -> tuple[gate.Verdict, measured.Measurement]:
    """The verdict on the pipeline's measured accuracy. Measure (no measurement yet); a
    refused claim is recorded as a verdict that did not pass, then raised (exit 2)."""
    metrics = records.load_metrics(workspace)
    try:
        found = measured.check(workspace, metrics, required=asked)
    except measured.NeedsMeasure as need:
        cli.say(str(need))
        raise Measure(f"measure {need.commit} {need.model}") from None
    except measured.Refused as refused:
        verdict = replace(verdict, accuracy=refused.accuracy, refused=str(refused))
        new = gate.record(workspace, verdict, build_id)
        keep(artifacts, GATE_RECORD.file(workspace),
             *([workspace / names.PLOT_FILE] if new else []))
        save_verdict(workspace, verdict.properties(tune=False))
        raise
    cli.say(found.line())
    return replace(verdict, accuracy=found.accuracy), found


def judge(workspace: Path, threshold: str | None, wanted: str, outbox_only: bool,
          artifacts: Path | None, build_id: str, rescored: bool = False,
          asked_measure: bool = False) -> str:
    # this build's verdict, or none: never an earlier build's for Jenkins to act on
    GATE_RECORD.file(workspace).unlink(missing_ok=True)
    latest = latest_run(workspace)
    require_run(workspace, wanted, latest)
    if judged_already(workspace, latest.get("run_id", ""), artifacts):
        return "done"
    try:
        verdict = gate.judge(workspace, gate.parse_threshold(threshold))
    except PipelineError as err:
        raise PipelineError(f"{err}; nothing promoted") from None
    # the gate judged accuracy.txt; what follows needs the run's metrics.json as well
    tuning_run = records.is_tuning_run(latest or records.load_metrics(workspace))
    found = None
    if (tuning_run or verdict.passed) and measured.enabled(os.environ):
        try:
            verdict, found = measured_verdict(workspace, verdict, asked_measure, build_id,
                                              artifacts)
        except Measure as need:
            return need.word
    new = gate.record(workspace, verdict, build_id)
    print(verdict.line(), flush=True)
    keep(artifacts, GATE_RECORD.file(workspace), *([workspace / names.PLOT_FILE] if new else []))
    if not (tuning_run or verdict.passed):
        cli.say(f"below the threshold of {records.fmt_number(verdict.threshold)}%: preparing the "
                "tuning image for job5")
        return "tune"
    try:
        promotion = promote.promote(workspace, rescore=not rescored,
                                    measured=None if found is None else found.summary())
    except NeedsRescore as need:  # not judged yet: the job script re-scores, then asks again
        cli.say(str(need))
        return f"rescore {need.commit} {need.model}"
    print(f"ct.promote: {promotion.message}", flush=True)
    if tuning_run or promotion.promoted:
        mail(workspace, "tuned" if tuning_run else "best-model", outbox_only)
    else:
        cli.say("the current best model stays (it is at least as good): no mail")
    save_verdict(workspace, verdict.properties(tune=False))
    write_report(workspace, verdict.run_dir, artifacts)
    return "done"


def handed_to_tuning(workspace: Path, artifacts: Path | None) -> str:
    """The tuning image is ready: this build's verdict now hands the run to job5."""
    values = records.load_record(workspace, GATE_RECORD)
    if values["RUN_ID"] != latest_run(workspace).get("run_id") or values["PASSED"] != "false":
        raise PipelineError(f"{GATE_RECORD.file(workspace)} is not this run's verdict below the "
                            "threshold; run job4 (the gate) again")
    values["TUNE"] = "true"
    emit(workspace, values, artifacts)
    save_verdict(workspace, values)
    write_report(workspace, values["RUN_DIR"], artifacts)
    cli.say("handing over to job5 (gate.properties TUNE=true)")
    return "done"


def tuning_commit(workspace: Path) -> str:
    """The commit of the last judged run (the one job4 hands to tuning); else the latest push."""
    verdict = records.load_record(workspace, VERDICT_RECORD, missing_ok=True)
    commit = verdict.get("COMMIT") or names.recorded_commit(workspace)
    if not commit or commit == names.NO_COMMIT:
        raise PipelineError("no judged run names its commit and commit.txt names none: run job1 "
                            "and job3 first")
    return commit


def tuning_skipped(workspace: Path) -> str:
    """job5 will not tune the run handed to it: that run's chain ends here."""
    verdict = records.load_record(workspace, VERDICT_RECORD, missing_ok=True)
    if verdict.get("TUNE") == "true":
        records.save_record(workspace, VERDICT_RECORD, {**verdict, "TUNE": "false"},
                            "ct.after_run")
    return "done"


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.parser("ct.after_run", __doc__)
    parser.add_argument("--artifacts", type=Path,
                        default=os.environ.get("CT_ARTIFACTS_DIR") or None,
                        help="this build's artifacts folder (default: $CT_ARTIFACTS_DIR)")
    commands = parser.add_subparsers(dest="command", required=True)
    judge_cmd = commands.add_parser("judge", help="gate, promote, mail, report; or hand to tuning")
    judge_cmd.add_argument("--threshold", default=os.environ.get("CT_THRESHOLD"))
    judge_cmd.add_argument("--run-dir", default="", help="judge only if this is the latest run")
    judge_cmd.add_argument("--outbox-only", action="store_true",
                           help="keep the mail in outbox/ (Jenkins' email-ext sends job5's)")
    judge_cmd.add_argument("--build-id", default=os.environ.get("BUILD_NUMBER", ""))
    judge_cmd.add_argument("--rescored", action="store_true",
                           help="the best model was re-scored: compare, never ask again")
    judge_cmd.add_argument("--measured", action="store_true",
                           help="the candidate was measured: decide, never ask again")
    commands.add_parser("handed-to-tuning", help="the tuning image is ready: TUNE=true")
    commands.add_parser("tuning-commit", help="the commit of the last judged run")
    commands.add_parser("tuning-skipped", help="job5 does not tune the run handed to it")
    args = parser.parse_args(argv)
    workspace = cli.workspace_or_exit(parser, args.workspace)

    def action() -> int:
        # stdout carries the one action word the job script acts on; every other line (the
        # gate's, promotion's and mail's) goes to the build log on stderr
        with redirect_stdout(sys.stderr):
            try:
                if args.command == "judge":
                    word = judge(workspace, args.threshold, args.run_dir, args.outbox_only,
                                 args.artifacts, args.build_id, args.rescored, args.measured)
                elif args.command == "handed-to-tuning":
                    word = handed_to_tuning(workspace, args.artifacts)
                elif args.command == "tuning-commit":
                    word = tuning_commit(workspace)
                else:
                    word = tuning_skipped(workspace)
            except MailFailed as err:
                print(f"ct.after_run: {err}", flush=True)
                return 1
        print(word, flush=True)
        return 0

    return cli.run("ct.after_run", action)


if __name__ == "__main__":
    raise SystemExit(main())

