"""The figure that promotes is measured by the pipeline's own code. Standard library.

A run's accuracy (metrics.json, accuracy.txt) is what the code under test wrote about itself. So
before a candidate is promoted, its model is exported to ONNX with the recipe's own test-time
views (`python -m ct.trainer.export MODEL --views recipe --parity-only`, the commit's code, as
the champion's export) and that graph, a data file, is scored by ct.serving.measure: the
pipeline's code (the serving image, or this host's Python), on the test data the pipeline
configured (CT_DATA_DIR; without one, only the workspace's archive that has the official
download's md5), never a cache the container wrote. Then:

- the measured test set must be the run's (its test_version, computed by the measurement);
- the claimed and the measured accuracy must lie within CT_MEASURE_TOLERANCE points (and one
  test image's worth), or the promotion is refused with one line naming both figures;
- otherwise the measured accuracy is the one the gate and the promotion use.

    python3 -m ct.pipeline.measured --workspace W mounts --runtime docker|local [--data-dir D]
                                    [--increments I]                    docker run's mounts
    python3 -m ct.pipeline.measured --workspace W args --runtime docker|local --export RUN_DIR
                                    [--data-dir D] [--increments I]     ct.serving.measure's
    ... | python3 -m ct.pipeline.measured --workspace W record --export RUN_DIR

`mounts` and `args` print one argument a line (D, I: CT_DATA_DIR, CT_INCREMENTS_DIR). `record`
takes ct.serving.measure's JSON line on stdin, checks that it measured the export of this run's
model (export.json's model_sha256 and onnx_sha256) and keeps it in status/measured.json, which
no container can write. `check` (ct.pipeline.after_run, before promotion) reads it back.
Errors: one line on stderr, exit 2, nothing written.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import sys
from argparse import Namespace
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ct import atomic, untrusted
from ct import workspace as names
from ct.pipeline import cli, records
from ct.pipeline.errors import PipelineError
from ct.pipeline.promote import run_model
from ct.pipeline.rescore import test_version_of

RECORD = f"{names.STATUS_DIR}/measured.json"
TOLERANCE_ENV = "CT_MEASURE_TOLERANCE"
SWITCH_ENV = "CT_MEASURE"
# Points. Measured (docs/security.md): a fast-preset run's model, tested by torch in bf16 as the
# run tests it and by ONNX Runtime in fp32 here, scored 81.94% both, its predictions differing on
# 23 of 10,000 images (0.23 points, had every flip gone one way): twice that is noise, more is a
# false claim. The tolerance only tells the two apart: what promotes is the measured figure.
DEFAULT_TOLERANCE = 0.5
FORMAT = "ct-measure/1"
EXPORT_RUN = re.compile(r"runs/export-[A-Za-z0-9._-]+")
MAX_MANIFEST_BYTES = 1 << 20
MAX_LINE_BYTES = 1 << 16
MOUNT = {"workspace": "/workspace", "data": "/data", "increments": "/increments"}
_HEX64 = re.compile(r"[0-9a-f]{64}")


class NeedsMeasure(PipelineError):
    """The candidate has no measurement yet: the job script exports and measures `model`
    (a workspace path) with the code of `commit`, then asks again."""

    def __init__(self, commit: str, model: str) -> None:
        super().__init__(f"the candidate {model} (commit {commit}) is measured by the pipeline "
                         "before promotion")
        self.commit, self.model = commit, model


class Refused(PipelineError):
    """The claimed and the measured accuracy disagree, or were taken on other test sets;
    `accuracy`: the measured one."""

    def __init__(self, message: str, accuracy: float) -> None:
        super().__init__(message)
        self.accuracy = accuracy


@dataclass(frozen=True)
class Measurement:
    accuracy: float  # measured, percent
    claimed: float
    images: int
    tolerance: float  # points allowed, the one-image floor included
    kept: Mapping[str, Any]  # status/measured.json

    def summary(self) -> dict[str, Any]:
        """What best.json keeps of it (promote's `measured`)."""
        return {"accuracy": self.accuracy, "claimed": self.claimed, "images": self.images,
                "tolerance": self.tolerance,
                **{key: self.kept[key] for key in ("correct", "onnx_sha256", "export",
                                                   "measured_at") if key in self.kept}}

    def line(self) -> str:
        return (f"measured {records.fmt_number(self.accuracy)}% on {self.images} test images "
                f"by the pipeline (claimed {records.fmt_number(self.claimed)}%, within "
                f"{records.fmt_number(self.tolerance)} points)")


def enabled(env: Mapping[str, str]) -> bool:
    """CT_MEASURE: 1 (the default) measures every candidate; 0 lets its own claim promote, for
    the tests of the gate on fabricated runs, whose models cannot run. Else one line."""
    text = env.get(SWITCH_ENV, "") or "1"
    if text not in ("0", "1"):
        raise PipelineError(f"{SWITCH_ENV}={text[:40]!r} must be 1 (measure every candidate "
                            "before promotion, the default) or 0")
    return text == "1"


def tolerance(env: Mapping[str, str]) -> float:
    """CT_MEASURE_TOLERANCE: points in [0, 100]; DEFAULT_TOLERANCE when unset or empty."""
    text = env.get(TOLERANCE_ENV, "")
    if not text:
        return DEFAULT_TOLERANCE
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0.0 <= value <= 100.0) or not re.fullmatch(
            r"\d+(\.\d*)?|\.\d+", text):
        raise PipelineError(f"{TOLERANCE_ENV}={text[:40]!r} is not a number of points in "
                            f"[0, 100]; set it like {DEFAULT_TOLERANCE} or leave it empty")
    return value


