"""The pipeline's records: the one reader and writer of its properties and JSON files.

Everything the host side reads from the workspace goes through here: Java-style .properties files
(the job scripts' status records, and what Jenkins reads: gate.properties, promotion.properties,
handover.properties), JSON objects (metrics.json, best.json) and small text files. A record is
checked against its schema when read; a file that fails the check is a PipelineError naming the
file, what is wrong and what to do, and the caller acts on nothing. Writes are atomic.

    python3 -m ct.pipeline.records get RECORD KEY [--workspace W]
    python3 -m ct.pipeline.records set RECORD KEY VALUE [KEY VALUE ...] [--workspace W]

The command line is how the job scripts read and write records (RECORD: one of RECORDS below):
they never parse a record themselves.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from ct import atomic, untrusted
from ct import workspace as names
from ct.pipeline import cli
from ct.pipeline.errors import PipelineError

RERUN_TRAINING = "rerun job3 (training) to rewrite it"


# ---------------------------------------------------------------- small shared helpers


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def fmt_number(value: float) -> str:
    """80.0 -> '80', 81.27 -> '81.27' (no float noise, no trailing zeros)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def is_percentage(value: Any) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and math.isfinite(value) and 0.0 <= value <= 100.0


def os_reason(err: OSError | UnicodeDecodeError) -> str:
    """The cause of an I/O error in a few words ("Permission denied"), for a one-line message."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err).replace("\n", " ")


def fix_workspace(workspace: Path, outcome: str, rerun: str) -> str:
    """The remedy for a file that cannot be written: what happened, what to fix, what to rerun."""
    return (f"{outcome}; make {workspace} and its files writable for this user (or move what is "
            f"in the way), then {rerun}")


def write_files(files: Mapping[Path, str | bytes], remedy: str) -> None:
    """Write the files as one change (each atomic, all or none); a failure is a PipelineError."""
    encoded = {p: d if isinstance(d, bytes) else d.encode("utf-8") for p, d in files.items()}
    try:
        atomic.write_files(encoded)
    except atomic.WriteError as err:
        raise PipelineError(f"cannot write {err.target} ({err.reason}); {remedy}") from None


def csv_row(values: Sequence[str]) -> str:
    csv.writer(buffer := io.StringIO(), lineterminator="\n").writerow(values)
    return buffer.getvalue()


MAX_READ = 4 << 20  # a record, metrics.json, best.json: far larger is no file of ours


def read_text(path: Path, what_to_do: str, if_missing: str | None = None,
              root: Path | None = None) -> str:
    """A UTF-8 file's text, opened as untrusted (ct.untrusted: a regular file, no symbolic link
    followed below `root`, or at the file itself without one, at most MAX_READ bytes); anything
    else is a PipelineError naming the file and the remedy (`if_missing` for a missing one)."""
    try:
        return untrusted.read_text(path, MAX_READ, root=root)
    except untrusted.Missing:
        raise PipelineError(f"{path} is missing; {if_missing or what_to_do}") from None
    except untrusted.UntrustedFile as err:
        raise PipelineError(f"{path} cannot be read ({err.cause}); {what_to_do}") from None


def is_workspace_file(name: Any) -> bool:
    """A relative path that stays inside the workspace (what best.json may name as its model)."""
    if not isinstance(name, str) or not name:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts


def run_folder(workspace: Path, name: str) -> Path:
    """W/<name> for a name (a build parameter, a record, metrics.json) that must be one of the
    workspace's run folders: runs/<id>, reached without a symbolic link (ct.untrusted), since
    anything the container wrote may point outside. Anything else is a PipelineError naming it."""
    problem = "" if name and re.fullmatch(RUN_DIR, name, re.ASCII) else "not runs/<run id>"
    if not problem:
        try:
            return untrusted.real_folder(workspace, name)
        except untrusted.UntrustedFile as err:
            problem = err.cause
    raise PipelineError(f"RUN_DIR {name[:80]!r} is not a run folder of {workspace} ({problem})")


# ---------------------------------------------------------------- JSON


def parse_json_object(text: str) -> tuple[dict[str, Any] | None, str]:
    """(object, "") or (None, what is wrong) for text that should hold a JSON object."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return None, f"is not valid JSON ({err})"
    if not isinstance(obj, dict):
        return None, f"holds a {type(obj).__name__}, not a JSON object"
    return obj, ""


