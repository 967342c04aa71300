"""Export a saved model to ONNX for serving: the champion, before the host records it
(ct.pipeline.exported) and the service loads it (ct.serving).

    python -m ct.trainer.export MODEL --out WORKSPACE [--data-dir D] [--increments I]
                                [--views mirror|recipe|none] [--opset 17] [--tolerance 0.001]
                                [--parity-only]

Run with the code of the commit that trained MODEL (its network.py builds the model back), as
ct.trainer.evaluate is. The graph takes uint8 images (N, 3, 32, 32), RGB, NCHW, exactly the
training tensors' layout, as input "images" (N dynamic) and gives float32 "logits" (N, 10):
the normalisation and the test-time augmentation (mirror, shifts: the very functions of
ct.trainer.engine that a run's test uses) are in the graph, so a runtime only decodes and
resizes to 32x32. TorchScript exporter (dynamo=False), opset 17 or more.

--views picks the views served: `mirror` (the default) the recipe's test without its shifted
copies, `recipe` its whole test, `none` the image alone. Each view costs a forward pass: the
default recipe's whole test is 6 of them, and measured on 2 cores (docs/benchmarks.md, Serving)
its shifts bought 0.35 points for 3x the work, where the mirror alone answers within 20 ms at
concurrency 8. The manifest's tta and served_accuracy are those of the views served; the
recipe's own accuracy stays best.json's.

Before anything is written the export is checked with ONNX Runtime against torch (fp32, on the
CPU: the graph's number format) on the first 1,000 test images: the largest logit difference
must be within --tolerance and the top-1 classes must agree on at least 99.9 % of them. Then
both score the whole test set the data holds now (loaded and checked as a run loads it). What is
written, at once (a hidden folder renamed into place), is WORKSPACE/runs/export-<UTC time>-
<model sha256[:10]>/ with model.onnx, smoke.npz (the first 500 test images, uint8, and their
labels, int64) and export.json (the manifest: model and onnx sha256, input and output, classes,
test-time augmentation, the parity figures, served_accuracy (ONNX Runtime) and torch_accuracy on
that test set, the smoke set's accuracy, test and data version, commit, versions).

--parity-only scores the parity images only, in both runtimes, never the whole test set: for a
candidate that the pipeline then measures itself, with its own code and data (ct.serving.measure,
before promotion). Its manifest's served_accuracy and torch_accuracy are null, so
ct.pipeline.exported never records such an export as a champion's.

The LAST line on stdout is that folder relative to WORKSPACE (runs/export-...), for the job
script to hand to `python3 -m ct.pipeline.exported record`. Exit 0; 1: the export does not
match torch, or the exporter or ONNX Runtime failed (one line on stderr, nothing written);
2: bad input (a missing or corrupt model, bad data, a bad flag), one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from ct import atomic
from ct import workspace as names
from ct.trainer import evaluate
from ct.trainer.data import Cifar
from ct.trainer.engine import (
    Compute,
    evaluate_as_configured,
    make_compute,
    normalise,
)
from ct.trainer.errors import UsageError
from ct.trainer.evaluate import load_saved, model_digest
from ct.trainer.runs import Log, LogLine, RunOptions, Workspace, load_data, test_version
from ct.trainer.views import translated_logits, view_logits

KIND = "export"  # runs/export-<UTC time>-<model sha256[:10]>/
FORMAT = "ct-export/1"
ONNX_FILE, SMOKE_FILE, MANIFEST = "model.onnx", "smoke.npz", "export.json"
INPUT, OUTPUT = "images", "logits"
MIN_OPSET = 17  # what the serving runtime is tested with
MAX_OPSET = 20  # the TorchScript exporter's last opset, where torch does not say its own
PARITY_IMAGES = 1000
MIN_AGREEMENT = 99.9  # percent of the parity images whose top-1 class must agree
SMOKE_IMAGES = 500
ORT_BATCH = 500  # images per ONNX Runtime call when the whole test set is scored


class ExportError(Exception):
    """The export cannot be trusted or made (exit 1): the one line says why."""


class Served(nn.Module):
    """What the service computes: uint8 images in, out the logits of the test `cfg` describes
    (ct.trainer.engine.evaluate_as_configured's, view for view; served_config), fp32."""

    def __init__(self, model: nn.Module, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.mirror = bool(cfg["tta"])
        self.translate = bool(cfg["tta_translate"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        inputs = normalise(images)
        logits = view_logits(self.model, inputs, self.mirror)
        if self.translate:
            logits = translated_logits(self.model, inputs, logits, self.mirror)
        return logits


@dataclass
class Scores:
    """ONNX Runtime's logits for the whole test set and the checks against torch."""

    logits: np.ndarray  # (N, 10) float32
    parity: dict[str, Any]
    served_accuracy: float


VIEWS = ("mirror", "recipe", "none")


def served_config(cfg: dict[str, Any], views: str) -> dict[str, Any]:
    """The model's config with the test-time augmentation of the views served (--views)."""
    if views == "recipe":
        return cfg
    return {**cfg, "tta": views == "mirror" and bool(cfg["tta"]), "tta_translate": False}


def write_onnx(served: Served, example: torch.Tensor, path: Path, opset: int,
               log: LogLine) -> None:
    """Trace `served` into an ONNX file at `path`, its batch axis dynamic, and check it."""
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as said:
        # Expected (_expected): the legacy exporter announces its deprecation, normalise's
        # constants are traced as constants, and the constant folder leaves the mirror's
        # reversed slices alone. Any other note is logged; whatever the trace got wrong, the
        # parity check below finds.
        warnings.simplefilter("always")
        try:
            torch.onnx.export(served, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_axes={INPUT: {0: "N"}, OUTPUT: {0: "N"}})
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as exc:  # the exporter and the checker raise many types
            raise ExportError(f"the model cannot be exported to ONNX opset {opset} "
                              f"({one_line(exc)}); change network.py, or pass --opset") from exc
    notes = sorted({note for note in (one_line(w.message) for w in said) if not _expected(note)})
    for note in notes:
        log(f"exporter: {note[:200]}")
    log(f"exported {path.name} (opset {opset}, {path.stat().st_size / 1e6:.1f} MB) in "
        f"{time.perf_counter() - t0:.1f}s")


def _expected(note: str) -> bool:
    return ("legacy TorchScript-based ONNX export" in note or "will be removed" in note
            or "torch.tensor results are registered as constants" in note
            or "Constant folding - Only steps=1" in note)


def one_line(text: object) -> str:
    if isinstance(text, BaseException):
        text = f"{type(text).__name__}: {text}"
    return " ".join(str(text).split())[:300]


def ort_logits(path: Path, images: torch.Tensor, threads: int) -> np.ndarray:
    """ONNX Runtime's logits for uint8 `images`, ORT_BATCH images per call, on the CPU."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: its notes on graph rewrites are no news
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        batches = [session.run([OUTPUT], {INPUT: images[i:i + ORT_BATCH].numpy()})[0]
                   for i in range(0, len(images), ORT_BATCH)]
    except Exception as exc:  # onnxruntime's errors have no common base class
        raise ExportError(f"ONNX Runtime cannot run the exported model ({one_line(exc)})") \
            from exc
    return np.concatenate(batches).astype(np.float32, copy=False)


@torch.no_grad()
def torch_logits(served: Served, images: torch.Tensor, batch: int) -> np.ndarray:
    return torch.cat([served(images[i:i + batch]) for i in range(0, len(images), batch)]).numpy()


def score(path: Path, served: Served, test_x: torch.Tensor, test_y: torch.Tensor,
          tolerance: float, log: LogLine, whole: bool = True) -> Scores:
    """Run the exported graph on the whole test set (or, not `whole`, on the parity images
    only); ExportError when it does not match torch on the first PARITY_IMAGES test images."""
    t0 = time.perf_counter()
    if not whole:
        test_x, test_y = test_x[:PARITY_IMAGES], test_y[:PARITY_IMAGES]
    logits = ort_logits(path, test_x, torch.get_num_threads())
    seconds = time.perf_counter() - t0
    n = min(PARITY_IMAGES, len(test_x))
    reference = torch_logits(served, test_x[:n], 256)
    diff = float(np.abs(logits[:n] - reference).max())
    agreement = 100.0 * float((logits[:n].argmax(1) == reference.argmax(1)).mean())
    parity = {"images": n, "max_abs_logit_diff": diff, "top1_agreement": round(agreement, 2),
              "tolerance": tolerance}
    log(f"parity on {n} test images: max |logit difference| {diff:.3g} (tolerance "
        f"{tolerance:g}), top-1 agreement {agreement:.2f}%")
    if not diff <= tolerance or agreement < MIN_AGREEMENT:  # `not <=`: a NaN fails too
        raise ExportError(f"the ONNX graph does not match torch on {n} test images: max |logit "
                          f"difference| {diff:.3g} (tolerance {tolerance:g}), top-1 agreement "
                          f"{agreement:.2f}% (at least {MIN_AGREEMENT}% needed); nothing "
                          "written; look in network.py's forward for what a trace cannot "
                          "follow (a number read out of a tensor, a branch on the data)")
    accuracy = 100.0 * float((logits.argmax(1) == test_y.numpy()).mean())
    log(f"ONNX Runtime: {accuracy:.2f}% on {len(test_x)} test images ({seconds:.1f}s)"
        + ("" if whole else ": the parity images only (--parity-only)"))
    return Scores(logits, parity, accuracy)


def write_smoke(path: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    with open(path, "wb") as handle:  # a handle: np.savez would append .npz to a name
        np.savez(handle, images=images.numpy().astype(np.uint8),
                 labels=labels.numpy().astype(np.int64))


def manifest(ws: Workspace, path: Path, sha256: str, onnx_path: Path, opset: int,
             cfg: dict[str, Any], scores: Scores, torch_accuracy: float | None, data: Cifar
             ) -> dict[str, Any]:
    """export.json (the fields ct.pipeline.exported checks and the service reads); with
    torch_accuracy None (--parity-only) neither accuracy is known."""
    shown = path.resolve()
    smoke = min(SMOKE_IMAGES, len(data.test_y))
    smoke_right = scores.logits[:smoke].argmax(1) == data.test_y[:smoke].numpy()
    return {
        "format": FORMAT,
        "model": (shown.relative_to(ws.root).as_posix() if shown.is_relative_to(ws.root)
                  else str(shown)),
        "model_sha256": sha256, "onnx": ONNX_FILE, "onnx_sha256": names.hash_files([onnx_path]),
        "opset": opset,
        "input": {"name": INPUT, "dtype": "uint8", "shape": ["N", 3, 32, 32]},
        "output": {"name": OUTPUT},
        "classes": list(data.classes),
        "tta": {"mirror": bool(cfg["tta"]), "translate": bool(cfg["tta_translate"])},
        "parity": scores.parity,
        "served_accuracy": None if torch_accuracy is None else round(scores.served_accuracy, 2),
        "torch_accuracy": None if torch_accuracy is None else round(torch_accuracy, 2),
        "test_images": len(data.test_y), "test_version": test_version(data),
        "data_version": data.version,
        "smoke": {"file": SMOKE_FILE, "images": smoke,
                  "accuracy": round(100.0 * float(smoke_right.mean()), 2)},
        "commit": ws.commit(),
        "exported_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__,
                     "onnx": onnx.__version__},
    }


def export_model(path: Path, ws: Workspace, opts: RunOptions, opset: int, tolerance: float,
                 log: LogLine, views: str = "mirror", whole: bool = True) -> Path:
    """Export the model at `path`, check it, and write its run folder; returns that folder.
    The model is checked before the data is read: a bad model costs nothing. Not `whole`
    (--parity-only): no score on the whole test set."""
    sha256 = model_digest(path)
    compute = make_compute("cpu", "fp32")  # the graph computes in fp32 on any runtime
    model, recipe = load_saved(path, compute)
    model.eval()
    cfg = served_config(recipe, views)
    log(f"views served: {views} (mirror {cfg['tta']}, shifts {cfg['tta_translate']})")
    served = Served(model, cfg).eval()
    data = load_data(opts, ws, log)
    staging = Path(tempfile.mkdtemp(prefix=f".{KIND}-", suffix=".tmp", dir=ws.runs))
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's is private; a run folder is not
    try:
        onnx_path = staging / ONNX_FILE
        write_onnx(served, data.test_x[:2], onnx_path, opset, log)
        scores = score(onnx_path, served, data.test_x, data.test_y, tolerance, log, whole)
        torch_accuracy = torch_score(model, data, compute, cfg, scores, log) if whole else None
        smoke = min(SMOKE_IMAGES, len(data.test_x))
        write_smoke(staging / SMOKE_FILE, data.test_x[:smoke], data.test_y[:smoke])
        summary = manifest(ws, path, sha256, onnx_path, opset, cfg, scores, torch_accuracy, data)
        for name in (ONNX_FILE, SMOKE_FILE):
            _fsync(staging / name)
        atomic.write_json(staging / MANIFEST, summary)
        run_dir = ws.new_run_dir(KIND, sha256[:10])  # only now: a failed export leaves nothing
        os.replace(staging, run_dir)  # onto the empty folder: the whole export at once
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after the rename
    figures = ("not scored (--parity-only)" if torch_accuracy is None else
               f"served {summary['served_accuracy']:.2f}%, torch {summary['torch_accuracy']:.2f}%")
    log(f"{path.name} (sha256 {sha256[:16]}) -> {run_dir.relative_to(ws.root).as_posix()}/"
        f"{ONNX_FILE} (onnx sha256 {summary['onnx_sha256'][:16]}): {figures}, smoke set "
        f"{summary['smoke']['accuracy']:.2f}% on {smoke} images")
    return run_dir


def torch_score(model: nn.Module, data: Cifar, compute: Compute, cfg: dict[str, Any],
                scores: Scores, log: LogLine) -> float:
    """torch's accuracy on the whole test set, the views served (and how often its classes
    agree with ONNX Runtime's)."""
    t0 = time.perf_counter()
    predicted: list[torch.Tensor] = []
    accuracy, _ = evaluate_as_configured(model, data.test_x, data.test_y, compute, cfg,
                                         predictions=predicted)
    same = 100.0 * float((torch.cat(predicted).numpy() == scores.logits.argmax(1)).mean())
    log(f"torch (fp32, cpu): {accuracy:.2f}% on the same test set "
        f"({time.perf_counter() - t0:.1f}s); the classes agree on {same:.2f}% of it")
    return float(accuracy)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


PROG = "ct.trainer.export"


def fail(message: str, status: int = 2) -> NoReturn:
    evaluate.fail(PROG, message, status)


def _parser() -> argparse.ArgumentParser:
    parser = evaluate.model_parser(PROG, __doc__, "export", "the export")
    parser.add_argument("--views", choices=VIEWS, default="mirror",
                        help="test-time views served: mirror (default: the recipe's without its "
                             "shifts), recipe (all of them), none")
    parser.add_argument("--opset", type=int, default=MIN_OPSET,
                        help=f"ONNX opset, {MIN_OPSET} or more (default: {MIN_OPSET})")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="the largest logit difference from torch accepted (default: 0.001)")
    parser.add_argument("--parity-only", action="store_true",
                        help="score the parity images only, never the whole test set (a "
                             "candidate the pipeline measures itself; not recordable)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    top = getattr(getattr(torch.onnx, "_constants", None),  # the exporter's own limit
                  "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", MAX_OPSET)
    if not MIN_OPSET <= args.opset <= top:
        fail(f"--opset {args.opset}: the exporter writes opsets {MIN_OPSET} to {top}")
    if not args.tolerance >= 0:
        fail(f"--tolerance {args.tolerance}: give a logit difference of 0 or more")
    try:
        ws = evaluate.open_workspace(args.out)
        opts = RunOptions(data_dir=args.data_dir, increments=args.increments)
        run_dir = export_model(args.model, ws, opts, args.opset, args.tolerance, Log(),
                               args.views, whole=not args.parity_only)
    except UsageError as exc:
        fail(str(exc))
    except ExportError as exc:
        fail(str(exc), status=1)
    print(run_dir.relative_to(ws.root).as_posix(), flush=True)  # the last line: the job's input
    return 0


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    os._exit(status)  # as train.py: every file is written; skip torch's slow teardown
