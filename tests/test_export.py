"""python -m ct.trainer.export: a model really trained (train.py, a few epochs on the synthetic
CIFAR-10) exported to ONNX, checked against torch by ONNX Runtime, its manifest's figures
recomputed here; a trace that cannot match torch, a bad model and bad flags write nothing."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import train
from ct.trainer import export
from ct.trainer.data import load_cifar
from ct.trainer.engine import (
    evaluate_as_configured,
    make_compute,
    normalise,
)
from ct.trainer.state import load_model
from ct.trainer.views import translated_logits, view_logits
from tests.conftest import REPO
from tests.synthetic_cifar import make_cifar

TEST_IMAGES = 1200  # more than the parity check's 1,000 and the smoke set's 500
# A model that learns the synthetic classes in seconds (the default recipe's levers, small).
TINY = ["--epochs", "2", "--batch-size", "64", "--block-widths", "16,32,32", "--seed", "1"]


def make_data(root: Path) -> Path:
    return make_cifar(root, per_batch=200, test=TEST_IMAGES)


def train_model(ws: Path, data: Path, *flags: str) -> Path:
    """Train for real into `ws` (train.py in this process); the run's model.pt."""
    status = train.main(["--out", str(ws), "--data-dir", str(data), *TINY, *flags])
    assert status == 0
    metrics = json.loads((ws / "metrics.json").read_text())
    return ws / metrics["model"]


def run_export(ws: Path, model: Path, data: Path, *flags: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `python -m ct.trainer.export` in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = export.main([str(model), "--out", str(ws), "--data-dir", str(data),
                                  *flags])
        except SystemExit as exc:
            status = int(exc.code or 0)
    return status, out.getvalue(), err.getvalue()


def exported(ws: Path, model: Path, data: Path, views: str = "recipe") -> Path:
    """Export `model` (the recipe's whole test, unless `views` says otherwise); the run folder
    it printed last."""
    status, out, err = run_export(ws, model, data, "--views", views)
    assert status == 0, err
    return ws / out.splitlines()[-1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("export-data"))


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory, data: Path) -> tuple[Path, Path]:
    """A workspace and its model trained for real, tested on each image and its mirror."""
    ws = tmp_path_factory.mktemp("ws-mirror")
    return ws, train_model(ws, data, "--tta-translate", "no")


@pytest.fixture(scope="module")
def shifts(tmp_path_factory: pytest.TempPathFactory, data: Path) -> tuple[Path, Path]:
    """The same with the default recipe's whole test: mirror and two shifted copies."""
    ws = tmp_path_factory.mktemp("ws-shifts")
    return ws, train_model(ws, data, "--tta-translate", "yes")


Export = tuple[Path, dict[str, Any]]  # the run folder and its export.json


@pytest.fixture(scope="module")
def export_of(request: pytest.FixtureRequest, data: Path) -> Callable[[str], Export]:
    """The export of the model of fixture `name` (mirror, shifts), made once per module."""
    made: dict[str, Export] = {}

    def export(name: str) -> Export:
        if name not in made:
            ws, model = request.getfixturevalue(name)
            run_dir = exported(ws, model, data)
            made[name] = run_dir, json.loads((run_dir / "export.json").read_text())
        return made[name]

    return export


