"""The accuracy gate: judge the workspace's latest run against the threshold. Standard library.

    python3 -m ct.pipeline.gate --workspace W --threshold T [--build-id ID]

Validates W/accuracy.txt (and that it agrees with W/metrics.json), then records the verdict as
one change: W/gate.properties (what Jenkins reads), and, the first time this run is judged, a
row of W/accuracy-history.csv and W/plot/accuracy.csv (this build's point for the Plot plugin).
A run judged again (a retried job4) keeps its one history row and adds no plot point. A run
whose claim the pipeline's own measurement refused (ct.pipeline.measured, through
ct.pipeline.after_run) is recorded the same way, not passed, at the measured accuracy. What
follows the verdict (promotion, mail, tuning) is ct.pipeline.after_run's. Errors, I/O errors
included, are one line on stderr and exit 2, with nothing written.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ct import untrusted
from ct import workspace as names
from ct.pipeline import cli
from ct.pipeline.errors import PipelineError
from ct.pipeline.records import (
    GATE_RECORD,
    RERUN_TRAINING,
    csv_row,
    fix_workspace,
    fmt_number,
    format_properties,
    load_metrics,
    utc_now,
    write_files,
)

HISTORY_HEADER = ("time", "build", "commit", "accuracy", "threshold", "passed", "run")
MAX_ACCURACY_BYTES = 4096  # one number and a newline; more is not an accuracy file
MAX_HISTORY_BYTES = 64 << 20  # about a million judged runs
AGREEMENT = 0.01  # largest allowed gap between accuracy.txt and metrics.json, in points

_DECIMAL = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


@dataclass(frozen=True)
class Verdict:
    accuracy: float
    threshold: float
    commit: str
    run_dir: str
    run_id: str
    refused: str = ""  # why the pipeline's own measurement refused the run's claim

    @property
    def passed(self) -> bool:
        return not self.refused and self.accuracy >= self.threshold

    def properties(self, tune: bool) -> dict[str, str]:
        """gate.properties: the verdict, and TUNE, whether this build hands the run to job5."""
        return {
            "ACCURACY": fmt_number(self.accuracy),
            "THRESHOLD": fmt_number(self.threshold),
            "PASSED": "true" if self.passed else "false",
            "COMMIT": self.commit,
            "RUN_DIR": self.run_dir,
            "RUN_ID": self.run_id,
            "TUNE": "true" if tune else "false",
        }

    def line(self) -> str:
        accuracy, threshold = fmt_number(self.accuracy), fmt_number(self.threshold)
        if self.refused:
            return f"refused: {self.refused}"
        if self.passed:
            return f"accuracy {accuracy}% >= threshold {threshold}: passed"
        return f"accuracy {accuracy}% below threshold {threshold}: tuning needed"


def parse_threshold(text: str | None) -> float:
    if text is None:
        raise PipelineError("no threshold given; pass --threshold T or set CT_THRESHOLD (e.g. 80)")
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0.0 < value <= 100.0:
        raise PipelineError(
            f"threshold {text!r} is not a number in (0, 100]; pass --threshold or set "
            "CT_THRESHOLD to a percentage such as 80"
        )
    return value


def parse_accuracy_text(text: str, path: Path) -> float:
    """One decimal number in [0, 100], optionally surrounded by whitespace; else PipelineError."""
    tokens = text.split()
    if not tokens:
        raise PipelineError(f"{path} is empty; {RERUN_TRAINING}")
    if len(tokens) > 1:
        shown = text.strip()[:40]
        raise PipelineError(
            f"{path} holds {len(tokens)} values ({shown!r}), not one; {RERUN_TRAINING}")
    token = tokens[0]
    if not _DECIMAL.fullmatch(token):
        try:
            special = not math.isfinite(float(token))
        except ValueError:
            special = False
        kind = "not a finite number" if special else "not a percentage"
        raise PipelineError(f"{path} holds {token[:40]!r}, {kind}; {RERUN_TRAINING}")
    value = float(token)
    if not 0.0 <= value <= 100.0:
        raise PipelineError(f"{path} holds {token}, outside [0, 100]; {RERUN_TRAINING}")
    return value


def read_accuracy(workspace: Path) -> float:
    """W/accuracy.txt: a regular file of the workspace, never a link (whose target's first
    characters an error would show), at most MAX_ACCURACY_BYTES."""
    path = workspace / names.ACCURACY_FILE
    try:
        text = untrusted.read_text(path, MAX_ACCURACY_BYTES, root=workspace)
    except untrusted.Missing:
        raise PipelineError(f"{path} is missing; run job3 (training) to write it") from None
    except untrusted.UntrustedFile as err:
        raise PipelineError(f"{err}; {RERUN_TRAINING}") from None
    return parse_accuracy_text(text, path)


def judge(workspace: Path, threshold: float) -> Verdict:
    """Read and validate the run's result, compare it with the threshold; writes nothing."""
    accuracy = read_accuracy(workspace)
    metrics = load_metrics(workspace) if (workspace / names.METRICS_FILE).exists() else None
    if metrics is not None and abs(metrics["accuracy"] - accuracy) > AGREEMENT:
        raise PipelineError(
            f"{workspace / names.ACCURACY_FILE} says {fmt_number(accuracy)} but "
            f"{workspace / names.METRICS_FILE} says {fmt_number(metrics['accuracy'])}; they come "
            f"from different runs: {RERUN_TRAINING}"
        )
    return Verdict(
        accuracy=accuracy,
        threshold=threshold,
        commit=names.commit_of_run(workspace, metrics),
        run_dir=metrics["run_dir"] if metrics else "",
        run_id=metrics["run_id"] if metrics else "",
    )


