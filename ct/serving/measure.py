"""The pipeline's own measurement of a candidate model: its ONNX export scored by ONNX Runtime
on the CIFAR-10 test set the pipeline configured. No torch, and nothing of the pushed code runs:
the model is a data file (an ONNX graph from bytes, so no external-data path is followed), the
test set is read by ct.serving.cifar_test (a restricted unpickler), and this code is the
pipeline's (the serving image, or the host's Python for the local runtime).

    python -m ct.serving.measure MODEL.onnx --data DATA_DIR_OR_ARCHIVE [--official]
                                 [--increments DIR] [--root DIR] [--expect-images N]

The test set is CIFAR-10's (--official: only the archive with the official download's md5)
plus, with --increments, the increments' test images, decoded as the trainer decodes them
(ct.images); its identity, test_version, is computed here as the trainer's (ct.data_version), so
the host can tell whether a run claims a score on the same test set. With --root, MODEL must be
inside it and no link below it is followed.

Prints one JSON line: {"format", "accuracy" (percent, 4 places), "correct", "images",
"increment_images", "onnx_sha256", "test_version", "data" (the folder or archive read),
"threads", "seconds"}. The graph takes uint8 (N, 3, 32, 32) "images" and gives (N, 10)
"logits", as ct.trainer.export writes it; ONNX Runtime uses ct.cpu_budget.threads() threads
(CT_THREADS, else the usable cores). Exit 0; 2: the model or the data cannot be used (one line
on stderr: what and why); 1: ONNX Runtime failed while it ran the graph.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ct import cpu_budget, data_version, images, untrusted
from ct.serving.cifar_test import (
    NUM_CLASSES,
    OFFICIAL_MD5,
    TestSet,
    TestSetError,
    read_test_set,
)
from ct.serving.model import MAX_MODEL_BYTES, ModelError, _check_signature

FORMAT = "ct-measure/1"
INPUT, OUTPUT = "images", "logits"  # ct.trainer.export's names
BATCH = 500  # images per ONNX Runtime call
PROG = "ct.serving.measure"


class MeasureError(Exception):
    """The measurement cannot be made; str() is one line. `status` is the exit status."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def load_session(onnx: bytes, threads: int) -> Any:
    """An ONNX Runtime session for the graph's bytes, its signature checked."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    try:
        session = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's errors have no common base class
        raise MeasureError(f"ONNX Runtime cannot load the model ({_one_line(exc)})") from None
    wanted = {"input": {"name": INPUT}, "output": {"name": OUTPUT},
              "classes": [str(i) for i in range(NUM_CLASSES)]}
    try:
        _check_signature(session, wanted, hashlib.sha256(onnx).hexdigest()[:16])
    except ModelError as exc:
        raise MeasureError(str(exc)) from None
    return session


def predictions(session: Any, images: np.ndarray) -> np.ndarray:
    """The top-1 class of each image, BATCH images per call."""
    out = [np.zeros(0, np.int64)]
    try:
        for start in range(0, len(images), BATCH):
            logits = session.run([OUTPUT], {INPUT: images[start:start + BATCH]})[0]
            if logits.shape != (min(BATCH, len(images) - start), NUM_CLASSES):
                raise MeasureError(f"the model gave logits of shape {logits.shape} for "
                                   f"{min(BATCH, len(images) - start)} images, not "
                                   f"(N, {NUM_CLASSES})")
            out.append(np.asarray(logits).argmax(axis=1))
    except MeasureError:
        raise
    except Exception as exc:
        raise MeasureError(f"ONNX Runtime failed while scoring ({_one_line(exc)})", 1) from None
    return np.concatenate(out)


def increment_tests(base_sha256: str, folder: Path | None
                    ) -> tuple[np.ndarray, np.ndarray, str]:
    """The increments' test images in `folder` (uint8 (M, 3, 32, 32)), their labels, and the
    test version of the base plus them (ct.data_version.test_version, as a run records it)."""
    none = np.zeros((0, 3, 32, 32), np.uint8), np.zeros(0, np.int64)
    if folder is None:
        return *none, data_version.version_of(base_sha256, [])
    try:
        version = data_version.compute(folder, folder, base=base_sha256)
    except (data_version.DataVersionError, OSError) as exc:
        raise MeasureError(f"the increments: {exc}") from None
    tests = [image for image in version.images if image.split == "test"]
    try:
        pixels = [images.decode(image.path) for image in tests]
    except images.ImageError as exc:
        raise MeasureError(f"the increments: {exc}") from None
    if not tests:
        return *none, data_version.test_version(version)
    return (np.stack(pixels), np.array([image.label for image in tests], np.int64),
            data_version.test_version(version))


def measure(model: Path, data: Path, md5: str | None = None, expect: int | None = None,
            threads: int | None = None, increments: Path | None = None,
            root: Path | None = None) -> dict[str, Any]:
    """Score the ONNX graph at `model` on the test set in `data` (and the increments' test
    images): the JSON line's fields. The model is read as a file anyone could have written: a
    regular file, no link followed (none below `root` when given)."""
    t0 = time.perf_counter()
    try:
        onnx = untrusted.read_bytes(model, MAX_MODEL_BYTES, root=root)
    except untrusted.UntrustedFile as exc:
        raise MeasureError(f"the model: {exc}") from None
    try:
        test: TestSet = read_test_set(data, expect=expect, md5=md5)
    except TestSetError as exc:
        raise MeasureError(f"the test set: {exc}") from None
    added_x, added_y, test_version = increment_tests(test.base_sha256, increments)
    threads = threads or cpu_budget.threads()
    session = load_session(onnx, threads)
    labels = np.concatenate([test.labels, added_y])
    predicted = np.concatenate([predictions(session, test.images), predictions(session, added_x)])
    correct = int((predicted == labels).sum())
    return {"format": FORMAT, "accuracy": round(100.0 * correct / len(labels), 4),
            "correct": correct, "images": len(labels), "increment_images": len(added_y),
            "onnx_sha256": hashlib.sha256(onnx).hexdigest(), "test_version": test_version,
            "data": str(test.source), "threads": threads,
            "seconds": round(time.perf_counter() - t0, 2)}


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="the ONNX file (ct.trainer.export's model.onnx)")
    parser.add_argument("--data", type=Path, required=True,
                        help="cifar-10-batches-py/, cifar-10-python.tar.gz or a folder with one")
    parser.add_argument("--official", action="store_true",
                        help="accept only the archive with the official download's md5")
    parser.add_argument("--increments", type=Path, default=None,
                        help="the increments folder: its test images join the test set")
    parser.add_argument("--root", type=Path, default=None,
                        help="MODEL lies inside this folder; no link below it is followed")
    parser.add_argument("--expect-images", type=int, default=None, metavar="N",
                        help="CIFAR-10's test batch must hold N images")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = measure(args.model, args.data, OFFICIAL_MD5 if args.official else None,
                         args.expect_images, increments=args.increments, root=args.root)
    except (MeasureError, cpu_budget.BudgetError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return getattr(exc, "status", 2)
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
