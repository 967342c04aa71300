"""The accuracy gate (job4) and model promotion (job4, job5). Standard library only.

    python3 -m ct.gate check   --workspace W --threshold T [--build-id ID]
    python3 -m ct.gate promote --workspace W

`check` validates W/accuracy.txt, writes W/gate.properties (for Jenkins' parameterized trigger),
appends W/accuracy-history.csv and rewrites W/plot/accuracy.csv (Jenkins Plot plugin).
`promote` copies the run's model to W/best-model.pt and records it in W/best.json, only when it
beats the current best. Errors are one line on stderr and exit 2, with nothing written.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ct import atomic

ACCURACY_FILE = "accuracy.txt"
METRICS_FILE = "metrics.json"
COMMIT_FILE = "commit.txt"
BEST_FILE = "best.json"
BEST_MODEL = "best-model.pt"
GATE_PROPERTIES = "gate.properties"
PROMOTION_PROPERTIES = "promotion.properties"
HISTORY_FILE = "accuracy-history.csv"
PLOT_FILE = "plot/accuracy.csv"
HISTORY_HEADER = ("time", "build", "commit", "accuracy", "threshold", "passed")
AGREEMENT = 0.01  # largest allowed gap between accuracy.txt and metrics.json, in points

_DECIMAL = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
RERUN_TRAINING = "rerun job3 (training) to rewrite it"


class GateError(Exception):
    """A problem the operator must fix; its text is the one line printed on stderr."""


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


def load_json_object(path: Path, what_to_do: str) -> dict[str, Any]:
    """Read a JSON object; anything else is a GateError naming the file and the remedy."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GateError(f"{path} is missing; {what_to_do}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise GateError(f"{path} cannot be read ({err}); {what_to_do}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise GateError(f"{path} is not valid JSON ({err}); {what_to_do}") from None
    if not isinstance(obj, dict):
        raise GateError(f"{path} holds a {type(obj).__name__}, not a JSON object; {what_to_do}")
    return obj


def load_metrics(workspace: Path) -> dict[str, Any]:
    """W/metrics.json, checked for the fields the gate, promotion and notification rely on."""
    path = workspace / METRICS_FILE
    metrics = load_json_object(path, RERUN_TRAINING)
    if not is_percentage(metrics.get("accuracy")):
        raise GateError(
            f"{path} has accuracy {metrics.get('accuracy')!r}, not a percentage; {RERUN_TRAINING}"
        )
    for key in ("model", "run_dir", "run_id"):
        if not isinstance(metrics.get(key), str) or not metrics[key]:
            raise GateError(f"{path} lacks a '{key}' string; {RERUN_TRAINING}")
    if metrics.get("commit") is not None and not isinstance(metrics["commit"], str):
        raise GateError(f"{path} has commit {metrics['commit']!r}, not a string; {RERUN_TRAINING}")
    return metrics


def run_params(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters that made the model: the tuner's best for a tune run, else the config."""
    params = metrics.get("best_params") if metrics.get("mode") == "tune" else None
    if not isinstance(params, dict):
        params = metrics.get("config")
    return dict(params) if isinstance(params, dict) else {}


def read_commit(workspace: Path, metrics: Mapping[str, Any] | None) -> str:
    """The commit that produced the run: metrics.json's, else job1's W/commit.txt, else ''."""
    if metrics and isinstance(metrics.get("commit"), str) and metrics["commit"].strip():
        return metrics["commit"].strip()
    try:
        lines = (workspace / COMMIT_FILE).read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError):
        return ""
    return lines[0] if lines else ""


def escape_property(value: str) -> str:
    """Escape a value for a Java .properties file (ISO 8859-1 with \\uXXXX escapes)."""
    specials = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\f": "\\f"}
    out = []
    for char in value:
        if char in specials:
            out.append(specials[char])
        elif char in "=:#!":
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) > 0x7E:
            units = char.encode("utf-16-be")
            out.extend(f"\\u{units[i]:02x}{units[i + 1]:02x}" for i in range(0, len(units), 2))
        else:
            out.append(char)
    text = "".join(out)
    return "\\" + text if text.startswith(" ") else text


def format_properties(values: Mapping[str, str], comment: str) -> str:
    lines = [f"# {comment}"] + [f"{key}={escape_property(val)}" for key, val in values.items()]
    return "\n".join(lines) + "\n"


