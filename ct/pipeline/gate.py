"""The accuracy gate (job4) and model promotion (job4, job5). Standard library only.

    python3 -m ct.pipeline.gate check   --workspace W --threshold T [--build-id ID]
    python3 -m ct.pipeline.gate promote --workspace W

`check` validates W/accuracy.txt, writes W/gate.properties (for Jenkins' parameterized trigger),
appends W/accuracy-history.csv and rewrites W/plot/accuracy.csv (Jenkins Plot plugin), as one
change. `promote`, only when the run beats the current best: stores the run's model as
W/models/best-<sha256[:16]>.pt, renames a new W/best.json over the old one (the record, which
names that file and its sha256 and carries the run's `lineage`: the commit point), then points
the symlink W/best-model.pt at it and deletes the stored models no record names. A reader of
best.json and of the model it names sees the old pair or the new pair. Errors, I/O errors
included, are one line on stderr and exit 2, with nothing written (or, past the commit point, a
line saying what to repair). Its messages and its files' comments call it `ct.gate`, the name
the job logs have always shown.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import io
import json
import math
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from ct import atomic
from ct.workspace import (
    ACCURACY_FILE,
    BEST_FILE,
    BEST_MODEL,
    GATE_PROPERTIES,
    HISTORY_FILE,
    LINEAGE,
    METRICS_FILE,
    MODELS_DIR,
    PLOT_FILE,
    PROMOTION_PROPERTIES,
    add_workspace_argument,
    commit_of_run,
    workspace_of,
)

STORED_NAME = ("best-", ".pt")  # models/best-<sha256[:16]>.pt
_STORED_MODEL = re.compile(r"best-[0-9a-f]{16}\.pt")
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


def read_text(path: Path, what_to_do: str, if_missing: str | None = None) -> str:
    """A UTF-8 file's text; a missing or unreadable one is a GateError naming the file and the
    remedy (`if_missing` for a missing one, when that remedy differs)."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GateError(f"{path} is missing; {if_missing or what_to_do}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise GateError(f"{path} cannot be read ({err}); {what_to_do}") from None


def load_json_object(path: Path, what_to_do: str) -> dict[str, Any]:
    """Read a JSON object; anything else is a GateError naming the file and the remedy."""
    text = read_text(path, what_to_do)
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


def os_reason(err: OSError | UnicodeDecodeError) -> str:
    """The cause of an I/O error in a few words ("Permission denied"), for a one-line message."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err).replace("\n", " ")


def fix_workspace(workspace: Path, outcome: str, rerun: str) -> str:
    """The remedy for a file that cannot be written: what happened, what to fix, what to rerun."""
    return (
        f"{outcome}; make {workspace} and its files writable for this user (or move what is "
        f"in the way), then {rerun}"
    )


def write_files(files: Mapping[Path, str | bytes], remedy: str) -> None:
    """Write the files as one change (each atomic, all or none); a failure is a GateError."""
    encoded = {p: d if isinstance(d, bytes) else d.encode("utf-8") for p, d in files.items()}
    try:
        atomic.write_files(encoded)
    except atomic.WriteError as err:
        raise GateError(f"cannot write {err.target} ({err.reason}); {remedy}") from None


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
    text = read_text(path, RERUN_TRAINING, if_missing="run job3 (training) to write it")
    return parse_accuracy_text(text, path)


def judge(workspace: Path, threshold: float) -> GateResult:
    """Read and validate the run's result, compare it with the threshold; writes nothing."""
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
        commit=commit_of_run(workspace, metrics),
        run_dir=metrics["run_dir"] if metrics else "",
        run_id=metrics["run_id"] if metrics else "",
    )


