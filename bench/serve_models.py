"""The served graphs of bench/serve_load.py: the export's variants (test-time augmentation views,
int8 by ONNX Runtime's quantization), their test accuracy and their cost per ONNX Runtime call,
and a workspace's models/ laid out as `ct.pipeline.exported record` leaves it for the service.

Not a module to run: bench/serve_load.py imports it (it needs torch for the export).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

VIEWS = {(False, False): 1, (True, False): 2, (False, True): 3, (True, True): 6}


@dataclass
class Variant:
    """One graph the benchmark serves: its file, how many forward passes an image costs, and
    its test accuracy (filled in by `score`)."""

    name: str
    path: Path
    views: int
    accuracy: float = float("nan")
    calibration_accuracy: float = float("nan")  # on the test images not used for calibration


def export_views(model_pt: Path, out: Path) -> tuple[list[Variant], dict[str, Any]]:
    """The model exported with the recipe's own TTA (ct.trainer.export's Served and
    write_onnx, as the pipeline does: the first, the export), then with fewer views; and the
    model's config. Each is named by its views: "fp32 mirror+shifts", "fp32 mirror", ...."""
    from ct.trainer.engine import make_compute
    from ct.trainer.evaluate import load_saved
    from ct.trainer.export import MIN_OPSET, Served, write_onnx

    compute = make_compute("cpu", "fp32")
    model, cfg = load_saved(model_pt, compute)
    model.eval()
    example = np.zeros((2, 3, 32, 32), dtype=np.uint8)
    recipe = (bool(cfg["tta"]), bool(cfg["tta_translate"]))
    variants = []
    for mirror, translate in dict.fromkeys([recipe, (True, False), (False, False)]):
        name = f"fp32 {_tta_name(mirror, translate)}"
        path = out / f"{name.replace(' ', '-').replace('+', '')}.onnx"
        served = Served(model, {**cfg, "tta": mirror, "tta_translate": translate}).eval()
        import torch

        write_onnx(served, torch.from_numpy(example), path, MIN_OPSET, lambda _line: None)
        variants.append(Variant(name, path, VIEWS[mirror, translate]))
    return variants, cfg


def _tta_name(mirror: bool, translate: bool) -> str:
    views = [v for v, on in (("mirror", mirror), ("shifts", translate)) if on]
    return "+".join(views) if views else "no TTA"


def quantize(fp32: Variant, calibration: np.ndarray, out: Path,
             dynamic: bool = False) -> list[Variant]:
    """int8 copies of `fp32`: static (QDQ, per-channel int8 weights, uint8 activations whose
    ranges come from `calibration`) and, with `dynamic`, dynamic (int8 weights; activation
    ranges computed in each call)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    stem, views = fp32.path.stem.removeprefix("fp32"), fp32.name.removeprefix("fp32")
    prepared = out / f"prepared{stem}.onnx"
    quant_pre_process(str(fp32.path), str(prepared))

    class Calibration(CalibrationDataReader):
        """The calibration images, 50 a call."""

        def __init__(self) -> None:
            self.batches = iter([calibration[i:i + 50] for i in range(0, len(calibration), 50)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    made = [Variant(f"int8 static{views}", out / f"int8-static{stem}.onnx", fp32.views)]
    root = logging.getLogger()
    level, _ = root.level, root.setLevel(logging.ERROR)  # its notes on each BatchNorm's axis
    try:
        quantize_static(str(prepared), str(made[0].path), Calibration(),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        if dynamic:
            made.append(Variant(f"int8 dynamic{views}", out / f"int8-dynamic{stem}.onnx",
                                fp32.views))
            quantize_dynamic(str(prepared), str(made[1].path), weight_type=QuantType.QUInt8)
    finally:
        root.setLevel(level)
    return made


def session(path: Path, threads: int) -> ort.InferenceSession:
    """A session set up as the service sets its own (ct.serving.model.Model)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def score(variant: Variant, images: np.ndarray, labels: np.ndarray, calibrated: int) -> None:
    """Test accuracy of `variant` on `images`, and on those past the first `calibrated`."""
    run = session(variant.path, 2)
    predicted = np.concatenate([run.run(None, {"images": images[i:i + 500]})[0].argmax(1)
                                for i in range(0, len(images), 500)])
    right = predicted == labels
    variant.accuracy = 100.0 * float(right.mean())
    variant.calibration_accuracy = 100.0 * float(right[calibrated:].mean())


def call_cost(path: Path, images: np.ndarray, batch: int, threads: int,
              seconds: float = 1.0) -> float:
    """Images per second of back-to-back ONNX Runtime calls of `batch` images."""
    run = session(path, threads)
    x = np.ascontiguousarray(images[:batch])
    run.run(None, {"images": x})
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 3:
        run.run(None, {"images": x})
        calls += 1
    return calls * batch / (time.perf_counter() - start)


def install(ws: Path, variant: Variant, manifest: dict[str, Any], smoke: Path,
            smoke_accuracy: float) -> tuple[str, str]:
    """`variant` in ws/models as ct.pipeline.exported record stores an export (champion-X.onnx,
    .json, -smoke.npz, X = sha256[:16]); returns (its workspace-relative name, full sha256)."""
    onnx = variant.path.read_bytes()
    sha = hashlib.sha256(onnx).hexdigest()
    name = f"champion-{sha[:16]}"
    models = ws / "models"
    models.mkdir(parents=True, exist_ok=True)
    (models / f"{name}.onnx").write_bytes(onnx)
    (models / f"{name}-smoke.npz").write_bytes(smoke.read_bytes())
    own = {**manifest, "onnx": f"{name}.onnx", "onnx_sha256": sha,
           "served_accuracy": round(variant.accuracy, 2),
           "smoke": {**manifest["smoke"], "file": f"{name}-smoke.npz",
                     "accuracy": round(smoke_accuracy, 2)}}
    (models / f"{name}.json").write_text(json.dumps(own, indent=1) + "\n")
    return f"models/{name}.onnx", sha


def smoke_accuracy(variant: Variant, smoke: Path) -> float:
    with np.load(smoke, allow_pickle=False) as saved:
        images, labels = saved["images"], saved["labels"]
    logits = session(variant.path, 2).run(None, {"images": images})[0]
    return 100.0 * float((logits.argmax(1) == labels).mean())


def tagged_copy(variant: Variant, out: Path) -> Variant:
    """The same graph in another file (its doc string differs): a second model to swap to
    whose answers and costs are the first's."""
    import onnx

    graph = onnx.load(str(variant.path))
    graph.doc_string = "bench/serve_load.py: a copy to swap to"
    path = out / f"{variant.path.stem}-copy.onnx"
    onnx.save(graph, str(path))
    return Variant(f"{variant.name} copy", path, variant.views, variant.accuracy,
                   variant.calibration_accuracy)