def candidate(workspace: Path, metrics: Mapping[str, Any]) -> tuple[str, str]:
    """(the model metrics.json names, its sha256), read as promotion reads it."""
    name, data = run_model(workspace, metrics)
    return name, hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- the decision


def check(workspace: Path, metrics: Mapping[str, Any], env: Mapping[str, str] = os.environ,
          required: bool = False) -> Measurement:
    """The run's measured accuracy, when it agrees with the claimed one. NeedsMeasure when it
    has none (with `required`: a PipelineError, it was asked for already); Refused when the
    figures or the test sets differ."""
    allowed = tolerance(env)
    model, sha256 = candidate(workspace, metrics)
    kept = load(workspace)
    if kept.get("run_id") != metrics["run_id"] or kept.get("model_sha256") != sha256:
        if required:
            raise PipelineError(f"no measurement of run {metrics['run_id']}'s model is "
                                f"recorded in {workspace / RECORD} (see the lines above): "
                                "nothing promoted")
        raise NeedsMeasure(names.commit_of_run(workspace, metrics) or names.NO_COMMIT, model)
    claimed, measured, images = float(metrics["accuracy"]), float(kept["accuracy"]), kept["images"]
    run = metrics["run_id"]
    tested = test_version_of(metrics)
    if tested != kept["test_version"]:
        raise Refused(f"run {run} claims {records.fmt_number(claimed)}% on test set "
                      f"{str(tested)[:16]}, but the pipeline's test data is test set "
                      f"{kept['test_version'][:16]} (measured there: "
                      f"{records.fmt_number(measured)}%): nothing promoted", measured)
    allowed = max(allowed, 100.0 / images)  # one image: a borderline one may flip in fp32
    if not abs(claimed - measured) <= allowed:
        raise Refused(f"run {run} claims {records.fmt_number(claimed)}% but the pipeline "
                      f"measured {records.fmt_number(measured)}% ({kept['correct']} of {images}"
                      f" test images): more than {records.fmt_number(allowed)} points apart "
                      f"({TOLERANCE_ENV}): nothing promoted", measured)
    return Measurement(measured, claimed, images, allowed, kept)


def load(workspace: Path) -> dict[str, Any]:
    """status/measured.json ({} when there is none, or it cannot be read: measure again)."""
    try:
        kept = untrusted.read_json(workspace / RECORD, MAX_MANIFEST_BYTES, root=workspace)
    except untrusted.UntrustedFile:
        return {}
    return kept if isinstance(kept, dict) and not _problem(kept) else {}


# ---------------------------------------------------------------- the record


def _problem(result: Mapping[str, Any]) -> str:
    """What is wrong with a measurement's fields ("" when nothing is)."""
    def whole(key: str) -> bool:
        return type(result.get(key)) is int and result[key] >= 0

    if result.get("format") != FORMAT:
        return f"format is {str(result.get('format'))[:40]!r}, not {FORMAT}"
    if not (whole("images") and whole("correct") and 0 < result["images"]
            and result["correct"] <= result["images"]):
        return "images and correct are not counts"
    if not records.is_percentage(result.get("accuracy")) or not math.isclose(
            result["accuracy"], 100.0 * result["correct"] / result["images"], abs_tol=1e-3):
        return "accuracy is not correct / images"
    for key in ("onnx_sha256", "test_version"):
        if not (isinstance(result.get(key), str) and _HEX64.fullmatch(result[key])):
            return f"{key} is not a sha256"
    return ""