def read_history(path: Path, remedy: str) -> bytes:
    """The history so far under today's header (b"" when there is none), ending in a newline
    for the next row. A history without the `run` column gets it in its header; its rows name
    no run."""
    try:  # rewritten with a row added: a link to a host file would copy it into the workspace
        data = untrusted.read_bytes(path, MAX_HISTORY_BYTES, root=path.parent)
    except untrusted.Missing:
        return b""
    except untrusted.UntrustedFile as err:
        raise PipelineError(f"cannot read {err}; {remedy}") from None
    if not data:
        return b""
    header, _, rows = data.partition(b"\n")
    if header.decode("utf-8", "replace").strip().split(",") == list(HISTORY_HEADER[:-1]):
        data = csv_row(HISTORY_HEADER).encode("utf-8") + rows
    return data if data.endswith(b"\n") else data + b"\n"


def in_history(rows: bytes, run_id: str) -> bool:
    """Whether the history has a row for this run (its `run` column; rows without one never
    match, so a run judged before the column existed may get a second row once)."""
    if not run_id or not rows:
        return False
    reader = csv.DictReader(io.StringIO(rows.decode("utf-8", "replace")))
    return any(row.get("run") == run_id for row in reader)


def record(workspace: Path, verdict: Verdict, build_id: str, tune: bool = False) -> bool:
    """Write gate.properties and, for a run not in the history yet, its history row and the plot
    CSV, as one change: a file that cannot be written leaves them all as they were. Returns
    whether the run was new to the history."""
    properties = verdict.properties(tune)
    remedy = fix_workspace(workspace, "nothing recorded", "rerun job4 (the gate)")
    files: dict[Path, str | bytes] = {
        workspace / names.GATE_PROPERTIES: format_properties(properties, "written by ct.gate"),
    }
    history = workspace / names.HISTORY_FILE
    rows = read_history(history, remedy)
    new = not in_history(rows, verdict.run_id)
    if new:
        values = (properties["ACCURACY"], properties["THRESHOLD"])
        row = (utc_now(), build_id, verdict.commit, *values, properties["PASSED"],
               verdict.run_id)
        files[workspace / names.PLOT_FILE] = "accuracy,threshold\n" + csv_row(values)
        files[history] = (rows or csv_row(HISTORY_HEADER).encode("utf-8")) + csv_row(row).encode()
    problem = GATE_RECORD.check(properties)
    if problem:  # e.g. a commit in metrics.json that is no commit id
        raise PipelineError(f"the run's verdict cannot be recorded ({problem}); {RERUN_TRAINING}")
    write_files(files, remedy)
    return new


def check(workspace: Path, threshold_text: str | None, build_id: str) -> tuple[Verdict, bool]:
    """Judge and record; (the verdict, whether the run was new to the history)."""
    verdict = judge(workspace, parse_threshold(threshold_text))
    return verdict, record(workspace, verdict, build_id)


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.parser("ct.gate", __doc__)
    parser.add_argument("--threshold", default=os.environ.get("CT_THRESHOLD"),
                        help="percentage in (0, 100] (default: $CT_THRESHOLD)")
    parser.add_argument("--build-id", default=os.environ.get("BUILD_NUMBER", ""),
                        help="build id for the history (default: $BUILD_NUMBER)")
    args = parser.parse_args(argv)
    workspace = cli.workspace_or_exit(parser, args.workspace)

    def action() -> int:
        print(check(workspace, args.threshold, args.build_id)[0].line())
        return 0

    return cli.run("ct.gate", action)


if __name__ == "__main__":
    raise SystemExit(main())