def read_history(path: Path, remedy: str) -> bytes:
    """The history so far (b"" when there is none), ending in a newline for the next row."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return b""
    except OSError as err:
        raise GateError(f"cannot read {path} ({os_reason(err)}); {remedy}") from None
    return data if not data or data.endswith(b"\n") else data + b"\n"


def record(workspace: Path, result: GateResult, build_id: str) -> None:
    """Write gate.properties, the history with one more row and the plot CSV, as one change: a
    file that cannot be written leaves all three as they were."""
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
    remedy = fix_workspace(workspace, "nothing recorded", "rerun job4 (the gate)")
    history = workspace / HISTORY_FILE
    rows = read_history(history, remedy) or csv_row(HISTORY_HEADER).encode("utf-8")
    row = (utc_now(), build_id, result.commit, accuracy, threshold, passed)
    write_files(
        {
            workspace / PLOT_FILE: "accuracy,threshold\n" + csv_row((accuracy, threshold)),
            history: rows + csv_row(row).encode("utf-8"),
            workspace / GATE_PROPERTIES: format_properties(properties, "written by ct.gate check"),
        },
        remedy,
    )


def check(workspace: Path, threshold_text: str | None, build_id: str) -> str:
    threshold = parse_threshold(threshold_text)
    result = judge(workspace, threshold)
    record(workspace, result, build_id)
    accuracy, threshold_shown = fmt_number(result.accuracy), fmt_number(threshold)
    if result.passed:
        return f"accuracy {accuracy}% >= threshold {threshold_shown}: passed"
    return f"accuracy {accuracy}% below threshold {threshold_shown}: tuning needed"


# ---------------------------------------------------------------- promote


def promote_remedy(workspace: Path) -> str:
    return fix_workspace(workspace, "the best model is unchanged", "rerun ct.pipeline.gate promote")


def model_path(workspace: Path, metrics: Mapping[str, Any]) -> Path:
    """The model metrics.json names (relative to W), checked to be a non-empty, readable file."""
    path = workspace / metrics["model"]
    if not path.is_file():
        raise GateError(
            f"{path} (named by {workspace / METRICS_FILE}) is missing; nothing promoted; "
            f"{RERUN_TRAINING}"
        )
    try:
        with open(path, "rb") as handle:
            empty = os.fstat(handle.fileno()).st_size == 0
    except OSError as err:
        raise GateError(
            f"cannot read {path} ({os_reason(err)}); nothing promoted; make it readable for "
            "this user, then rerun ct.pipeline.gate promote"
        ) from None
    if empty:
        raise GateError(f"{path} is empty; nothing promoted; {RERUN_TRAINING}")
    return path


def is_workspace_file(name: Any) -> bool:
    """A relative path that stays inside the workspace (what best.json may name as its model)."""
    if not isinstance(name, str) or not name:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts


def load_best(workspace: Path) -> dict[str, Any] | None:
    """The current best record, None when there is none; a damaged one is a GateError."""
    path = workspace / BEST_FILE
    if not path.exists():
        return None
    remedy = f"nothing changed; inspect it (and {workspace / BEST_MODEL}), then repair or remove it"
    best = load_json_object(path, remedy)
    if not is_percentage(best.get("accuracy")):
        raise GateError(f"{path} has accuracy {best.get('accuracy')!r}, not a percentage; {remedy}")
    # Records from before models/ name best-model.pt itself, or nothing: that is the model then.
    best.setdefault("model", BEST_MODEL)
    if not is_workspace_file(best["model"]):
        raise GateError(f"{path} names model {best['model']!r}, not a workspace file; {remedy}")
    return best


def best_model_missing(workspace: Path, best: Mapping[str, Any]) -> bool:
    """The recorded model, or the best-model.pt users open, is gone: any run may replace it."""
    return not (workspace / best["model"]).is_file() or not (workspace / BEST_MODEL).is_file()


def stored_name(best: Mapping[str, Any] | None) -> str | None:
    """The file in models/ that a record names; None for no record, or one from before models/."""
    if best is None or PurePosixPath(best["model"]).parent != PurePosixPath(MODELS_DIR):
        return None
    return PurePosixPath(best["model"]).name


TUNING_FACTS = ("study", "trials", "trials_finished", "trials_pruned")


def best_record(
    workspace: Path, metrics: Mapping[str, Any], model: str, sha256: str
) -> dict[str, Any]:
    record_ = {
        "accuracy": metrics["accuracy"],
        "params": run_params(metrics),
        "commit": commit_of_run(workspace, metrics) or None,
        "run_id": metrics["run_id"],
        "run_dir": metrics["run_dir"],
        "mode": metrics.get("mode"),
        "source_model": metrics["model"],
        "model": model,
        "model_sha256": sha256,
        "promoted_at": utc_now(),
    }
    if metrics.get("val_accuracy") is not None:
        record_["val_accuracy"] = metrics["val_accuracy"]
    # A tuning round's study and how its trials ended (train.py --tune's summary)
    for key in TUNING_FACTS:
        if metrics.get(key) is not None:
            record_[key] = metrics[key]
    # Where the model came from (commit, image, data, seed, ...), as the trainer recorded it;
    # runs from before lineage have none, and their record has none either.
    if isinstance(metrics.get(LINEAGE), dict):
        record_[LINEAGE] = metrics[LINEAGE]
    return record_


def promotion_text(promoted: bool, accuracy: str, best_accuracy: str) -> str:
    properties = {
        "PROMOTED": "true" if promoted else "false",
        "ACCURACY": accuracy,
        "BEST_ACCURACY": best_accuracy,
    }
    return format_properties(properties, "written by ct.gate promote")


@contextmanager
def promotion_lock(workspace: Path) -> Iterator[None]:
    """Promotions of one workspace take turns (job4 and job5 may end together): comparing with
    the best, replacing it and pruning models/ must not interleave. The lock is on the workspace
    folder itself, so taking it writes nothing."""
    try:
        fd = os.open(workspace, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as err:
        raise GateError(
            f"cannot open {workspace} ({os_reason(err)}); nothing promoted; check --workspace"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # a file system without locks: promote unlocked, as before there was a lock
        yield
    finally:
        os.close(fd)


def promote(workspace: Path) -> str:
    with promotion_lock(workspace):
        metrics = load_metrics(workspace)
        source = model_path(workspace, metrics)
        best = load_best(workspace)
        accuracy = fmt_number(metrics["accuracy"])
        missing = best is not None and best_model_missing(workspace, best)
        if best is not None and not missing and metrics["accuracy"] <= best["accuracy"]:
            return keep(workspace, best, accuracy)
        model = install(workspace, metrics, source)
    before = "no previous best" if best is None else f"previous {fmt_number(best['accuracy'])}%"
    if missing:
        before += f", whose {BEST_MODEL} was missing"
    return (
        f"promoted {metrics['model']} ({accuracy}%, {before}) to {workspace / BEST_MODEL} "
        f"-> {model}"
    )


def keep(workspace: Path, best: Mapping[str, Any], accuracy: str) -> str:
    best_accuracy = fmt_number(best["accuracy"])
    text = promotion_text(False, accuracy, best_accuracy)
    write_files({workspace / PROMOTION_PROPERTIES: text}, promote_remedy(workspace))
    settle(workspace, best)  # repairs what an earlier promotion could not finish
    return (
        f"kept the current best {best_accuracy}% (run {best.get('run_id')}); "
        f"this run's {accuracy}% is not better"
    )


def install(workspace: Path, metrics: Mapping[str, Any], source: Path) -> str:
    """Make the run's model the best; returns the stored model's name (relative to W).

    The stored copy is invisible until the rename of best.json names it: the last step of one
    change with promotion.properties. best-model.pt follows, then the old model goes."""
    remedy = promote_remedy(workspace)
    link = workspace / BEST_MODEL
    if link.is_dir() and not link.is_symlink():
        raise GateError(f"{link} is a folder; nothing promoted; move it away, then rerun")
    model, sha256 = store_model(workspace, source, remedy)
    accuracy = fmt_number(metrics["accuracy"])
    new = best_record(workspace, metrics, model, sha256)
    files = {  # best.json last: its rename is the commit point
        workspace / PROMOTION_PROPERTIES: promotion_text(True, accuracy, accuracy),
        workspace / BEST_FILE: json.dumps(new, indent=2, sort_keys=True) + "\n",
    }
    try:
        write_files(files, remedy)
    except GateError:
        prune_unnamed(workspace)  # the new copy, unless the old record names the same content
        raise
    settle(workspace, new)
    return model


def store_model(workspace: Path, source: Path, remedy: str) -> tuple[str, str]:
    """Copy the model to models/ under its content's name; (name relative to W, sha256)."""
    folder = workspace / MODELS_DIR
    try:
        stored, sha256 = atomic.store_by_content(source, folder, *STORED_NAME)
    except atomic.WriteError as err:
        raise GateError(f"cannot store {source} in {folder} ({err.reason}); {remedy}") from None
    return stored.relative_to(workspace).as_posix(), sha256


