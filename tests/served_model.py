"""Exported models in a workspace, laid out as `python3 -m ct.pipeline.exported record` leaves
them (models/champion-X.onnx, champion-X.json, champion-X-smoke.npz, X = the ONNX file's
sha256[:16]) and serving/wanted.json as the deploy step writes it, for the serving tests; and
the service itself, run for real (`running_service`).

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
import os
import socket
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent

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
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, and still ours
        warnings.simplefilter("ignore", DeprecationWarning)
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


# ---------------------------------------------------------------- the service, for real


@dataclass
class RunningService:
    url: str
    proc: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_service(ws: Path, env: dict[str, str] | None = None, wait_for_model: bool = True,
                    timeout: float = 60) -> Iterator[RunningService]:
    """`python -m ct.serving --workspace ws` on a free loopback port, in a subprocess of its
    own; yields once it answers /healthz (with a model unless `wait_for_model` is False)."""
    import httpx

    port = free_port()
    log = ws.parent / f"service-{port}.log"
    settings = {"OMP_NUM_THREADS": "1", "CT_SERVE_THREADS": "1", "CT_SERVE_POLL_S": "0.1",
                **(env or {})}
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CT_SERVE_")}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ct.serving", "--workspace", str(ws),
                                 "--port", str(port)], cwd=REPO, env={**environ, **settings},
                                stdout=out, stderr=subprocess.STDOUT)
    service = RunningService(f"http://127.0.0.1:{port}", proc, log)
    try:
        _wait_until_up(service, wait_for_model, timeout, httpx)
        yield service
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_until_up(service: RunningService, wait_for_model: bool, timeout: float,
                   httpx: Any) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            raise AssertionError(f"the service exited {service.proc.returncode}:\n"
                                 f"{service.log_text()}")
        try:
            reply = httpx.get(f"{service.url}/healthz", timeout=2)
            if reply.status_code == 200 or not wait_for_model:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"the service did not answer in {timeout} s:\n{service.log_text()}")


def wait_for_swap(url: str, request: str, timeout: float = 60) -> dict:
    """GET /model until its swap is `request`'s; that answer."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = httpx.get(f"{url}/model", timeout=5).json()
        if (answer.get("swap") or {}).get("request") == request:
            return answer
        time.sleep(0.05)
    raise AssertionError(f"no swap for request {request} in {timeout} s")
