"""python -m ct.serving.measure, the pipeline's own evaluator: a model trained for real
(train.py, a few epochs on the synthetic CIFAR-10) and exported as a candidate is
(ct.trainer.export --views recipe --parity-only) measures what its run claimed; the test batch
is read by a restricted unpickler (a foreign global is refused before anything runs), and a
test set that is not CIFAR-10's shape, a model reached through a link and an archive that is
not the official one are each refused in one line."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ct import data_version
from ct.pipeline import measured
from ct.serving import cifar_test
from tests.conftest import REPO
from tests.synthetic_cifar import make_cifar, make_cifar_archive
from tests.test_export import run_export, train_model

TEST_IMAGES = 1200


def measure(*args: str | Path, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    """`python -m ct.serving.measure ARGS` in a process of its own, one thread."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CT_")}
    return subprocess.run([sys.executable, "-m", "ct.serving.measure", *map(str, args)],
                          cwd=REPO, env={**environ, "CT_THREADS": "1", **(env or {})},
                          capture_output=True, text=True, timeout=300, check=False)


def answer(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    return json.loads(line)


def one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("ct.serving.measure: error: ")
    for word in words:
        assert word in line, (word, line)
    return line


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cifar(tmp_path_factory.mktemp("measure-data"), per_batch=200, test=TEST_IMAGES)


@pytest.fixture(scope="module")
def candidate(tmp_path_factory: pytest.TempPathFactory, data: Path
              ) -> tuple[Path, dict[str, Any], Path, str]:
    """A run trained for real (the default recipe's test: mirror and shifts), and its export as
    the pipeline makes a candidate's: (workspace, metrics.json, model.onnx, the export's log)."""
    ws = tmp_path_factory.mktemp("ws")
    train_model(ws, data, "--tta-translate", "yes")
    metrics = json.loads((ws / "metrics.json").read_text())
    status, out, err = run_export(ws, ws / metrics["model"], data, "--views", "recipe",
                                  "--parity-only")
    assert status == 0, err
    return ws, metrics, ws / out.splitlines()[-1] / "model.onnx", out


def test_an_honest_candidate_measures_what_its_run_claimed(candidate, data):
    """The recipe's whole test in the graph, fp32 in ONNX Runtime: the run's own figure (torch,
    the precision it trained in), within the default tolerance; the same test set's identity."""
    ws, metrics, onnx, _ = candidate
    result = answer(measure(onnx, "--data", data, "--root", ws))
    assert result["images"] == TEST_IMAGES and result["increment_images"] == 0
    assert result["test_version"] == metrics["test_version"]
    gap = abs(result["accuracy"] - metrics["accuracy"])
    assert gap <= measured.DEFAULT_TOLERANCE, (result, metrics["accuracy"])
    assert result["accuracy"] == pytest.approx(100 * result["correct"] / TEST_IMAGES, abs=1e-4)
    manifest = json.loads((onnx.parent / "export.json").read_text())
    assert result["onnx_sha256"] == manifest["onnx_sha256"]
    assert result["threads"] == 1 and result["format"] == "ct-measure/1"


def test_a_candidate_export_never_scores_the_whole_test_set(candidate):
    """--parity-only: the parity images only, in both runtimes; no figure a champion's record
    could take (ct.pipeline.exported needs percentages there)."""
    _, _, onnx, log = candidate
    manifest = json.loads((onnx.parent / "export.json").read_text())
    assert manifest["served_accuracy"] is None and manifest["torch_accuracy"] is None
    assert manifest["tta"] == {"mirror": True, "translate": True}  # --views recipe
    assert "on 1000 test images" in log and f"on {TEST_IMAGES} test images" not in log
    assert "torch (fp32, cpu)" not in log


# ---------------------------------------------------------------- the test batch, untrusted


class Runs:
    """Unpickled, it calls `call(*args)`: what a hostile pickle does."""

    def __init__(self, call: Any, *args: Any) -> None:
        self.call, self.args = call, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.call, self.args


def write_test_batch(folder: Path, batch: dict[bytes, Any]) -> Path:
    path = folder / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps(batch, protocol=2))
    return path


@pytest.fixture
def own_data(tmp_path: Path) -> Path:
    return make_cifar(tmp_path / "data", per_batch=20, test=200)


def labelled(count: int = 200) -> list[int]:
    return [i % 10 for i in range(count)]


def hostile_batch(hostile: str, marker: Path) -> dict[bytes, Any]:
    call = {"os.system": Runs(os.system, f"touch {marker}"),
            "subprocess": Runs(subprocess.call, ["touch", str(marker)]),
            "builtins.exec": Runs(exec, f"open({str(marker)!r}, 'w').close()")}[hostile]
    return {b"data": call, b"labels": labelled()}


# protocol 2 writes Python 2's names (pickle's fix_imports): what the refusal shows
@pytest.mark.parametrize("hostile, shown", [("os.system", "posix.system"),
                                            ("subprocess", "commands.call"),
                                            ("builtins.exec", "__builtin__.exec")])
def test_a_pickle_with_a_foreign_global_is_refused_without_running_it(candidate, own_data,
                                                                      tmp_path, hostile, shown):
    control = tmp_path / "control"  # the same payload, read as pickle.loads reads it: it runs
    pickle.loads(pickle.dumps(hostile_batch(hostile, control), protocol=2))
    assert control.exists()
    marker = tmp_path / "pwned"
    write_test_batch(own_data, hostile_batch(hostile, marker))
    ws, _, onnx, _ = candidate
    one_line_error(measure(onnx, "--data", own_data, "--root", ws), "test_batch refused",
                   f"global {shown} is not allowed in a CIFAR-10 batch")
    assert not marker.exists()