def load_json_object(path: Path, what_to_do: str, root: Path | None = None) -> dict[str, Any]:
    """Read a JSON object (as read_text); anything else is a PipelineError naming the file and
    the remedy."""
    obj, problem = parse_json_object(read_text(path, what_to_do, root=root))
    if obj is None:
        raise PipelineError(f"{path} {problem}; {what_to_do}")
    return obj


def read_json_object(path: Path, root: Path | None = None) -> tuple[dict[str, Any] | None, str]:
    """For display and lookups: (object, "") or (None, why not), never an exception; opened as
    read_text does."""
    try:
        text = untrusted.read_text(path, MAX_READ, root=root)
    except untrusted.Missing:
        return None, f"no {path.name}"
    except untrusted.UntrustedFile as err:
        return None, f"{path.name} cannot be read ({err.cause})"
    obj, problem = parse_json_object(text)
    return obj, f"{path.name} {problem}" if problem else ""


def load_metrics(workspace: Path) -> dict[str, Any]:
    """W/metrics.json (the latest finished run), checked for the fields the gate, promotion and
    notification rely on."""
    path = workspace / names.METRICS_FILE
    metrics = load_json_object(path, RERUN_TRAINING, root=workspace)
    if not is_percentage(metrics.get("accuracy")):
        raise PipelineError(
            f"{path} has accuracy {metrics.get('accuracy')!r}, not a percentage; {RERUN_TRAINING}"
        )
    for key in ("model", "run_dir", "run_id"):
        if not isinstance(metrics.get(key), str) or not metrics[key]:
            raise PipelineError(f"{path} lacks a '{key}' string; {RERUN_TRAINING}")
    if metrics.get("commit") is not None and not isinstance(metrics["commit"], str):
        raise PipelineError(
            f"{path} has commit {metrics['commit']!r}, not a string; {RERUN_TRAINING}")
    return metrics


def is_tuning_run(metrics: Mapping[str, Any]) -> bool:
    return metrics.get("mode") == "tune"


def run_params(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters that made the model: the tuner's best for a tune run, else the config."""
    params = metrics.get("best_params") if is_tuning_run(metrics) else None
    if not isinstance(params, dict):
        params = metrics.get("config")
    return dict(params) if isinstance(params, dict) else {}


# ---------------------------------------------------------------- .properties


# "$" as \u0024: Jenkins' parameterized-trigger expands ${VAR} in the file's text before
# java.util.Properties reads it (FileBuildParameters.extractAllValues, env.expand), so a literal
# "$" would hand the downstream build a variable of this build's environment
_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\f": "\\f", "$": "\\u0024"}
_UNESCAPES = {"n": "\n", "r": "\r", "t": "\t", "f": "\f"}


def escape_property(value: str) -> str:
    """Escape a value for a Java .properties file (ISO 8859-1 with \\uXXXX escapes), as
    java.util.Properties.load, which Jenkins' plugins use, reads it back."""
    out = []
    for char in value:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif char in "=:#!":
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) > 0x7E:
            units = char.encode("utf-16-be")
            out.extend(f"\\u{units[i]:02x}{units[i + 1]:02x}" for i in range(0, len(units), 2))
        else:
            out.append(char)
    text = "".join(out)
    return "\\" + text if text.startswith(" ") else text


def unescape_property(text: str) -> str:
    """The inverse of escape_property for the one-line values this module writes."""
    def one(match: re.Match[str]) -> str:
        code = match.group(1)
        return chr(int(code[1:], 16)) if len(code) == 5 else _UNESCAPES.get(code, code)

    # \uXXXX pairs of a surrogate pair come out as two halves: joined by the round trip
    text = re.sub(r"\\(u[0-9a-fA-F]{4}|.)", one, text, flags=re.S)
    return text.encode("utf-16", "surrogatepass").decode("utf-16")