@pytest.fixture(scope="module", params=["mirror", "shifts"])
def recipe(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def trained(request: pytest.FixtureRequest, recipe: str) -> tuple[Path, Path]:
    return request.getfixturevalue(recipe)


@pytest.fixture(scope="module")
def export_run(recipe: str, export_of: Callable[[str], Export]) -> Export:
    return export_of(recipe)


def torch_reference(model_path: Path, images: torch.Tensor) -> tuple[np.ndarray, dict]:
    """The logits the recipe's test computes (engine's own functions), fp32 on the CPU."""
    model, cfg = load_model(model_path, make_compute("cpu", "fp32"))
    model.eval()
    with torch.no_grad():
        inputs = normalise(images)
        logits = view_logits(model, inputs, cfg["tta"])
        if cfg["tta_translate"]:
            logits = translated_logits(model, inputs, logits, cfg["tta"])
    return logits.numpy(), cfg


# ---------------------------------------------------------------- a good export


def test_the_export_is_one_run_folder_named_on_the_last_line(trained, data, export_run):
    ws, model = trained
    run_dir, manifest = export_run
    assert run_dir.parent == ws / "runs" and run_dir.name.startswith("export-")
    assert run_dir.name.endswith(sha256(model)[:10])
    assert sorted(p.name for p in run_dir.iterdir()) == ["export.json", "model.onnx",
                                                          "smoke.npz"]
    assert not [p for p in (ws / "runs").iterdir() if p.name.startswith(".")]  # no staging left
    assert manifest["format"] == "ct-export/1" and manifest["onnx"] == "model.onnx"
    assert manifest["model"] == model.relative_to(ws).as_posix()
    assert manifest["model_sha256"] == sha256(model)
    assert manifest["onnx_sha256"] == sha256(run_dir / "model.onnx")
    assert manifest["opset"] == 17 and manifest["output"] == {"name": "logits"}
    assert manifest["input"] == {"name": "images", "dtype": "uint8", "shape": ["N", 3, 32, 32]}
    assert manifest["test_images"] == TEST_IMAGES
    metrics = json.loads((ws / "metrics.json").read_text())
    assert manifest["data_version"] == metrics["data_version"]
    assert manifest["test_version"] == metrics["test_version"]
    assert manifest["classes"] == metrics["classes"]
    assert set(manifest["versions"]) == {"torch", "onnxruntime", "onnx"}
    assert manifest["exported_at"].endswith("Z")


def test_the_graph_takes_uint8_images_of_any_batch_and_gives_logits(export_run):
    run_dir, _ = export_run
    graph = onnx.load(str(run_dir / "model.onnx"))
    assert graph.opset_import[0].version == 17
    (given,), (answer,) = graph.graph.input, graph.graph.output
    assert given.name == "images" and given.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = given.type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert answer.name == "logits" and answer.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    images = np.load(run_dir / "smoke.npz", allow_pickle=False)["images"]
    runner = session(run_dir / "model.onnx")
    one = runner.run(["logits"], {"images": images[:1]})[0]
    seven = runner.run(["logits"], {"images": images[:7]})[0]
    assert one.shape == (1, 10) and seven.shape == (7, 10)
    assert np.abs(seven[:1] - one).max() < 1e-5  # an image's logits do not depend on its batch


def test_onnx_runtime_gives_torch_s_logits_on_the_smoke_set(trained, export_run):
    """The figures of export.json recomputed: ORT on the smoke images against the recipe's
    test in torch (the engine's functions, fp32), and the smoke set's accuracy."""
    _, model = trained
    run_dir, manifest = export_run
    smoke = np.load(run_dir / "smoke.npz", allow_pickle=False)
    images, labels = smoke["images"], smoke["labels"]
    assert images.dtype == np.uint8 and images.shape == (500, 3, 32, 32)
    assert labels.dtype == np.int64 and labels.shape == (500,)
    served = session(run_dir / "model.onnx").run(["logits"], {"images": images})[0]
    reference, cfg = torch_reference(model, torch.from_numpy(images))
    assert np.abs(served - reference).max() <= 1e-3
    assert (served.argmax(1) == reference.argmax(1)).mean() >= 0.999
    accuracy = 100.0 * float((served.argmax(1) == labels).mean())
    assert manifest["smoke"] == {"file": "smoke.npz", "images": 500,
                                 "accuracy": round(accuracy, 2)}
    assert manifest["tta"] == {"mirror": cfg["tta"], "translate": cfg["tta_translate"]}


def test_the_parity_and_the_accuracies_are_what_they_claim(trained, data, export_run):
    """parity within bounds on the first 1,000 test images; served_accuracy is ORT's on the
    whole test set and torch_accuracy evaluate_as_configured's, which agree here."""
    _, model = trained
    run_dir, manifest = export_run
    parity = manifest["parity"]
    assert parity["images"] == 1000 and parity["tolerance"] == 0.001
    assert 0 <= parity["max_abs_logit_diff"] <= 1e-3 and parity["top1_agreement"] >= 99.9
    cifar = load_cifar(data)
    served = np.concatenate([session(run_dir / "model.onnx").run(
        ["logits"], {"images": cifar.test_x[i:i + 400].numpy()})[0]
        for i in range(0, TEST_IMAGES, 400)])
    right = served.argmax(1) == cifar.test_y.numpy()
    assert manifest["served_accuracy"] == round(100.0 * float(right.mean()), 2)
    net, cfg = load_model(model, make_compute("cpu", "fp32"))
    accuracy, _ = evaluate_as_configured(net, cifar.test_x, cifar.test_y,
                                         make_compute("cpu", "fp32"), cfg)
    assert manifest["torch_accuracy"] == round(accuracy, 2)
    assert abs(manifest["served_accuracy"] - manifest["torch_accuracy"]) <= 0.5
    assert manifest["served_accuracy"] > 50, "the tiny model learns the synthetic classes"


def test_the_same_model_exports_the_same_bytes(mirror, data, export_of):
    """A second export of the model is a second run folder with the same ONNX file: the
    content-addressed copies on the host then name one file."""
    ws, model = mirror
    run_dir, manifest = export_of("mirror")
    again = exported(ws, model, data)
    try:
        assert again != run_dir
        assert json.loads((again / "export.json").read_text())["onnx_sha256"] == \
            manifest["onnx_sha256"]
    finally:
        shutil.rmtree(again)


# ---------------------------------------------------------------- what fails writes nothing


def exports(ws: Path) -> list[str]:
    return sorted(p.name for p in (ws / "runs").iterdir()
                  if p.name.startswith(("export-", ".export-")))


def test_a_trace_that_cannot_match_torch_fails_and_writes_nothing(tmp_path, mirror, data):
    """A network.py whose forward reads a number out of its batch (.item()): the trace keeps
    the example batch's value as a constant, so the graph's logits differ from torch's. The
    export runs with that code on PYTHONPATH, as the pipeline runs a commit's snapshot."""
    ws, model = mirror
    snapshot = tmp_path / "snapshot"
    shutil.copytree(REPO / "ct", snapshot / "ct", ignore=shutil.ignore_patterns("__pycache__"))
    source = (REPO / "network.py").read_text()
    line = "        return self.head(self.dropout(x)) * self.head_scale\n"
    assert source.count(line) == 1
    (snapshot / "network.py").write_text(source.replace(
        line, line.rstrip("\n") + " + float(x.abs().mean().item())\n"))
    before = exports(ws)
    result = subprocess.run(
        [sys.executable, "-m", "ct.trainer.export", str(model), "--out", str(ws),
         "--data-dir", str(data)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(snapshot),
             "PYTHONDONTWRITEBYTECODE": "1"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("ct.trainer.export: error: the ONNX graph does not match "
                                    "torch on 1000 test images")
    assert "nothing written" in result.stderr
    assert "parity on 1000 test images" in result.stdout  # the log says what was measured
    assert exports(ws) == before


def test_a_tolerance_the_graph_misses_fails(mirror, data, export_of):
    """--tolerance below the measured difference: exit 1 with both numbers, nothing written.
    The tolerance is set from a real export's own figure, so the check meets a true miss."""
    ws, model = mirror
    diff = export_of("mirror")[1]["parity"]["max_abs_logit_diff"]
    before = exports(ws)
    if diff == 0:
        pytest.skip("ONNX Runtime matched torch bit for bit: no tolerance below that")
    tolerance = float(f"{diff / 2:.3g}")
    status, _, err = run_export(ws, model, data, "--tolerance", str(tolerance))
    assert status == 1 and len(err.splitlines()) == 1
    assert "does not match torch" in err and f"{diff:.3g} (tolerance {tolerance:g})" in err
    assert exports(ws) == before


@pytest.mark.parametrize("content", [None, b"", b"not a model at all\n", b"PK\x03\x04broken"])
def test_a_missing_or_corrupt_model_is_exit_2_and_writes_nothing(tmp_path, data, content):
    ws = tmp_path / "ws"
    (ws / "runs").mkdir(parents=True)
    model = ws / "model.pt"
    if content is not None:
        model.write_bytes(content)
    status, out, err = run_export(ws, model, data)
    assert status == 2, out + err
    assert len(err.splitlines()) == 1 and err.startswith("ct.trainer.export: error: ")
    assert str(model) in err
    assert list((ws / "runs").iterdir()) == []


@pytest.mark.parametrize(("flags", "said"), [
    (["--opset", "16"], "--opset 16"),
    (["--opset", "99"], "--opset 99"),
    (["--tolerance", "-1"], "--tolerance -1"),
    (["--tolerance", "nan"], "--tolerance nan"),
    (["--opset", "x"], "invalid int value"),
])
def test_bad_flags_are_exit_2_and_one_line(mirror, data, flags, said):
    ws, model = mirror
    before = exports(ws)
    status, _, err = run_export(ws, model, data, *flags)
    assert status == 2 and len(err.splitlines()) == 1 and said in err
    assert exports(ws) == before


def test_data_that_cannot_be_read_is_exit_2_and_writes_nothing(tmp_path, mirror):
    ws, model = mirror
    before = exports(ws)
    status, _, err = run_export(ws, model, tmp_path / "no-data-here")
    assert status == 2 and len(err.splitlines()) == 1, err
    assert exports(ws) == before


@pytest.mark.parametrize("views", ["mirror", "none"])
def test_fewer_views_serve_the_recipes_test_without_its_shifts_or_its_mirror(
        shifts, data, views: str) -> None:
    """--views mirror (the default, so no flag here) drops the shifted copies of a recipe that
    has them, --views none the mirror too: the graph computes exactly those views, and the
    manifest's tta and accuracies are theirs."""
    ws, model = shifts
    status, out, err = run_export(ws, model, data, *([] if views == "mirror" else
                                                     ["--views", views]))
    assert status == 0, err
    run_dir = ws / out.splitlines()[-1]
    manifest = json.loads((run_dir / "export.json").read_text())
    assert manifest["tta"] == {"mirror": views == "mirror", "translate": False}
    images = np.load(run_dir / "smoke.npz", allow_pickle=False)["images"]
    served = session(run_dir / "model.onnx").run(["logits"], {"images": images})[0]
    net, _ = load_model(model, make_compute("cpu", "fp32"))
    net.eval()
    with torch.no_grad():
        reference = view_logits(net, normalise(torch.from_numpy(images)), views == "mirror")
    assert np.abs(served - reference.numpy()).max() <= 1e-3
    whole, _ = torch_reference(model, torch.from_numpy(images))  # mirror and shifts
    assert np.abs(served - whole).max() > 1e-3, "the shifts must be gone from the graph"
    assert manifest["served_accuracy"] == manifest["torch_accuracy"]
