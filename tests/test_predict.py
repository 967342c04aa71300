"""`python -m ct.serving.predict`: one JSON line per image with a real exported model (ONNX
Runtime), the model found from a workspace, its best.json or an ONNX file; bad files get an
error line, the rest are still answered, and the run ends with exit 2. Loading refuses a model
that is not the one recorded (sha256), a name outside WS/models, a symbolic link."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ct.serving import model as served
from ct.serving import predict
from tests import served_model
from tests.served_model import REPO, Champion

# Imports the predict command with torch made unimportable, runs it, and says whether any
# module outside the standard library, numpy, onnxruntime and Pillow's reach was loaded.
NO_TORCH = """
import runpy, sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ImportError(f"{name}: the serving image has no torch")
        return None

sys.meta_path.insert(0, NoTorch())
sys.argv = ["predict", *sys.argv[1:]]
runpy.run_module("ct.serving.predict", run_name="__main__")
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Champion]:
    ws = tmp_path_factory.mktemp("predict") / "ws"
    champion = served_model.write_champion(ws, 2)
    served_model.write_best(ws, champion)
    return ws, champion


def picture(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (max(1, size[1] // 8), max(1, size[0] // 8), 3), np.uint8)
    return Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST).convert(mode)


def write_images(folder: Path) -> dict[str, Path]:
    """PNG and JPEG files in odd sizes and modes, some in a subfolder."""
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, mode, size in (("rgba.png", "RGBA", (47, 13)), ("grey.png", "L", (13, 47)),
                             ("palette.png", "P", (64, 64)), ("one.png", "RGB", (1, 1)),
                             ("wide.jpg", "RGB", (500, 300)), ("cmyk.jpeg", "CMYK", (40, 40)),
                             ("sub/deep.PNG", "RGB", (32, 32))):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = "JPEG" if name.lower().endswith((".jpg", ".jpeg")) else "PNG"
        picture(mode, size, len(made)).save(path, fmt)
        made[name] = path
    return made


def write_bad_files(folder: Path) -> dict[str, Path]:
    good = io.BytesIO()
    picture("RGB", (64, 64), 9).save(good, "PNG")
    bad = {"text.png": b"not an image at all\n", "truncated.png": good.getvalue()[:-200],
           "empty.jpg": b""}
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in bad}


def run_predict(args: list[str | Path], capsys: pytest.CaptureFixture[str]
                ) -> tuple[int, list[dict], str]:
    status = predict.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, [json.loads(line) for line in out.splitlines()], err


# ---------------------------------------------------------------- answers


def test_every_image_gets_its_line_in_sorted_order(workspace: tuple[Path, Champion],
                                                   tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    ws, champion = workspace
    made = write_images(tmp_path / "in")
    (tmp_path / "in" / "notes.txt").write_text("skipped: not an image suffix")
    status, lines, err = run_predict(["--model", ws, tmp_path / "in"], capsys)
    assert status == 0, err
    assert [line["file"] for line in lines] == sorted(str(p) for p in made.values())
    loaded = served.load_champion(ws, champion.onnx, champion.sha256, 1)
    for line in lines:
        assert set(line) == {"file", "class", "probability", "top3", "model"}
        assert line["model"] == champion.id
        assert line["top3"][0]["class"] == line["class"]
        assert line["top3"][0]["probability"] == line["probability"]
        probabilities = [t["probability"] for t in line["top3"]]
        assert probabilities == sorted(probabilities, reverse=True) and len(set(
            t["class"] for t in line["top3"])) == 3
        # the same numbers as the model gives for the decoded pixels, one image at a time
        from ct.images import SERVING, decode

        row = loaded.probabilities(decode(Path(line["file"]), SERVING)[None])[0]
        assert line == {"file": line["file"], **served.prediction(row, loaded.classes),
                        "model": champion.id}


def test_the_model_from_a_workspace_its_best_json_or_an_onnx_file(
        workspace: tuple[Path, Champion], tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    ws, champion = workspace
    image = write_images(tmp_path / "in")["wide.jpg"]
    answers = []
    for model in (ws, ws / "best.json", ws / champion.onnx):
        status, lines, _ = run_predict(["--model", model, image], capsys)
        assert status == 0
        answers.append(lines)
    monkeypatch.setenv("CT_WORKSPACE", str(ws))
    answers.append(run_predict([image], capsys)[1])
    assert answers[0] == answers[1] == answers[2] == answers[3]
    assert answers[0][0]["model"] == champion.id


def test_bad_files_get_error_lines_the_rest_is_answered_and_the_exit_is_2(
        workspace: tuple[Path, Champion], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    ws, _ = workspace
    good = write_images(tmp_path / "in")
    bad = write_bad_files(tmp_path / "in")
    status, lines, err = run_predict(["--model", ws, tmp_path / "in",
                                      tmp_path / "missing.png"], capsys)
    assert status == 2 and err == ""
    by_file = {line["file"]: line for line in lines}
    assert len(lines) == len(good) + len(bad) + 1
    for path in good.values():
        assert "class" in by_file[str(path)]
    reasons = {name: by_file[str(path)]["error"] for name, path in bad.items()}
    assert reasons["text.png"].startswith("not an image")
    assert reasons["truncated.png"].startswith("damaged")
    assert reasons["empty.jpg"].startswith("empty")
    assert by_file[str(tmp_path / "missing.png")]["error"].startswith("unreadable")
    assert all(set(by_file[str(p)]) == {"file", "error"} for p in bad.values())
    assert all("\n" not in line["error"] for line in lines if "error" in line)


def test_the_command_runs_without_torch(workspace: tuple[Path, Champion],
                                        tmp_path: Path) -> None:
    ws, champion = workspace
    made = write_images(tmp_path / "in")
    bad = write_bad_files(tmp_path / "in")
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, "--model", str(ws),
                           str(made["one.png"]), str(bad["text.png"])], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    first, second = (json.loads(line) for line in proc.stdout.splitlines())
    assert first["model"] == champion.id and "error" in second


# ---------------------------------------------------------------- the model refused


def refused(args: list[str | Path], capsys: pytest.CaptureFixture[str]) -> str:
    status, lines, err = run_predict(args, capsys)
    assert status == 2 and lines == [], err
    assert err.startswith("predict: error: ") and err.count("\n") == 1, err
    return err


def test_a_model_that_is_not_the_one_recorded_is_refused(
        workspace: tuple[Path, Champion], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    ws, champion = workspace
    image = write_images(tmp_path / "in")["one.png"]
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "models").mkdir()
    for path in (ws / "models").iterdir():
        (copy / "models" / path.name).write_bytes(path.read_bytes())
    (copy / "best.json").write_text((ws / "best.json").read_text())
    onnx = copy / champion.onnx
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    assert "not the" in refused(["--model", copy, image], capsys)  # best.json's sha256
    assert "not this file's" in refused(["--model", onnx, image], capsys)  # the manifest's

    record = json.loads((ws / "best.json").read_text())
    for name in ("../outside.onnx", "/etc/passwd", "models/../best.json",
                 "models/champion-xyz.onnx"):
        (copy / "best.json").write_text(json.dumps({"export": {**record["export"],
                                                              "onnx": name}}))
        assert "models/" in refused(["--model", copy, image], capsys), name
    (copy / "best.json").write_text(json.dumps({"accuracy": 80.0}))
    assert "records no export" in refused(["--model", copy, image], capsys)
    assert "neither" in refused(["--model", tmp_path / "model.txt", image], capsys)


def test_symbolic_links_in_the_models_folder_are_refused(
        workspace: tuple[Path, Champion], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    ws, _ = workspace
    image = write_images(tmp_path / "in")["one.png"]
    linked = tmp_path / "linked"
    (linked / "models").mkdir(parents=True)
    for path in (ws / "models").iterdir():
        (linked / "models" / path.name).symlink_to(path)
    (linked / "best.json").write_text((ws / "best.json").read_text())
    assert "symbolic link" in refused(["--model", linked, image], capsys)
    whole = tmp_path / "whole"
    whole.mkdir()
    (whole / "models").symlink_to(ws / "models")
    (whole / "best.json").write_text((ws / "best.json").read_text())
    assert "symbolic link" in refused(["--model", whole, image], capsys)


def test_a_damaged_manifest_or_smoke_set_is_refused(workspace: tuple[Path, Champion],
                                                    tmp_path: Path) -> None:
    ws, champion = workspace
    models = tmp_path / "ws" / "models"
    models.mkdir(parents=True)
    for path in (ws / "models").iterdir():
        (models / path.name).write_bytes(path.read_bytes())
    manifest_path = models / champion.onnx.removeprefix("models/").replace(".onnx", ".json")
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "classes": "cat"}))
    with pytest.raises(served.ModelError, match="classes is not a list"):
        served.load_champion(tmp_path / "ws", champion.onnx, champion.sha256, 1)
    manifest_path.write_text(json.dumps({**manifest, "input": {"name": "pixels"}}))
    with pytest.raises(served.ModelError, match="not the manifest's 'pixels'"):
        served.load_champion(tmp_path / "ws", champion.onnx, champion.sha256, 1)
    manifest_path.write_text(json.dumps(manifest))
    loaded = served.load_champion(tmp_path / "ws", champion.onnx, champion.sha256, 1)
    loaded.smoke_file.write_bytes(b"not a zip")
    with pytest.raises(served.ModelError, match="is not a smoke set"):
        served.smoke_test(loaded, 50)
