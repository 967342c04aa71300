"""An exported champion in ONNX Runtime: load it with its manifest (docs/serving.md), predict
class probabilities for uint8 (N, 3, 32, 32) images, and smoke-test it before it serves.

Where the files come from: the service reads names from serving/wanted.json, which the host
writes but which names files a container could have written, so a name resolves only to a plain
file in WS/models (models/champion-X.onnx, X = its sha256[:16]), never through a symbolic link,
and the bytes read are the bytes hashed and checked (no second open between check and use).
`python -m ct.serving.predict` may also name an ONNX file anywhere, beside its manifest.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ct.serving import files

CHAMPION = re.compile(r"champion-([0-9a-f]{16})\.onnx")
MAX_MODEL_BYTES = 1 << 30
MAX_MANIFEST_BYTES = 1 << 20
MAX_SMOKE_BYTES = 256 << 20
SMOKE_TOLERANCE = 1.0  # points of accuracy between the export's smoke score and ours
LATENCY_CALLS = 50


class ModelError(Exception):
    """The model cannot be loaded or is not the one asked for; str() is one line."""


@dataclass(frozen=True)
class Smoke:
    """The smoke test's outcome, as GET /model shows it (plus ok and reason)."""

    images: int
    accuracy: float
    expected: float
    p50_ms: float
    p99_ms: float
    ok: bool
    reason: str

    def record(self) -> dict[str, Any]:
        return {"images": self.images, "accuracy": self.accuracy, "expected": self.expected,
                "p50_ms": self.p50_ms, "p99_ms": self.p99_ms}


