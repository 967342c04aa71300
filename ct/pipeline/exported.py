"""The champion's ONNX export on the host (job7): checked, stored by content, named in best.json.
Standard library only.

    python3 -m ct.pipeline.exported record --workspace W RUN_DIR
    python3 -m ct.pipeline.exported needs --workspace W

`record` takes RUN_DIR, the folder `python -m ct.trainer.export` printed last (runs/export-...,
relative to W or absolute). The container wrote it, so all is checked and no symlink followed:
export.json must hold every field of the manifest (ct-export/1) with its type, the parity within
the host's own bounds (max |logit difference| <= 0.001, top-1 agreement >= 99.9 %) and
best.json's model_sha256 (else it is an export of another model); the ONNX file must hash to
onnx_sha256 and smoke.npz hold `images` uint8 (S, 3, 32, 32) and `labels` int64 (S,). Then,
under the promotion lock, with X the ONNX file's sha256[:16]: W/models/champion-X.onnx,
champion-X-smoke.npz and champion-X.json (the manifest, "onnx" and the smoke "file" renamed to
those files beside it, "run_dir" added), and best.json rewritten at once with
    "export": {"onnx": "models/champion-X.onnx", "onnx_sha256", "manifest":
               "models/champion-X.json", "served_accuracy", "parity", "exported_at", "run_dir"}
and lineage.onnx_sha256. `needs` prints `export COMMIT MODEL` when best.json's model has no
export recorded (or its stored files are gone): the commit whose code exports it and the model
file, relative to W; `exported` when it has one; `none` when no model has been promoted yet.
Errors: one line on stderr, exit 2, best.json untouched.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ct import atomic, untrusted
from ct import workspace as names
from ct.pipeline import cli, promote, records, rescore
from ct.pipeline.errors import PipelineError

FORMAT = "ct-export/1"
MANIFEST = "export.json"
EXPORT = "export"  # best.json's key
ONNX_SHA256 = "onnx_sha256"  # the lineage's key
MAX_LOGIT_DIFF = 1e-3  # the host's bounds, whatever tolerance the export was run with
MIN_AGREEMENT = 99.9
MIN_OPSET = 17
MAX_MANIFEST = 1 << 20
MAX_ONNX = 1 << 30
MAX_SMOKE = 64 << 20
_RUN_NAME = re.compile(r"export-\d{8}-\d{6}-[0-9a-f]{10}(-\d{1,4})?")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
SHAPE = ["N", 3, 32, 32]


def stored_names(onnx_sha256: str) -> tuple[str, str, str]:
    """The content-addressed names in models/: (the ONNX file, the manifest, the smoke set)."""
    stem = f"champion-{onnx_sha256[:16]}"
    return f"{stem}.onnx", f"{stem}.json", f"{stem}-smoke.npz"


# ---------------------------------------------------------------- reading the container's files


def open_run_dir(workspace: Path, given: str) -> tuple[int, str]:
    """(a descriptor of the folder, its path relative to W) for RUN_DIR: runs/export-... inside
    W, every step opened without following a symlink."""
    path = Path(given)
    if path.is_absolute():
        try:
            path = path.relative_to(workspace.resolve())
        except ValueError:
            raise PipelineError(f"{given} is not inside {workspace}; give the folder "
                                "ct.trainer.export printed (runs/export-...)") from None
    parts = path.parts
    if len(parts) != 2 or parts[0] != names.RUNS_DIR or not _RUN_NAME.fullmatch(parts[1]):
        raise PipelineError(f"{given!r} is not an export folder ({names.RUNS_DIR}/export-<time>-"
                            "<sha>); give the folder ct.trainer.export printed last")
    try:
        return untrusted.open_folder(workspace, parts), path.as_posix()
    except untrusted.UntrustedFile as err:
        raise PipelineError(f"{err.path} cannot be opened as a folder ({err.cause}; a symlink is "
                            "not followed); run job7's export again") from None


def open_member(folder: int, where: Path, name: str, limit: int) -> int:
    """A descriptor of the regular file `name` in the folder, no larger than `limit` bytes."""
    try:
        return untrusted.open_in(folder, name, where / name, limit)
    except untrusted.UntrustedFile as err:
        raise PipelineError(f"{err.path} cannot be opened ({err.cause}; a symlink is not "
                            "followed); run job7's export again") from None


def read_manifest(folder: int, where: Path) -> dict[str, Any]:
    with open(open_member(folder, where, MANIFEST, MAX_MANIFEST), "rb") as handle:
        raw = handle.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = ""  # not JSON then, which parse_json_object says
    manifest, problem = records.parse_json_object(text)
    if manifest is None:
        raise PipelineError(f"{where / MANIFEST} {problem}; run job7's export again")
    return manifest


# ---------------------------------------------------------------- the manifest's schema


def _number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _text(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 200 and "\n" not in value


def _digest(value: Any) -> bool:
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


def _plain_name(value: Any) -> bool:  # a file beside the manifest, never a path
    return isinstance(value, str) and _PLAIN_NAME.fullmatch(value) is not None


def _object(check: Mapping[str, Callable[[Any], bool]]) -> Callable[[Any], bool]:
    return lambda value: (isinstance(value, dict) and set(value) >= set(check)
                          and all(test(value[key]) for key, test in check.items()))


SCHEMA: dict[str, Callable[[Any], bool]] = {
    "format": lambda v: v == FORMAT,
    "model": _text,
    "model_sha256": _digest,
    "onnx": _plain_name,
    "onnx_sha256": _digest,
    "opset": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= MIN_OPSET,
    "input": lambda v: (isinstance(v, dict) and _text(v.get("name")) and v.get("dtype") == "uint8"
                        and v.get("shape") == SHAPE),
    "output": _object({"name": _text}),
    "classes": lambda v: (isinstance(v, list) and len(v) == 10 and all(_text(c) for c in v)
                          and len(set(v)) == 10),
    "tta": _object({"mirror": lambda v: isinstance(v, bool),
                    "translate": lambda v: isinstance(v, bool)}),
    "parity": _object({"images": _count,
                       "max_abs_logit_diff": lambda v: _number(v) and 0 <= v <= MAX_LOGIT_DIFF,
                       "top1_agreement": lambda v: (records.is_percentage(v)
                                                    and v >= MIN_AGREEMENT),
                       "tolerance": lambda v: _number(v) and v >= 0}),
    "served_accuracy": records.is_percentage,
    "torch_accuracy": records.is_percentage,
    "test_images": _count,
    "test_version": _text,
    "data_version": _text,
    "smoke": _object({"file": _plain_name, "images": _count,
                      "accuracy": records.is_percentage}),
    "commit": lambda v: v is None or _text(v),
    "exported_at": lambda v: isinstance(v, str) and _TIME.fullmatch(v) is not None,
    "versions": lambda v: isinstance(v, dict) and all(_text(x) for x in v.values()),
}


def check_manifest(manifest: Mapping[str, Any], path: Path) -> None:
    """Every field of SCHEMA present and valid; PipelineError naming the first that is not."""
    for key, valid in SCHEMA.items():
        if key not in manifest:
            raise PipelineError(f"{path} lacks {key!r}; run job7's export again")
        if not valid(manifest[key]):
            shown = json.dumps(manifest[key])[:80]
            raise PipelineError(f"{path} has {key} {shown}, which is not valid (or not within "
                                "the host's bounds); run job7's export again")
    if manifest["smoke"]["images"] > manifest["test_images"]:
        raise PipelineError(f"{path} has more smoke images than test images")


# ---------------------------------------------------------------- the copies in models/


def copy_checked(source: int, target: Path, check: Callable[[Path, str], None]) -> None:
    """Copy the open file `source` to `target` atomically; `check(copy, sha256)` sees the copy
    before it takes the name, and a PipelineError it raises leaves nothing behind."""
    def write(tmp: Path) -> None:
        digest = hashlib.sha256()
        with open(source, "rb", closefd=False) as src, open(tmp, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                dst.write(block)
        check(tmp, digest.hexdigest())

    try:
        atomic.write_via(target, write)
    except OSError as err:
        raise PipelineError(f"cannot write {target} ({records.os_reason(err)}); best.json is "
                            "unchanged; make the workspace's models/ writable, then rerun"
                            ) from None


def check_onnx(expected: str, where: Path) -> Callable[[Path, str], None]:
    def check(_: Path, sha256: str) -> None:
        if sha256 != expected:
            raise PipelineError(f"{where} has sha256 {sha256}, its manifest says {expected}: "
                                "the file changed after the export; run job7's export again")
    return check


def check_smoke(images: int, where: Path) -> Callable[[Path, str], None]:
    """smoke.npz as np.savez writes it: images.npy uint8 (S, 3, 32, 32), labels.npy int64 (S,)."""
    wanted = {"images.npy": ("|u1", (images, 3, 32, 32), 1),
              "labels.npy": ("<i8", (images,), 8)}

    def check(copy: Path, _: str) -> None:
        try:
            with zipfile.ZipFile(copy) as archive:
                if sorted(archive.namelist()) != sorted(wanted):
                    raise ValueError(f"it holds {archive.namelist()[:4]}, not images and labels")
                for name, (dtype, shape, size) in wanted.items():
                    with archive.open(name) as member:
                        header = npy_header(member)
                    if (header.get("descr"), header.get("shape"), header.get("fortran_order")) \
                            != (dtype, shape, False):
                        raise ValueError(f"{name} is {header}, not {dtype} {shape}")
                    if archive.getinfo(name).file_size < math.prod(shape) * size:
                        raise ValueError(f"{name} is shorter than its header says")
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
            raise PipelineError(f"{where} is not the smoke set its manifest describes "
                                f"({' '.join(str(err).split())[:160]}); run job7's export "
                                "again") from None
    return check


def npy_header(member: Any) -> dict[str, Any]:
    """The header dict of a .npy file (format versions 1 to 3), read without numpy."""
    start = member.read(8)
    if start[:6] != b"\x93NUMPY" or start[6] not in (1, 2, 3):
        raise ValueError("not a .npy file")
    width = 2 if start[6] == 1 else 4
    length = int.from_bytes(member.read(width), "little")
    header = ast.literal_eval(member.read(min(length, 4096)).decode("latin-1"))
    if not isinstance(header, dict):
        raise ValueError("a .npy header that is not a dict")
    return header


def models_dir(workspace: Path) -> Path:
    """W/models, a real folder of W (made when missing): no copy is written through a link."""
    try:
        return untrusted.real_folder(workspace, names.MODELS_DIR, create=True)
    except untrusted.UntrustedFile as err:
        raise PipelineError(f"{err.path} is not a folder ({err.cause}; a symlink is not "
                            "followed); best.json is unchanged; move it away, then rerun") from None


# ---------------------------------------------------------------- record, needs


def record(workspace: Path, given: str) -> str:
    """Check the export in RUN_DIR and record it for the champion; the line to print."""
    folder, run_dir = open_run_dir(workspace, given)
    where = workspace / run_dir
    try:
        manifest = read_manifest(folder, where)
        check_manifest(manifest, where / MANIFEST)
        onnx_fd = open_member(folder, where, manifest["onnx"], MAX_ONNX)
        smoke_fd = open_member(folder, where, manifest["smoke"]["file"], MAX_SMOKE)
    finally:
        os.close(folder)
    try:
        with promote.promotion_lock(workspace):
            return install(workspace, run_dir, manifest, onnx_fd, smoke_fd)
    finally:
        os.close(onnx_fd)
        os.close(smoke_fd)


def install(workspace: Path, run_dir: str, manifest: dict[str, Any], onnx_fd: int,
            smoke_fd: int) -> str:
    best = promote.load_best(workspace)
    if best is None:
        raise PipelineError(f"{workspace / names.BEST_FILE} is missing: no model has been "
                            "promoted, so there is no champion to record an export of")
    if best.get("model_sha256") != manifest["model_sha256"]:
        raise PipelineError(
            f"{run_dir} is an export of model sha256 {manifest['model_sha256'][:16]}, the "
            f"champion is {str(best.get('model_sha256'))[:16]} ({best['model']}): an export of "
            "another model; best.json is unchanged; export the champion (job7)")
    sha256 = manifest["onnx_sha256"]
    onnx_name, manifest_name, smoke_name = stored_names(sha256)
    folder = models_dir(workspace)
    stored = {**manifest, "onnx": onnx_name, "smoke": {**manifest["smoke"], "file": smoke_name},
              "run_dir": run_dir}
    models = names.MODELS_DIR
    best[EXPORT] = {"onnx": f"{models}/{onnx_name}", "onnx_sha256": sha256,
                    "manifest": f"{models}/{manifest_name}",
                    "served_accuracy": manifest["served_accuracy"],
                    "parity": manifest["parity"], "exported_at": manifest["exported_at"],
                    "run_dir": run_dir}
    lineage = best.get(names.LINEAGE)
    (lineage if isinstance(lineage, dict) else best)[ONNX_SHA256] = sha256
    remedy = records.fix_workspace(workspace, "best.json is unchanged",
                                   "rerun ct.pipeline.exported record")
    where = workspace / run_dir
    added = [folder / name for name in (onnx_name, smoke_name, manifest_name)
             if not os.path.lexists(folder / name)]
    try:
        copy_checked(onnx_fd, folder / onnx_name, check_onnx(sha256, where / manifest["onnx"]))
        copy_checked(smoke_fd, folder / smoke_name,
                     check_smoke(manifest["smoke"]["images"], where / manifest["smoke"]["file"]))
        records.write_files({  # best.json last: its rename is the commit point
            folder / manifest_name: json.dumps(stored, indent=2, sort_keys=True) + "\n",
            workspace / names.BEST_FILE: json.dumps(best, indent=2, sort_keys=True) + "\n",
        }, remedy)
    except PipelineError:
        for path in added:  # new files that no record names: gone again, models/ as it was
            path.unlink(missing_ok=True)
        raise
    return (f"recorded {run_dir} for the champion ({best['model']}): {models}/{onnx_name}, "
            f"served {records.fmt_number(manifest['served_accuracy'])}%, max |logit "
            f"difference| {manifest['parity']['max_abs_logit_diff']:.3g}")


def has_export(workspace: Path, best: Mapping[str, Any]) -> bool:
    """best.json names an export whose stored ONNX file and manifest are still there."""
    export = best.get(EXPORT)
    if not isinstance(export, dict) or not _digest(export.get("onnx_sha256")):
        return False
    onnx_name, manifest_name, _ = stored_names(export["onnx_sha256"])
    if export.get("onnx") != f"{names.MODELS_DIR}/{onnx_name}":
        return False
    paths = [workspace / names.MODELS_DIR / name for name in (onnx_name, manifest_name)]
    return all(path.is_file() and not path.is_symlink() for path in paths)


def needs(workspace: Path) -> str:
    """`export COMMIT MODEL`, `exported` or `none` (see the module's text)."""
    best = promote.load_best(workspace)
    if best is None:
        return "none"
    if has_export(workspace, best):
        return "exported"
    commit = rescore.champion_commit(best)
    if commit is None:
        raise PipelineError(f"{workspace / names.BEST_FILE} names no full commit id whose code "
                            f"could export {best['model']}; promote a model trained by the "
                            "pipeline")
    return f"export {commit} {best['model']}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.parser("ct.exported", __doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    put = commands.add_parser("record", help="check an export and record it in best.json")
    put.add_argument("run_dir", help="the folder ct.trainer.export wrote (runs/export-...)")
    asks = commands.add_parser("needs", help="does the champion need an export? (for job7)")
    for sub in (put, asks):  # --workspace before or after the command: both spellings work
        sub.add_argument("--workspace", type=Path, default=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    workspace = cli.workspace_or_exit(parser, args.workspace)

    def action() -> int:
        if args.command == "record":
            print(f"ct.exported: {record(workspace, args.run_dir)}")
        else:
            print(needs(workspace))  # one word first: job7 reads it
        return 0

    return cli.run("ct.exported", action)


if __name__ == "__main__":
    raise SystemExit(main())
