"""Exported models in a workspace, laid out as `python3 -m ct.pipeline.exported record` leaves
them (models/champion-X.onnx, champion-X.json, champion-X-smoke.npz, X = the ONNX file's sha256[:16])
and serving/wanted.json as the deploy step writes it, for the serving tests.

The ONNX file is real: torch.onnx.export (TorchScript exporter, opset 17) of network.build_model({})
behind a uint8 -> logits wrapper (normalisation in the graph, as ct.trainer.export does), with
random weights spread out so that the classes are far apart (a tie would make the top-3 order
depend on the last bit). The manifest's smoke accuracy is what ONNX Runtime scores on the smoke
set, as the export records it.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]
SMOKE_IMAGES = 100
_EXPORTED: dict[int, bytes] = {}  # seed -> ONNX bytes: one torch export per seed per process


@dataclass(frozen=True)
class Champion:
    """One model in WS/models: its workspace-relative ONNX path, full sha256 and id (sha16)."""

    onnx: str
    sha256: str
    manifest: dict

    @property
    def id(self) -> str:
        return self.sha256[:16]


def onnx_bytes(seed: int) -> bytes:
    """The exported model for `seed` (the same bytes each time in one process)."""
    if seed not in _EXPORTED:
        _EXPORTED[seed] = _export(seed)
    return _EXPORTED[seed]


def _export(seed: int) -> bytes:
    import torch

    import network
    from ct.trainer.engine import MEAN, STD

    torch.manual_seed(seed)
    net = network.build_model({})
    with torch.no_grad():
        for name, param in net.named_parameters():
            if param.dim() > 1:  # spread the classes apart: an untrained head is near uniform
                param.mul_(3.0 if "head" not in name else 12.0)
    net.eval()

    class Served(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1) * 255)
            self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1) * 255)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.net((images.float() - self.mean) / self.std).float()

    buffer = io.BytesIO()
    torch.onnx.export(Served().eval(), (torch.zeros(2, 3, 32, 32, dtype=torch.uint8),), buffer,
                      input_names=["images"], output_names=["logits"], opset_version=17,
                      dynamic_axes={"images": {0: "N"}, "logits": {0: "N"}}, dynamo=False)
    return buffer.getvalue()


def smoke_set(seed: int, count: int = SMOKE_IMAGES) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random images (blocks of 8x8, so that a resize keeps them) and labels."""
    rng = np.random.default_rng(1000 + seed)
    blocks = rng.integers(0, 256, (count, 3, 4, 4), dtype=np.uint8)
    images = blocks.repeat(8, axis=2).repeat(8, axis=3)
    return np.ascontiguousarray(images), rng.integers(0, 10, count).astype(np.int64)


def logits(model: bytes, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": images})[0]


def write_champion(ws: Path, seed: int, accuracy_offset: float = 0.0,
                   commit: str = "") -> Champion:
    """Model `seed` recorded in ws/models; the manifest's smoke accuracy is ONNX Runtime's
    plus `accuracy_offset` (a wrong record, for a smoke test that must fail)."""
    model = onnx_bytes(seed)
    sha = hashlib.sha256(model).hexdigest()
    name = f"champion-{sha[:16]}"
    images, labels = smoke_set(seed)
    predicted = logits(model, images).argmax(1)
    # Most labels agree with the model, as a trained model's would with the truth.
    labels = np.where(np.arange(len(labels)) % 5 == 0, labels, predicted)
    accuracy = round(100.0 * float((predicted == labels).mean()), 4)
    models = ws / "models"
    models.mkdir(parents=True, exist_ok=True)
    (models / f"{name}.onnx").write_bytes(model)
    with open(models / f"{name}-smoke.npz", "wb") as handle:
        np.savez(handle, images=images, labels=labels)
    manifest = _manifest(seed, sha, f"{name}.onnx", f"{name}-smoke.npz",
                         accuracy + accuracy_offset, commit or f"{seed:040x}")
    (models / f"{name}.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return Champion(f"models/{name}.onnx", sha, manifest)


def _manifest(seed: int, sha: str, onnx: str, smoke: str, accuracy: float,
              commit: str) -> dict:
    return {
        "format": "ct-export/1", "model": f"models/best-{seed:04d}.pt",
        "model_sha256": hashlib.sha256(f"pt {seed}".encode()).hexdigest(),
        "onnx": onnx, "onnx_sha256": sha, "opset": 17,
        "input": {"name": "images", "dtype": "uint8", "shape": ["N", 3, 32, 32]},
        "output": {"name": "logits"}, "classes": CLASSES,
        "tta": {"mirror": False, "translate": False},
        "parity": {"images": SMOKE_IMAGES, "max_abs_logit_diff": 1e-6, "top1_agreement": 100.0,
                   "tolerance": 0.001},
        "served_accuracy": 80.0 + seed / 10, "torch_accuracy": 80.0 + seed / 10,
        "test_images": 10000, "test_version": f"test-{seed}", "data_version": f"data-{seed}",
        "smoke": {"file": smoke, "images": SMOKE_IMAGES, "accuracy": accuracy},
        "commit": commit, "exported_at": "2026-12-06T06:30:00Z",
        "versions": {"torch": "test", "onnxruntime": "test", "onnx": "test"},
    }


def want(ws: Path, champion: Champion, request: str | None = None) -> str:
    """Ask the service for `champion`, as the deploy step does: serving/wanted.json, written
    atomically, with a new request id (returned)."""
    from ct import atomic

    request = request or uuid.uuid4().hex
    atomic.write_json(ws / "serving" / "wanted.json",
                      {"request": request, "model": champion.onnx, "sha256": champion.sha256})
    return request


def write_best(ws: Path, champion: Champion) -> None:
    """best.json with the export recorded, as ct.pipeline.exported writes it (the fields that
    predict reads)."""
    from ct import atomic

    atomic.write_json(ws / "best.json", {
        "accuracy": champion.manifest["served_accuracy"],
        "export": {"onnx": champion.onnx, "onnx_sha256": champion.sha256,
                   "manifest": champion.onnx.removesuffix(".onnx") + ".json",
                   "served_accuracy": champion.manifest["served_accuracy"],
                   "parity": champion.manifest["parity"],
                   "exported_at": champion.manifest["exported_at"]}})
