"""Classify image files with an exported champion, as the service would answer for them.

    python -m ct.serving.predict [--model WS | WS/best.json | champion-X.onnx] FILE_OR_DIR...

--model names a workspace (its best.json's recorded export), a best.json, or an ONNX file
beside its manifest (champion-X.json, or an export run's export.json); default: the workspace in
CT_WORKSPACE, else the current folder. Folders are walked for .png, .jpg and .jpeg files, taken
in the order of their paths; a file named on the command line is read whatever its name.

Prints one JSON line per image: {"file", "class", "probability", "top3", "model"}, or
{"file", "error"} for a file that is not a readable PNG or JPEG image; every file gets its line,
and the run ends with exit 2 when any failed. The decoding (ct.images with the service's limits)
and the numbers are the service's, so both answer the same for the same file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ct import images
from ct.serving import files, settings
from ct.serving.model import Model, ModelError, load_champion, load_file, prediction

SUFFIXES = (".png", ".jpg", ".jpeg")
CHUNK = 64  # images per ONNX Runtime call
MAX_BEST_JSON = 16 << 20


class UsageError(Exception):
    """The command line or the model it names cannot be used; str() is one line."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ct.serving.predict", description=(
        "Classify PNG/JPEG files with an exported champion: one JSON line per image."))
    parser.add_argument("--model", type=Path, default=None,
                        help="a workspace, its best.json, or champion-X.onnx beside its manifest "
                             "(default: $CT_WORKSPACE, else the current folder)")
    parser.add_argument("paths", nargs="+", type=Path, metavar="FILE_OR_DIR")
    args = parser.parse_args(argv)
    try:
        config = settings.from_environment()
        model = open_model(args.model or Path(os.environ.get("CT_WORKSPACE") or "."),
                           config.onnx_threads)
    except (UsageError, ModelError, settings.SettingError) as exc:
        print(f"predict: error: {exc}", file=sys.stderr)
        return 2
    limits = images.Limits(formats=images.SERVING.formats, max_pixels=config.max_pixels)
    failed = 0
    for line in answers(model, walk(args.paths), limits):
        failed += "error" in line
        print(json.dumps(line), flush=True)
    return 2 if failed else 0


def open_model(given: Path, threads: int) -> Model:
    """The model `given` names: a workspace, a best.json, or an ONNX file."""
    if given.is_dir():
        return _from_best(given / "best.json", threads)
    if given.suffix == ".json":
        return _from_best(given, threads)
    if given.suffix == ".onnx":
        return load_file(given, threads)
    raise UsageError(f"--model {given} is neither a workspace, a best.json nor an .onnx file")


def _from_best(best: Path, threads: int) -> Model:
    try:
        record = json.loads(files.read_plain(best, MAX_BEST_JSON))
    except (files.UnsafeFile, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read {best}: {exc}") from exc
    export = record.get("export") if isinstance(record, dict) else None
    if not (isinstance(export, dict) and isinstance(export.get("onnx"), str)):
        raise UsageError(f"{best} records no export of its model; export it first "
                         "(python -m ct.trainer.export, then ct.pipeline.exported record)")
    sha = export.get("onnx_sha256")
    return load_champion(best.parent, export["onnx"], sha if isinstance(sha, str) else None,
                         threads)


def walk(paths: Sequence[Path]) -> Iterator[Path]:
    """The files to classify: each file given, and the images under each folder, sorted."""
    for path in paths:
        if not path.is_dir():
            yield path
            continue
        found = [Path(root) / name for root, _, names in os.walk(path) for name in names
                 if name.lower().endswith(SUFFIXES)]
        yield from sorted(found, key=lambda p: p.relative_to(path).parts)


def answers(model: Model, paths: Iterator[Path], limits: images.Limits
            ) -> Iterator[dict[str, Any]]:
    """One line per path, in order; the images of CHUNK paths go through one ONNX call."""
    while True:
        chunk = [path for _, path in zip(range(CHUNK), paths, strict=False)]
        if not chunk:
            return
        decoded: list[np.ndarray | str] = [_decode(path, limits) for path in chunk]
        good = [d for d in decoded if not isinstance(d, str)]
        rows = iter(model.probabilities(np.stack(good)) if good else [])
        for path, image in zip(chunk, decoded, strict=True):
            if isinstance(image, str):
                yield {"file": str(path), "error": image}
            else:
                yield {"file": str(path), **prediction(next(rows), model.classes),
                       "model": model.id}


def _decode(path: Path, limits: images.Limits) -> np.ndarray | str:
    """The image, or the one-line reason it cannot be read."""
    try:
        return images.decode(path, limits)
    except images.ImageError as exc:
        return str(exc)
    except OSError as exc:  # a folder that vanished, a file we may not read
        return f"cannot read: {exc.strerror}"


if __name__ == "__main__":
    sys.exit(main())