def record(workspace: Path, export: str, line: str) -> str:
    """Keep the measurement `line` (ct.serving.measure's output) of the export in `export`
    (runs/export-...) of the latest run's model; the one line that says so."""
    metrics = records.load_metrics(workspace)
    model, sha256 = candidate(workspace, metrics)
    result, problem = records.parse_json_object(line.strip())
    if result is None or _problem(result):
        raise PipelineError(f"ct.serving.measure's answer {problem or _problem(result or {})}; "
                            "nothing recorded")
    if not EXPORT_RUN.fullmatch(export):
        raise PipelineError(f"{export[:80]!r} is not an export's run folder (runs/export-...); "
                            "nothing recorded")
    folder = records.run_folder(workspace, export)
    try:
        manifest = untrusted.read_json(folder / "export.json", MAX_MANIFEST_BYTES, root=workspace)
    except untrusted.UntrustedFile as err:
        raise PipelineError(f"{err}; nothing recorded") from None
    manifest = manifest if isinstance(manifest, dict) else {}
    if manifest.get("model_sha256") != sha256:
        exported = str(manifest.get("model_sha256"))[:16]
        raise PipelineError(f"{export}/export.json exports model {exported}, not run "
                            f"{metrics['run_id']}'s {model} ({sha256[:16]}); nothing recorded")
    if manifest.get("onnx_sha256") != result["onnx_sha256"]:
        raise PipelineError(f"the graph measured ({result['onnx_sha256'][:16]}) is not "
                            f"{export}/model.onnx as exported; nothing recorded")
    kept = {**{key: result[key] for key in ("format", "accuracy", "correct", "images",
                                            "onnx_sha256", "test_version")},
            "run_id": metrics["run_id"], "model": model, "model_sha256": sha256,
            "export": export, "measured_at": records.utc_now()}
    try:
        folder_ = untrusted.real_folder(workspace, names.STATUS_DIR, create=True)
        atomic.write_json(folder_ / Path(RECORD).name, kept)
    except (untrusted.UntrustedFile, OSError) as err:
        raise PipelineError(f"cannot write {workspace / RECORD} ({err}); nothing recorded"
                            ) from None
    return (f"measured {records.fmt_number(kept['accuracy'])}% on {kept['images']} test images "
            f"({export}/model.onnx, run {metrics['run_id']})")


# ---------------------------------------------------------------- what the job script runs


def data_source(workspace: Path, data_dir: str) -> tuple[Path, bool]:
    """(the dataset folder or archive to measure on, whether only the official archive may be
    read there). CT_DATA_DIR is the pipeline's setting; without one the trainer downloaded the
    archive into data/, which the container can write: then only its official md5 vouches."""
    if data_dir:
        found = names.dataset_source(Path(data_dir))
        if found is None:
            raise PipelineError(f"CT_DATA_DIR={data_dir} holds neither {names.DATA_FOLDER}/ nor "
                                f"{names.DATA_ARCHIVE}: the candidate cannot be measured")
        return found.resolve(), False
    archive = workspace / names.DATA_DIR / names.DATA_ARCHIVE
    if not archive.is_file() or archive.is_symlink():
        raise PipelineError(f"CT_DATA_DIR is empty and {archive} is no downloaded archive: the "
                            "candidate cannot be measured on data the pipeline trusts; set "
                            "CT_DATA_DIR to the dataset's folder")
    return archive, True


def increments_folder(workspace: Path, given: str) -> Path | None:
    """CT_INCREMENTS_DIR, else data/increments when it is a real folder (as the trainer)."""
    if given:
        return Path(given).resolve()
    name = f"{names.DATA_DIR}/increments"
    if not (workspace / name).exists():
        return None
    try:
        return untrusted.real_folder(workspace, name)
    except untrusted.UntrustedFile as err:
        raise PipelineError(f"{err}: the increments cannot be measured on") from None


def mounts(workspace: Path, args: Namespace) -> list[str]:
    source, _ = data_source(workspace, args.data_dir)
    increments = increments_folder(workspace, args.increments)
    out = ["-v", f"{workspace.resolve()}:{MOUNT['workspace']}:ro",
           "-v", f"{source}:{MOUNT['data']}/{source.name}:ro"]
    if increments is not None:
        out += ["-v", f"{increments}:{MOUNT['increments']}:ro"]
    return out


def measure_args(workspace: Path, args: Namespace) -> list[str]:
    if not EXPORT_RUN.fullmatch(args.export):
        raise PipelineError(f"{args.export[:80]!r} is not an export's run folder")
    source, official = data_source(workspace, args.data_dir)
    increments = increments_folder(workspace, args.increments)
    inside = args.runtime == "docker"
    root = Path(MOUNT["workspace"]) if inside else workspace.resolve()
    data = Path(MOUNT["data"]) / source.name if inside else source
    out = [str(root / args.export / "model.onnx"), "--root", str(root), "--data", str(data)]
    if official:
        out.append("--official")
    if increments is not None:
        out += ["--increments", MOUNT["increments"] if inside else str(increments)]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.parser("ct.measured", __doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("mounts", "args"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--runtime", choices=("docker", "local"), required=True)
        cmd.add_argument("--data-dir", default=os.environ.get("CT_DATA_DIR", ""))
        cmd.add_argument("--increments", default=os.environ.get("CT_INCREMENTS_DIR", ""))
        if name == "args":
            cmd.add_argument("--export", required=True)
    sub.add_parser("record").add_argument("--export", required=True)
    args = parser.parse_args(argv)
    workspace = cli.workspace_or_exit(parser, args.workspace)

    def action() -> int:
        if args.command == "record":
            print(f"ct.measured: {record(workspace, args.export, sys.stdin.read(MAX_LINE_BYTES))}",
                  file=sys.stderr)
        else:
            given = mounts if args.command == "mounts" else measure_args
            print("\n".join(given(workspace, args)))
        return 0

    return cli.run("ct.measured", action)


if __name__ == "__main__":
    raise SystemExit(main())