class Model:
    """One loaded model: an ONNX Runtime session and what its manifest says about it."""

    def __init__(self, onnx: bytes, sha256: str, manifest: dict[str, Any], smoke_file: Path,
                 threads: int) -> None:
        import onnxruntime as ort

        self.sha256, self.id, self.manifest = sha256, sha256[:16], manifest
        self.name = f"models/champion-{self.id}.onnx"  # as serving/wanted.json names it
        self.classes: list[str] = list(manifest["classes"])
        self.smoke_file = smoke_file
        self.smoke: Smoke | None = None
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        # Idle ONNX Runtime threads spin by default; a service shares its cores with the event
        # loop and the decoders, which spinning threads would starve.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(onnx, options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph... types
            raise ModelError(f"ONNX Runtime cannot load champion {self.id}: "
                             f"{' '.join(str(exc).split())[:300]}") from exc
        self.input_name, self.output_name = _check_signature(self.session, manifest, self.id)
        self.loaded_at = utc_now()

    def logits(self, images: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: images})[0]

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Softmax of the logits, per image (float64, so rows sum to 1 to the last digit)."""
        logits = self.logits(images).astype(np.float64)
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)

    def info(self) -> dict[str, Any]:
        """What GET /model says about this model."""
        m = self.manifest
        return {"id": self.id, "sha256": self.sha256, "commit": m.get("commit"),
                "data_version": m.get("data_version"), "accuracy": m.get("served_accuracy"),
                "exported_at": m.get("exported_at"), "classes": self.classes,
                "loaded_at": self.loaded_at}


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def prediction(row: np.ndarray, classes: list[str], k: int = 3) -> dict[str, Any]:
    """One image's answer: the top class, its probability, and the top k (rounded to 6
    places, the same in predict's output and the service's)."""
    order = np.argsort(-row, kind="stable")[:k]
    top = [{"class": classes[i], "probability": round(float(row[i]), 6)} for i in order]
    return {"class": top[0]["class"], "probability": top[0]["probability"], "top3": top}


# ---------------------------------------------------------------- loading


def load_champion(workspace: Path, name: str, sha256: str | None, threads: int) -> Model:
    """models/champion-X.onnx of the workspace (the only folder names resolve in), checked
    against `sha256` when given and against its manifest models/champion-X.json always."""
    try:
        return _load_champion(workspace, name, sha256, threads)
    except files.UnsafeFile as exc:
        raise ModelError(f"{exc}; the service reads plain files in WS/models only") from exc


def _load_champion(workspace: Path, name: str, sha256: str | None, threads: int) -> Model:
    base = files.plain_name(name, prefix="models/")
    match = CHAMPION.fullmatch(base)
    if match is None:
        raise ModelError(f"{name!r} is not models/champion-<16 hex>.onnx; deploy names the "
                         "files that ct.pipeline.exported recorded")
    models = files.models_dir(workspace)
    onnx = files.read_plain(models / base, MAX_MODEL_BYTES)
    digest = hashlib.sha256(onnx).hexdigest()
    if sha256 is not None and digest != sha256:
        raise ModelError(f"{name} has sha256 {digest[:16]}..., not the {sha256[:16]}... asked "
                         "for; record the export again")
    if digest[:16] != match.group(1):
        raise ModelError(f"{name} has sha256 {digest[:16]}..., not the one its name says; "
                         "record the export again")
    manifest_path = models / base.replace(".onnx", ".json")
    manifest = read_manifest(manifest_path)
    return _model(onnx, digest, manifest, manifest_path, threads, models_only=True)


def load_file(onnx_path: Path, threads: int) -> Model:
    """An ONNX file named on the command line, with its manifest beside it: the same name
    with .json (models/champion-X.json), else export.json (an export's run folder)."""
    try:
        return _load_file(onnx_path, threads)
    except files.UnsafeFile as exc:
        raise ModelError(str(exc)) from exc


def _load_file(onnx_path: Path, threads: int) -> Model:
    manifest_path = onnx_path.with_suffix(".json")
    if not manifest_path.is_file() and (onnx_path.parent / "export.json").is_file():
        manifest_path = onnx_path.parent / "export.json"
    onnx = files.read_plain(onnx_path, MAX_MODEL_BYTES)
    manifest = read_manifest(manifest_path)
    return _model(onnx, hashlib.sha256(onnx).hexdigest(), manifest, manifest_path, threads,
                  models_only=False)


def read_manifest(path: Path) -> dict[str, Any]:
    raw = files.read_plain(path, MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path} is not JSON ({exc}); record the export again") from exc
    _check_manifest(manifest, path)
    return manifest


def _check_manifest(manifest: Any, path: Path) -> None:
    if not isinstance(manifest, dict):
        raise ModelError(f"{path} is not a JSON object; record the export again")
    classes, smoke = manifest.get("classes"), manifest.get("smoke")
    problems = []
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        problems.append("classes is not a list of names")
    if not (isinstance(smoke, dict) and isinstance(smoke.get("file"), str)
            and _is_number(smoke.get("accuracy"))):
        problems.append("smoke has no file and accuracy")
    if not isinstance(manifest.get("onnx_sha256"), str):
        problems.append("onnx_sha256 is missing")
    for field in ("input", "output"):
        if not isinstance((manifest.get(field) or {}).get("name"), str):
            problems.append(f"{field}.name is missing")
    if problems:
        raise ModelError(f"{path} is not an export manifest ({'; '.join(problems)}); record "
                         "the export again")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _model(onnx: bytes, digest: str, manifest: dict[str, Any], manifest_path: Path,
           threads: int, models_only: bool) -> Model:
    if manifest["onnx_sha256"] != digest:
        raise ModelError(f"{manifest_path} describes ONNX sha256 {manifest['onnx_sha256'][:16]}"
                         f"..., not this file's {digest[:16]}...; record the export again")
    smoke_name = manifest["smoke"]["file"]
    smoke = (manifest_path.parent / files.plain_name(smoke_name, prefix="models/")
             if models_only else manifest_path.parent / smoke_name)
    return Model(onnx, digest, manifest, smoke, threads)


def _check_signature(session: Any, manifest: dict[str, Any], model_id: str) -> tuple[str, str]:
    """The graph takes uint8 (N, 3, 32, 32) under the manifest's input name and gives one
    logit per class under its output name."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    name_in, name_out = manifest["input"]["name"], manifest["output"]["name"]
    if name_in not in inputs or name_out not in outputs:
        raise ModelError(f"champion {model_id} has inputs {sorted(inputs)} and outputs "
                         f"{sorted(outputs)}, not the manifest's {name_in!r} -> {name_out!r}")
    shape, kind = inputs[name_in].shape, inputs[name_in].type
    if kind != "tensor(uint8)" or list(shape[1:]) != [3, 32, 32]:
        raise ModelError(f"champion {model_id} takes {kind} {shape}, not uint8 (N, 3, 32, 32)")
    width = outputs[name_out].shape[-1]
    if isinstance(width, int) and width != len(manifest["classes"]):
        raise ModelError(f"champion {model_id} gives {width} logits for "
                         f"{len(manifest['classes'])} classes")
    return name_in, name_out


# ---------------------------------------------------------------- smoke test


def smoke_test(model: Model, p99_limit_ms: float) -> Smoke:
    """The manifest's smoke set scored here (within SMOKE_TOLERANCE points of the export's
    score: the same graph on another runtime build or machine) and the single-image latency
    over LATENCY_CALLS calls (p99 within `p99_limit_ms`)."""
    images, labels = _smoke_arrays(model.smoke_file)
    expected = float(model.manifest["smoke"]["accuracy"])
    predicted = np.concatenate([model.logits(images[i:i + 256]).argmax(axis=1)
                                for i in range(0, len(images), 256)])
    accuracy = round(100.0 * float((predicted == labels).mean()), 4)
    times = []
    for call in range(LATENCY_CALLS + 5):
        one = images[call % len(images)][None]
        start = time.perf_counter()
        model.logits(one)
        if call >= 5:  # the first calls allocate: warm-up, not what a request sees
            times.append((time.perf_counter() - start) * 1000)
    p50, p99 = (round(float(np.percentile(times, q)), 3) for q in (50, 99))
    reasons = []
    if abs(accuracy - expected) > SMOKE_TOLERANCE:
        reasons.append(f"smoke accuracy {accuracy:.2f}% on {len(labels)} images is not within "
                       f"{SMOKE_TOLERANCE} point of the export's {expected:.2f}%")
    if p99 > p99_limit_ms:
        reasons.append(f"single-image p99 latency {p99:.1f} ms is over {p99_limit_ms:g} ms "
                       "(CT_SERVE_SMOKE_P99_MS)")
    reason = "; ".join(reasons) or (f"smoke test passed: {accuracy:.2f}% (export "
                                    f"{expected:.2f}%), p99 {p99:.2f} ms")
    return Smoke(len(labels), accuracy, expected, p50, p99, not reasons, reason)


def _smoke_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import io
    import zipfile

    try:
        raw = files.read_plain(path, MAX_SMOKE_BYTES)
        with np.load(io.BytesIO(raw), allow_pickle=False) as saved:
            images, labels = saved["images"], saved["labels"]
    except files.UnsafeFile as exc:
        raise ModelError(str(exc)) from exc
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise ModelError(f"{path} is not a smoke set ({type(exc).__name__}: {exc})") from exc
    if (images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (3, 32, 32)
            or labels.shape != (len(images),) or not len(images)):
        raise ModelError(f"{path} holds {images.dtype} {images.shape} and {labels.shape} "
                         "labels, not uint8 (S, 3, 32, 32) and S labels")
    return np.ascontiguousarray(images), labels.astype(np.int64)