@pytest.mark.parametrize("value, says", [
    (Runs(np.dtype, "O"), "a dtype other than a plain integer"),
    (Runs(bytes.fromhex, "00"), "is not allowed in a CIFAR-10 batch"),
    (Runs(np.load, "/etc/hostname"), "global numpy.load is not allowed"),
])
def test_only_the_globals_a_cifar_batch_holds_resolve(value, says):
    raw = pickle.dumps({b"data": value, b"labels": labelled()}, protocol=2)
    with pytest.raises(cifar_test.TestSetError, match=says):
        cifar_test.unpickle(raw, "test_batch")


def test_an_object_array_and_a_foreign_codec_are_refused(own_data):
    """Even the allowed names are checked: a dtype other than plain integers (object arrays
    hold pickled objects), and _codecs.encode with a codec other than latin-1 (zlib's would
    inflate a small file into gigabytes)."""
    objects = pickle.dumps({b"data": np.array([len], dtype=object)}, protocol=2)
    with pytest.raises(cifar_test.TestSetError, match="dtype other than a plain integer"):
        cifar_test.unpickle(objects, "test_batch")
    raw = pickle.dumps({b"data": b"\xff" * 8}, protocol=2)
    assert b"latin1" in raw  # protocol 2 writes bytes as _codecs.encode(text, "latin1")
    zlib = raw.replace(b"latin1", b"zlib_c")
    with pytest.raises(cifar_test.TestSetError, match="codec call other than latin-1"):
        cifar_test.unpickle(zlib, "test_batch")


@pytest.mark.parametrize("batch, says", [
    ({b"data": np.zeros((200, 3072), np.uint8), b"labels": labelled(199)},
     "199 labels for 200 images"),
    ({b"data": np.zeros((200, 3072), np.uint8), b"labels": [*labelled(199), 10]},
     "labels outside 0..9"),
    ({b"data": np.zeros((200, 3072), np.float32), b"labels": labelled()},
     "a dtype other than a plain integer ('f4')"),
    ({b"data": np.zeros((200, 3072), np.int64), b"labels": labelled()}, "not uint8 (N, 3072)"),
    ({b"data": np.zeros((200, 1024), np.uint8), b"labels": labelled()}, "not uint8 (N, 3072)"),
    ({b"data": np.zeros((200, 3072), np.uint8), b"labels": [0] * 200}, "no test image of class"),
    ({b"labels": labelled()}, "lacks b'data'"),
])
def test_a_test_set_with_wrong_counts_or_shapes_is_refused_in_one_line(candidate, own_data,
                                                                       batch, says):
    write_test_batch(own_data, batch)
    ws, _, onnx, _ = candidate
    one_line_error(measure(onnx, "--data", own_data, "--root", ws), "the test set", says)


def test_a_test_batch_of_another_size_than_expected_is_refused(candidate, own_data):
    ws, _, onnx, _ = candidate
    one_line_error(measure(onnx, "--data", own_data, "--root", ws, "--expect-images", "10000"),
                   "200 test images, not the 10000 expected")


def test_only_the_official_archive_passes_official(candidate, tmp_path):
    """Without CT_DATA_DIR the pipeline trusts the downloaded archive by its md5, not its place
    (the container can write data/): any other archive is refused; without --official it is
    read, in one pass, as the trainer reads it."""
    archive = make_cifar_archive(tmp_path, per_batch=20, test=300)
    ws, _, onnx, _ = candidate
    one_line_error(measure(onnx, "--data", archive, "--root", ws, "--official"),
                   "not c58f30108f718f92721af3b95e74349a")
    result = answer(measure(onnx, "--data", archive, "--root", ws))
    assert result["images"] == 300 and result["data"] == str(archive)


def test_a_model_reached_through_a_link_is_refused(candidate, data, tmp_path):
    """The export's folder is the container's: its model.onnx linked to a host file is not
    read (nothing of the target is loaded or shown)."""
    ws, _, onnx, _ = candidate
    secret = tmp_path / "host-secret"
    secret.write_text("not for the container\n")
    secret.chmod(0o600)
    linked = onnx.parent.parent / "export-linked"
    linked.mkdir()
    (linked / "model.onnx").symlink_to(secret)
    line = one_line_error(measure(linked / "model.onnx", "--data", data, "--root", ws),
                          "the model")
    assert "not for the container" not in line
    (ws / "runs" / "linked-run").symlink_to(onnx.parent)  # a link to a folder on the way
    one_line_error(measure(ws / "runs" / "linked-run" / "model.onnx", "--data", data,
                           "--root", ws), "the model")


def test_the_increments_test_images_join_the_test_set(candidate, data, tmp_path):
    """What a run with increments was tested on: CIFAR-10's test batch and the increments'
    test images (decoded as the trainer decodes them), with the same test_version."""
    ws, _, onnx, _ = candidate
    increments = tmp_path / "increments"
    for i in range(7):
        path = increments / "2025-01" / "test" / data_version.CLASSES[i] / f"t{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 40, 3), 30 * i, np.uint8)).save(path)
    result = answer(measure(onnx, "--data", data, "--root", ws, "--increments", increments))
    assert result["images"] == TEST_IMAGES + 7 and result["increment_images"] == 7
    expected = data_version.test_version(data_version.compute(data, increments))
    assert result["test_version"] == expected