def read_properties(path: Path) -> dict[str, str]:
    """A lenient reader for the simple key=value files this module writes; {} when absent."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    result = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith(("#", "!")) and "=" in line:
            key, _, value = line.partition("=")
            result[key.strip()] = re.sub(r"\\(.)", r"\1", value.strip())
    return result


def csv_row(values: Sequence[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


# ---------------------------------------------------------------- check


@dataclass(frozen=True)
class GateResult:
    accuracy: float
    threshold: float
    commit: str
    run_dir: str
    run_id: str

    @property
    def passed(self) -> bool:
        return self.accuracy >= self.threshold


def parse_threshold(text: str | None) -> float:
    if text is None:
        raise GateError("no threshold given; pass --threshold T or set CT_THRESHOLD (e.g. 80)")
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0.0 < value <= 100.0:
        raise GateError(
            f"threshold {text!r} is not a number in (0, 100]; pass --threshold or set "
            "CT_THRESHOLD to a percentage such as 80"
        )
    return value


def parse_accuracy_text(text: str, path: Path) -> float:
    """One decimal number in [0, 100], optionally surrounded by whitespace; else GateError."""
    tokens = text.split()
    if not tokens:
        raise GateError(f"{path} is empty; {RERUN_TRAINING}")
    if len(tokens) > 1:
        shown = text.strip()[:40]
        raise GateError(f"{path} holds {len(tokens)} values ({shown!r}), not one; {RERUN_TRAINING}")
    token = tokens[0]
    if not _DECIMAL.fullmatch(token):
        try:
            special = not math.isfinite(float(token))
        except ValueError:
            special = False
        kind = "not a finite number" if special else "not a percentage"
        raise GateError(f"{path} holds {token[:40]!r}, {kind}; {RERUN_TRAINING}")
    value = float(token)
    if not 0.0 <= value <= 100.0:
        raise GateError(f"{path} holds {token}, outside [0, 100]; {RERUN_TRAINING}")
    return value


def read_accuracy(workspace: Path) -> float:
    path = workspace / ACCURACY_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GateError(f"{path} is missing; run job3 (training) to write it") from None
    except (OSError, UnicodeDecodeError) as err:
        raise GateError(f"{path} cannot be read ({err}); {RERUN_TRAINING}") from None
    return parse_accuracy_text(text, path)


def evaluate(workspace: Path, threshold: float) -> GateResult:
    """Validate everything the gate reads; writes nothing."""
    accuracy = read_accuracy(workspace)
    metrics = load_metrics(workspace) if (workspace / METRICS_FILE).exists() else None
    if metrics is not None and abs(metrics["accuracy"] - accuracy) > AGREEMENT:
        raise GateError(
            f"{workspace / ACCURACY_FILE} says {fmt_number(accuracy)} but "
            f"{workspace / METRICS_FILE} says {fmt_number(metrics['accuracy'])}; they come from "
            f"different runs: {RERUN_TRAINING}"
        )
    return GateResult(
        accuracy=accuracy,
        threshold=threshold,
        commit=read_commit(workspace, metrics),
        run_dir=metrics["run_dir"] if metrics else "",
        run_id=metrics["run_id"] if metrics else "",
    )


def record(workspace: Path, result: GateResult, build_id: str) -> None:
    """Write gate.properties, append the history row, rewrite the plot CSV."""
    passed = "true" if result.passed else "false"
    accuracy, threshold = fmt_number(result.accuracy), fmt_number(result.threshold)
    properties = {
        "ACCURACY": accuracy,
        "THRESHOLD": threshold,
        "PASSED": passed,
        "COMMIT": result.commit,
        "RUN_DIR": result.run_dir,
        "RUN_ID": result.run_id,
    }
    atomic.write_text(
        workspace / GATE_PROPERTIES, format_properties(properties, "written by ct.gate check")
    )
    history = workspace / HISTORY_FILE
    if not history.exists() or history.stat().st_size == 0:
        atomic.append_line(history, csv_row(HISTORY_HEADER))
    row = (utc_now(), build_id, result.commit, accuracy, threshold, passed)
    atomic.append_line(history, csv_row(row))
    atomic.write_text(
        workspace / PLOT_FILE, "accuracy,threshold\n" + csv_row((accuracy, threshold))
    )


def check(workspace: Path, threshold_text: str | None, build_id: str) -> str:
    threshold = parse_threshold(threshold_text)
    result = evaluate(workspace, threshold)
    record(workspace, result, build_id)
    accuracy, threshold_shown = fmt_number(result.accuracy), fmt_number(threshold)
    if result.passed:
        return f"accuracy {accuracy}% >= threshold {threshold_shown}: passed"
    return f"accuracy {accuracy}% below threshold {threshold_shown}: tuning needed"


# ---------------------------------------------------------------- promote


def model_path(workspace: Path, metrics: Mapping[str, Any]) -> Path:
    """The model metrics.json names (relative to W), checked to be a non-empty file."""
    path = workspace / metrics["model"]
    if not path.is_file():
        raise GateError(
            f"{path} (named by {workspace / METRICS_FILE}) is missing; nothing promoted; "
            f"{RERUN_TRAINING}"
        )
    if path.stat().st_size == 0:
        raise GateError(f"{path} is empty; nothing promoted; {RERUN_TRAINING}")
    return path


def load_best(workspace: Path) -> dict[str, Any] | None:
    """The current best record, None when there is none; a damaged one is a GateError."""
    path = workspace / BEST_FILE
    if not path.exists():
        return None
    remedy = f"nothing changed; inspect it (and {workspace / BEST_MODEL}), then repair or remove it"
    best = load_json_object(path, remedy)
    if not is_percentage(best.get("accuracy")):
        raise GateError(f"{path} has accuracy {best.get('accuracy')!r}, not a percentage; {remedy}")
    return best


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def best_record(workspace: Path, metrics: Mapping[str, Any], source: Path) -> dict[str, Any]:
    record_ = {
        "accuracy": metrics["accuracy"],
        "params": run_params(metrics),
        "commit": read_commit(workspace, metrics) or None,
        "run_id": metrics["run_id"],
        "run_dir": metrics["run_dir"],
        "mode": metrics.get("mode"),
        "source_model": metrics["model"],
        "model": BEST_MODEL,
        "model_sha256": sha256_of(source),
        "promoted_at": utc_now(),
    }
    if metrics.get("val_accuracy") is not None:
        record_["val_accuracy"] = metrics["val_accuracy"]
    return record_


def promote(workspace: Path) -> str:
    metrics = load_metrics(workspace)
    source = model_path(workspace, metrics)
    best = load_best(workspace)
    accuracy = fmt_number(metrics["accuracy"])
    model_missing = best is not None and not (workspace / BEST_MODEL).is_file()
    if best is not None and not model_missing and metrics["accuracy"] <= best["accuracy"]:
        best_accuracy = fmt_number(best["accuracy"])
        write_promotion(workspace, False, accuracy, best_accuracy)
        return (
            f"kept the current best {best_accuracy}% (run {best.get('run_id')}); "
            f"this run's {accuracy}% is not better"
        )
    atomic.copy_file(source, workspace / BEST_MODEL)
    atomic.write_json(workspace / BEST_FILE, best_record(workspace, metrics, source))
    write_promotion(workspace, True, accuracy, accuracy)
    before = "no previous best" if best is None else f"previous {fmt_number(best['accuracy'])}%"
    if model_missing:
        before += f", whose {BEST_MODEL} was missing"
    return f"promoted {metrics['model']} ({accuracy}%, {before}) to {workspace / BEST_MODEL}"


def write_promotion(workspace: Path, promoted: bool, accuracy: str, best_accuracy: str) -> None:
    properties = {
        "PROMOTED": "true" if promoted else "false",
        "ACCURACY": accuracy,
        "BEST_ACCURACY": best_accuracy,
    }
    atomic.write_text(
        workspace / PROMOTION_PROPERTIES,
        format_properties(properties, "written by ct.gate promote"),
    )


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ct.gate", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    workspace_help = "the pipeline workspace (default: $CT_WORKSPACE)"
    check_cmd = commands.add_parser("check", help="validate accuracy.txt against the threshold")
    check_cmd.add_argument(
        "--workspace", type=Path, default=os.environ.get("CT_WORKSPACE"), help=workspace_help
    )
    check_cmd.add_argument(
        "--threshold",
        default=os.environ.get("CT_THRESHOLD"),
        help="percentage in (0, 100] (default: $CT_THRESHOLD)",
    )
    check_cmd.add_argument(
        "--build-id",
        default=os.environ.get("BUILD_NUMBER", ""),
        help="build id for the history (default: $BUILD_NUMBER)",
    )
    promote_cmd = commands.add_parser("promote", help="keep the run's model if it beats the best")
    promote_cmd.add_argument(
        "--workspace", type=Path, default=os.environ.get("CT_WORKSPACE"), help=workspace_help
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workspace is None:
        parser.error("--workspace is required (or set CT_WORKSPACE)")
    workspace = Path(args.workspace)
    try:
        if not workspace.is_dir():
            raise GateError(f"workspace {workspace} is not a directory; check --workspace")
        if args.command == "check":
            print(check(workspace, args.threshold, args.build_id))
        else:
            print(f"ct.gate: {promote(workspace)}")
    except GateError as err:
        print(f"ct.gate: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
