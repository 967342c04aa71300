"""Where a model came from: commit -> image -> data -> config -> run -> model. Stdlib only.

    python3 -m ct.pipeline.lineage --workspace W [best|RUN_ID] [--verify]

Prints the chain for the best model (best.json, default) or for a run (runs/RUN_ID/metrics.json),
from the `lineage` object the trainer writes into metrics.json and the gate copies into best.json
on promotion. `--verify` hashes the model file again (the one best.json names, or
runs/RUN_ID/model.pt; and the ONNX export best.json's `export` names, when its lineage records
an onnx_sha256: ct.pipeline.exported), the dataset (W/data: the cifar-10-batches-py folder, else
cifar-10-python.tar.gz, hashed by ct.workspace.dataset_sha256 as the trainer does), the data
version (ct.data_version over that digest and every image of W/data/increments/, when the record
has one; said when not) and the code (the commit's snapshot W/code/<commit>/, hashed by
ct.workspace.code_sha256, when the record has a code_sha256 and the snapshot is still there; said
when not checked) and says what no longer matches. Exit 0: printed (and, with --verify, everything
checked matches); 1: a mismatch or a file that cannot be hashed; 2: bad input (no such workspace,
run or record).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ct import data_version, untrusted
from ct import workspace as names
from ct.pipeline import cli, promote, records
from ct.pipeline.errors import PipelineError


class LineageError(PipelineError):
    """Bad input; its text is the one line printed on stderr (exit 2)."""


def field(record: Mapping[str, Any] | None, name: str) -> Any:
    """A lineage field of a best.json record or a metrics.json: from its `lineage` object (the
    trainer's ct.trainer.lineage.run_lineage), else the same key at the top level, where both
    records also carry the commit; None."""
    if not record:
        return None
    lineage = record.get(names.LINEAGE)
    for source in (lineage if isinstance(lineage, dict) else {}, record):
        value = source.get(name)
        if value not in (None, ""):
            return value
    return None


def config_sha256(config: Any) -> str | None:
    """A short identity for a config: sha256 of its canonical JSON (sorted keys)."""
    if not isinstance(config, dict):
        return None
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()




@dataclass(frozen=True)
class Subject:
    """What the chain is printed for: the best model or one run."""

    what: str  # "best model" or "run <id>"
    record: dict[str, Any]  # best.json, or the run's metrics.json
    model: Path  # the model file to verify
    model_sha256: str | None  # what the record says it is


def load_subject(workspace: Path, which: str) -> Subject:
    if which == "best":
        try:
            best = promote.load_best(workspace)
        except PipelineError as err:
            raise LineageError(str(err)) from None
        if best is None:
            raise LineageError(f"{workspace / names.BEST_FILE} is missing: no model has been "
                               "promoted yet; name a run id instead")
        return Subject("best model", best, workspace / best["model"],
                       best.get("model_sha256") or field(best, "model_sha256"))
    if not which or "/" in which or which in (".", ".."):
        raise LineageError(f"{which!r} is not a run id (a folder name under runs/) or 'best'")
    run_dir = workspace / names.RUNS_DIR / which
    if not run_dir.is_dir():
        raise LineageError(f"no run {which!r}: {run_dir} is not a folder")
    try:
        metrics = records.load_json_object(run_dir / names.RUN_METRICS,
                                        "the run did not finish, or its summary is damaged")
    except PipelineError as err:
        raise LineageError(str(err)) from None
    return Subject(f"run {which}", metrics, run_dir / names.RUN_MODEL,
                   field(metrics, "model_sha256"))


def chain_lines(workspace: Path, subject: Subject) -> list[str]:
    record = subject.record

    def shown(value: Any) -> str:
        return "unknown" if value in (None, "") else str(value)

    lineage_note = "" if isinstance(record.get(names.LINEAGE), dict) else \
        " (no lineage recorded: a run from before lineage; fields from its summary)"
    config = record.get("config") if isinstance(record.get("config"), dict) else None
    params = record.get("params") if isinstance(record.get("params"), dict) else None
    cfg = config or params
    cfg_hash = config_sha256(cfg)
    image = shown(field(record, "image"))
    if field(record, "image_id"):
        image += f" ({field(record, 'image_id')})"
    run_dir = record.get("run_dir") or f"{names.RUNS_DIR}/{record.get('run_id')}"
    code = field(record, "code_sha256")
    return [
        f"lineage of the {subject.what}{lineage_note}:",
        f"  commit  {shown(field(record, 'commit'))}"
        + (f"  code sha256 {code}" if code else ""),
        f"  image   {image}",
        f"  data    sha256 {shown(field(record, 'dataset_sha256'))}"
        + (f" ({field(record, 'dataset_form')})" if field(record, "dataset_form") else "")
        + (f"  version {field(record, 'data_version')}" if field(record, "data_version") else ""),
        f"  config  sha256 {shown(cfg_hash)[:16]}  seed {shown(field(record, 'seed'))}"
        + (f"  {json.dumps(cfg, sort_keys=True)}" if cfg else ""),
        f"  run     {shown(record.get('run_id'))} ({run_dir}; mode {shown(record.get('mode'))},"
        f" torch {shown(field(record, 'torch'))}, device {shown(field(record, 'device'))},"
        f" threads {shown(field(record, 'threads'))})",
        f"  model   sha256 {shown(subject.model_sha256)} ({subject.model.relative_to(workspace)})",
        *([f"  onnx    sha256 {field(record, 'onnx_sha256')} ({exported_file(record)})"]
          if field(record, "onnx_sha256") else []),
    ]


def exported_file(record: Mapping[str, Any]) -> str | None:
    """The ONNX file best.json's `export` names (ct.pipeline.exported), when it names one."""
    export = record.get("export")
    name = export.get("onnx") if isinstance(export, dict) else None
    return name if records.is_workspace_file(name) else None


def verify_onnx(workspace: Path, record: Mapping[str, Any]) -> str | None:
    """The problem with the recorded ONNX export (lineage onnx_sha256), None when it matches or
    none is recorded; a symlink is not followed."""
    expected, name = field(record, "onnx_sha256"), exported_file(record)
    if not expected:
        return None
    if name is None:
        return f"onnx: the record names no exported file to compare with sha256 {expected}"
    path = workspace / name
    try:
        actual = untrusted.sha256(path, workspace)
    except untrusted.UntrustedFile as err:
        if err.cause.startswith("a symbolic link"):
            return f"onnx: {path} is a symlink, not the stored export; not followed"
        return f"onnx: cannot hash {path} ({err.cause})"
    if actual != expected:
        return (f"onnx: {path} has sha256 {actual}, the record says {expected}: the exported "
                "model changed")
    return None


def verify(workspace: Path, subject: Subject) -> tuple[list[str], str | None]:
    """What no longer matches the record (one line per problem, [] when all match), and why the
    code was not checked (None: it was)."""
    problems = []
    try:
        actual = untrusted.sha256(subject.model, workspace)
    except untrusted.UntrustedFile as err:
        problems.append(f"model: cannot hash {subject.model} ({err.cause})")
    else:
        if not subject.model_sha256:
            problems.append(f"model: the record names no model sha256 to compare with {actual}")
        elif actual != subject.model_sha256:
            problems.append(f"model: {subject.model} has sha256 {actual}, the record says "
                            f"{subject.model_sha256}: the model file changed")
    expected = field(subject.record, "dataset_sha256")
    source = dataset_to_hash(workspace, field(subject.record, "dataset_form"))
    base = None
    if not expected:
        problems.append("data: the record names no dataset sha256 (a run from before lineage)")
    elif source is None:
        problems.append(f"data: no {names.DATA_FOLDER}/ or {names.DATA_ARCHIVE} in "
                        f"{workspace / names.DATA_DIR} to hash")
    else:
        try:
            base = names.dataset_sha256(source)
        except OSError as err:
            problems.append(f"data: cannot hash {source} ({records.os_reason(err)})")
        else:
            if base != expected:
                problems.append(f"data: {source} has sha256 {base}, the record says "
                                f"{expected}: the dataset changed")
    for problem in (verify_data_version(workspace, subject.record, base),
                    verify_onnx(workspace, subject.record)):
        problems += [problem] if problem else []
    problem, unchecked = verify_code(workspace, subject.record)
    return problems + ([problem] if problem else []), unchecked


def verify_data_version(workspace: Path, record: Mapping[str, Any], base: str | None
                        ) -> str | None:
    """The problem with the recorded data version, None when it matches (or is not recorded,
    which `show` says): ct.data_version recomputed over the base dataset's sha256 `base` (None:
    it could not be hashed, a problem reported already) and W/data/increments/, every file
    hashed again (no cache: a check must read the bytes)."""
    expected = field(record, "data_version")
    if not expected or base is None:
        return None
    data = workspace / names.DATA_DIR
    try:
        actual = data_version.compute(data, base=base).version
    except data_version.DataVersionError as err:
        return f"data version: cannot compute it ({err})"
    if actual != expected:
        return (f"data version: {data} (with {data / data_version.INCREMENTS_DIR}/) gives "
                f"{actual}, the record says {expected}: the data changed (an increment added, "
                "removed or edited, or the dataset)")
    return None


_COMMIT_ID = re.compile(r"[0-9a-f]{7,64}")  # as ct.workspace reads commit.txt


def verify_code(workspace: Path, record: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(the problem, why the code was not checked): the commit's snapshot W/code/<commit>/ must
    hash (ct.workspace.code_sha256) to the recorded code_sha256. A snapshot that is a symlink,
    or that leads out of the workspace, is refused, not followed; one that is gone, or a record
    without code_sha256 (older runs, runs outside the pipeline), is not checked."""
    expected, commit = field(record, "code_sha256"), field(record, "commit")
    if not expected:
        return None, "not recorded"
    if not commit:
        return None, "the record names no commit"
    if not isinstance(commit, str) or not _COMMIT_ID.fullmatch(commit):
        return None, f"the record's commit {commit!r} is not a commit id"
    snapshot = workspace / names.snapshot_dir(commit)
    if snapshot.is_symlink():
        return (f"code: {snapshot} is a symlink, not a snapshot folder; not followed", None)
    if not os.path.lexists(snapshot):
        return None, f"snapshot of {commit} removed"
    if not snapshot.is_dir():
        return f"code: {snapshot} is not a folder", None
    real, inside = snapshot.resolve(), workspace.resolve()
    if real != inside and inside not in real.parents:
        return (f"code: {snapshot} leads out of the workspace (to {real}); not followed", None)
    try:
        actual = names.code_sha256(snapshot)
    except OSError as err:
        return f"code: cannot hash {snapshot} ({records.os_reason(err)})", None
    if actual != expected:
        return (f"code: {snapshot} has sha256 {actual}, the record says {expected}: the "
                "commit's snapshot changed"), None
    return None, None


def dataset_to_hash(workspace: Path, form: Any) -> Path | None:
    """The dataset in W/data that the record's digest covers: the form it names (archive or
    folder) when that is there, else what a run would read now."""
    data = workspace / names.DATA_DIR
    wanted = {"archive": data / names.DATA_ARCHIVE, "folder": data / names.DATA_FOLDER}.get(form)
    if wanted is not None and wanted.exists():
        return wanted
    return names.dataset_source(data)


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.parser("ct.lineage", __doc__)
    parser.add_argument("which", nargs="?", default="best",
                        help="'best' (default: the promoted model) or a run id under runs/")
    parser.add_argument("--verify", action="store_true",
                        help="hash the model, the dataset and the code again and compare "
                             "with the record")
    args = parser.parse_args(argv)
    workspace = cli.workspace_or_exit(parser, args.workspace)
    return cli.run("ct.lineage", lambda: show(workspace, args.which, args.verify))


def show(workspace: Path, which: str, check: bool) -> int:
    """Print the chain; with `check`, what no longer matches (exit 1) or that all does."""
    subject = load_subject(workspace, which)
    print("\n".join(chain_lines(workspace, subject)))
    if not check:
        return 0
    problems, unchecked = verify(workspace, subject)
    if not field(subject.record, "data_version"):
        print("ct.lineage: data version not recorded (a run from before increments): "
              "the dataset alone checked")
    if unchecked:
        print(f"ct.lineage: code not checked: {unchecked}")
    for problem in problems:
        print(f"ct.lineage: MISMATCH {problem}")
    if problems:
        return 1
    checked = ["the model", *(["the ONNX export"] if field(subject.record, "onnx_sha256") else []),
               "the dataset",
               *(["the data version"] if field(subject.record, "data_version") else []),
               *([] if unchecked else ["the code"])]
    what = f"{', '.join(checked[:-1])} and {checked[-1]}"
    print(f"ct.lineage: verified: {what} match the record")
    return 0


if __name__ == "__main__":
    sys.exit(main())