def format_properties(values: Mapping[str, str], comment: str) -> str:
    """The one writer of the pipeline's .properties files: every value escaped, so that neither
    java.util.Properties nor Jenkins' trigger reads another key or a variable out of it."""
    for key in values:
        if not re.fullmatch(r"[A-Z][A-Z0-9_]{0,63}", key, re.ASCII):
            raise PipelineError(f"refusing to write the properties key {key[:40]!r}: keys are "
                                "A-Z, 0-9 and _")
    lines = [f"# {comment}"] + [f"{key}={escape_property(val)}" for key, val in values.items()]
    return "\n".join(lines) + "\n"


def parse_properties(text: str) -> dict[str, str]:
    """key=value lines (comments and blank lines skipped); a line without '=' is a ValueError."""
    result: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith(("#", "!")):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"line {number} is not KEY=VALUE")
        result[key.strip()] = unescape_property(value.strip())
    return result


def read_properties(path: Path) -> dict[str, str]:
    """A lenient reader for display (the mail, the report): {} when absent or unreadable."""
    try:
        return parse_properties(untrusted.read_text(path, MAX_READ))
    except (untrusted.UntrustedFile, ValueError):
        return {}


# ---------------------------------------------------------------- records with a schema

ANY_TEXT = r"[^\x00]{0,500}"
WHOLE = r"\d{1,6}"
TIME = r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)?"
COMMIT = r"[0-9a-f]{7,64}|unknown"
IMAGE = r"local|[a-z0-9][a-z0-9._/-]*:[A-Za-z0-9_.-]{1,128}"
RUN_ID = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,200}"
RUN_DIR = rf"({names.RUNS_DIR}/{RUN_ID})?"
PERCENT = r"\d{1,3}(\.\d+)?"
BOOL = r"true|false"


@dataclass(frozen=True)
class Record:
    """A properties file of the workspace: where it lives, the keys it must have and the pattern
    each key's value must match (optional keys may be absent), and what to do when it is damaged."""

    path: str
    required: Mapping[str, str]
    remedy: str
    optional: Mapping[str, str] = field(default_factory=dict)

    def file(self, workspace: Path) -> Path:
        return workspace / self.path

    def check(self, values: Mapping[str, str]) -> str | None:
        """What is wrong with these values, or None."""
        for key in self.required:
            if key not in values:
                return f"it lacks {key}"
        for key, value in values.items():
            pattern = self.required.get(key, self.optional.get(key))
            if pattern is None:
                return f"it has an unknown key {key[:40]!r}"
            if not re.fullmatch(pattern, value, re.ASCII):
                return f"{key}={value[:40]!r} is not a valid value"
        return None


DOCKERFILE = r"Dockerfile\.[a-z.]+"
IMAGE_RECORD = Record(
    path=names.IMAGE_STATUS,
    required={"FRAMEWORK": r"pytorch|tensorflow|sklearn"},
    optional={"TRAIN_IMAGE": IMAGE, "TUNE_IMAGE": IMAGE,
              "TRAIN_DOCKERFILE": DOCKERFILE, "TUNE_DOCKERFILE": DOCKERFILE},
    remedy="remove it and run job2 again",
)
VERDICT_FIELDS = {"ACCURACY": PERCENT, "THRESHOLD": PERCENT, "PASSED": BOOL,
                  "COMMIT": r"[^\x00]{0,64}", "RUN_DIR": RUN_DIR, "RUN_ID": rf"({RUN_ID})?"}
GATE_RECORD = Record(names.GATE_PROPERTIES, {**VERDICT_FIELDS, "TUNE": BOOL},
                     "run job4 (the gate) again")
# the last judged run and its verdict (ct.pipeline.after_run writes it)
VERDICT_RECORD = Record(names.VERDICT_STATUS, {**VERDICT_FIELDS, "TUNE": BOOL, "JUDGED_AT": TIME},
                        "remove it to have the latest run judged again")