def settle(workspace: Path, best: Mapping[str, Any]) -> None:
    """Point best-model.pt at the model the record names, then drop the models no record names.
    Only ever called with the record in place, so nothing it names is deleted."""
    name = stored_name(best)
    if name is None:
        return  # a record from before models/: best-model.pt is the model file itself
    link, model = workspace / BEST_MODEL, best["model"]
    if not (link.is_symlink() and os.readlink(link) == model):
        try:
            atomic.replace_symlink(link, model)
        except atomic.WriteError as err:
            raise GateError(
                f"{workspace / BEST_FILE} names {model}, but {link} cannot point at it "
                f"({err.reason}); move {link} away, then rerun ct.pipeline.gate promote "
                "to repair the link"
            ) from None
    prune_models(workspace, keep=name)


def prune_unnamed(workspace: Path) -> None:
    """Delete the stored models that the record now on disk does not name; it is read again
    rather than assumed, so that a model is never deleted while a record names it."""
    try:
        best = load_best(workspace)
    except GateError:
        return  # cannot tell what is named: delete nothing
    prune_models(workspace, keep=stored_name(best))


def prune_models(workspace: Path, keep: str | None) -> None:
    """Delete the stored models other than `keep`, and copies killed midway. Best effort: a file
    left over costs disk space, not consistency, and the next promotion tries again."""
    folder = workspace / MODELS_DIR
    try:
        names = [path.name for path in folder.iterdir()]
    except OSError:
        return
    for name in names:
        ours = _STORED_MODEL.fullmatch(name) or atomic.is_incoming_leftover(name, *STORED_NAME)
        if ours and name != keep:
            try:
                (folder / name).unlink()
            except OSError:
                pass


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ct.gate", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check_cmd = commands.add_parser("check", help="validate accuracy.txt against the threshold")
    add_workspace_argument(check_cmd)
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
    add_workspace_argument(promote_cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    workspace = workspace_of(parser, args.workspace)
    if workspace is None:
        return 2
    try:
        if args.command == "check":
            print(check(workspace, args.threshold, args.build_id))
        else:
            print(f"ct.gate: {promote(workspace)}")
    except GateError as err:
        print(f"ct.gate: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        # A safety net: every known read and write above has its own message; an unforeseen
        # one is still one line naming the path, not a traceback.
        print(f"ct.gate: {err}; fix that path's permissions, then rerun", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