PROMOTION_RECORD = Record(names.PROMOTION_PROPERTIES, {
    "PROMOTED": BOOL, "ACCURACY": PERCENT, "BEST_ACCURACY": PERCENT}, "run job4 (the gate) again")
# job6 -> job4 (Jenkins' trigger reads it): the restarted run's commit and run folder, which
# job4's RUN_DIR parameter then names
HANDOVER_RECORD = Record(names.HANDOVER_PROPERTIES, {"COMMIT": COMMIT, "RUN_DIR": RUN_DIR},
                         "rerun job6")

# The records the job scripts may name on the command line (`get`/`set`); the process records
# (status/<role>.properties) have their own commands in ct.pipeline.process.
RECORDS: dict[str, Record] = {
    "image": IMAGE_RECORD,
    "gate": GATE_RECORD,
    "promotion": PROMOTION_RECORD,
}


def load_record(workspace: Path, record: Record, missing_ok: bool = False) -> dict[str, str]:
    """The record's values, checked against its schema. A missing file is {} with `missing_ok`;
    anything unreadable or not matching is a PipelineError that names the file and the remedy."""
    path = record.file(workspace)
    damaged = f"; {record.remedy}"
    try:  # status/ is the container's to write too: no link followed on the way, no FIFO
        values = parse_properties(untrusted.read_text(path, 1 << 16, root=workspace))
    except untrusted.Missing:
        if missing_ok:
            return {}
        raise PipelineError(f"{path} is missing{damaged}") from None
    except untrusted.UntrustedFile as err:
        raise PipelineError(f"{path} cannot be read ({err.cause}){damaged}") from None
    except ValueError as err:
        raise PipelineError(f"{path} is damaged ({err}){damaged}") from None
    problem = "it is empty" if not values else record.check(values)
    if problem:
        raise PipelineError(f"{path} is damaged ({problem}){damaged}")
    return values


def save_record(workspace: Path, record: Record, values: Mapping[str, str], writer: str) -> None:
    """Write the whole record atomically after checking it against its own schema."""
    problem = record.check(values)
    if problem:
        raise PipelineError(f"refusing to write {record.file(workspace)}: {problem}")
    try:  # a linked status/ would have this host write where the link points
        with untrusted.folder(workspace, PurePosixPath(record.path).parts[:-1], create=True):
            pass
    except untrusted.UntrustedFile as err:
        raise PipelineError(f"refusing to write {record.file(workspace)}: {err}") from None
    write_files({record.file(workspace): format_properties(values, f"written by {writer}")},
                fix_workspace(workspace, "nothing recorded", "rerun this job"))


def update_record(workspace: Path, record: Record, changes: Mapping[str, str], writer: str
                  ) -> dict[str, str]:
    """Replace or add keys of a record (created when absent); returns the new values."""
    values = {**load_record(workspace, record, missing_ok=True), **changes}
    save_record(workspace, record, values, writer)
    return values


# ---------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.parser("ct.records", __doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    get = commands.add_parser("get", help="print one value of a record (empty when absent)")
    get.add_argument("record", choices=sorted(RECORDS))
    get.add_argument("key")
    put = commands.add_parser("set", help="replace or add values of a record")
    put.add_argument("record", choices=sorted(RECORDS))
    put.add_argument("pairs", nargs="+", metavar="KEY VALUE")
    args = parser.parse_args(argv)
    workspace = cli.workspace_or_exit(parser, args.workspace)
    record = RECORDS[args.record]

    def action() -> int:
        if args.command == "get":
            print(load_record(workspace, record, missing_ok=True).get(args.key, ""))
            return 0
        if len(args.pairs) % 2:
            raise PipelineError("set takes KEY VALUE pairs")
        pairs = dict(zip(args.pairs[::2], args.pairs[1::2], strict=True))
        update_record(workspace, record, pairs, "ct.records set")
        return 0

    return cli.run("ct.records", action)


if __name__ == "__main__":
    raise SystemExit(main())
