"""Labelled increments in the trainer (ct.trainer.increments): any image decoded to 32x32 RGB, a run
that trains on CIFAR-10 plus an increment and records the data version, bad data refused before
anything is trained or written, and `ct.pipeline.lineage --verify` checking the data version."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ct import data_version
from ct.pipeline import lineage as lineage_cli
from ct.trainer.data import Cifar, DataError, dataset_sha256, load_cifar
from ct.trainer.increments import add_increments, decode
from ct.trainer.lineage import differences
from tests.test_data_version import IMAGES, add_increment, write_image
from tests.train_cli import only_run_dir, run

ONE_EPOCH = ["--epochs", "1", "--batch-size", "64"]


def base_of(data: Path) -> Cifar:
    base = load_cifar(data)
    assert base.location is not None
    base.sha256, _ = dataset_sha256(base.location)
    return base


def save_pixels(path: Path, chw: np.ndarray) -> Path:
    """A lossless file of exactly these (3, 32, 32) pixels (the format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(chw.transpose(1, 2, 0))).save(path)
    return path


# ---------------------------------------------------------------- decoding


def test_any_mode_and_size_becomes_32x32_rgb(tmp_path: Path) -> None:
    exact = np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    assert np.array_equal(decode(save_pixels(tmp_path / "exact.png", exact)), exact)

    odd = write_image(tmp_path / "odd.png", 1, (47, 13), "RGBA")
    expected = Image.open(odd).convert("RGB").resize((32, 32), Image.Resampling.LANCZOS)
    assert np.array_equal(decode(odd), np.asarray(expected).transpose(2, 0, 1)), \
        "alpha dropped, then Lanczos"
    grey = decode(write_image(tmp_path / "grey.png", 2, (13, 47), "L"))
    assert grey.shape == (3, 32, 32) and np.array_equal(grey[0], grey[2])
    palette = write_image(tmp_path / "palette.png", 3, (32, 32), "P")
    assert np.array_equal(decode(palette),
                          np.asarray(Image.open(palette).convert("RGB")).transpose(2, 0, 1))
    for name in ("photo.jpg", "photo.JPEG", "picture.bmp", "anim.gif", "web.webp"):
        decoded = decode(write_image(tmp_path / name, 4, (50, 40)))
        assert decoded.shape == (3, 32, 32) and decoded.dtype == np.uint8, name


def test_the_same_version_gives_the_same_tensors_and_the_cache_is_used(tiny_cifar: Path,
                                                                       tmp_path: Path) -> None:
    add_increment(tiny_cifar, "first", IMAGES)
    base, lines = base_of(tiny_cifar), []
    cache_dir = tmp_path / "cache"
    first = add_increments(base, tiny_cifar, None, cache_dir, lines.append)
    assert (len(first.train_x), len(first.test_x)) == (len(base.train_x) + 3, len(base.test_x) + 1)
    assert torch.equal(first.train_x[:len(base.train_x)], base.train_x), "appended, not mixed"
    assert first.version == data_version.compute(tiny_cifar).version
    assert "decoded and checked 4 images" in lines[-1]
    again = add_increments(base, tiny_cifar, None, cache_dir, lines.append)
    assert "decoded images cached in" in lines[-1]
    (tiny_cifar / "increments" / "first").rename(tiny_cifar / "increments" / "renamed")
    for path in (tiny_cifar / "increments").rglob("*.png"):
        path.rename(path.with_name(f"z-{path.name}"))
    renamed = add_increments(base, tiny_cifar, None, None, lines.append)
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
        assert torch.equal(getattr(first, name), getattr(renamed, name)), name
    assert renamed.record["increments"] == ["renamed"]


def test_a_reproduction_compares_the_data_version_when_both_record_one() -> None:
    now = {"data_version": "b" * 64}
    assert differences({}, now) == [], "a run from before increments recorded none"
    assert differences({"data_version": "a" * 64}, now) == ["data version aaaaaaaaaaaa vs "
                                                            "bbbbbbbbbbbb now"]


# ---------------------------------------------------------------- train.py with increments


def test_a_run_trains_on_base_and_increment_and_records_the_version(
        tiny_cifar: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add_increment(tiny_cifar, "first", IMAGES)
    add_increment(tiny_cifar, "second", {"train/ship/s.png": 21, "train/ship/t.png": 22})
    ws = tmp_path / "ws"
    status, out, err = run(["--out", ws, "--data-dir", tiny_cifar, *ONE_EPOCH], capsys)
    assert status == 0, err
    metrics = json.loads((ws / "metrics.json").read_text())
    assert metrics["data"] == {"base_train": 1000, "base_test": 200, "increment_train": 5,
                               "increment_test": 1, "increments": ["first", "second"]}
    assert metrics["train_images"] == 1005
    version = data_version.compute(tiny_cifar).version
    assert metrics["data_version"] == metrics["lineage"]["data_version"] == version
    assert metrics["lineage"]["data"] == metrics["data"]
    assert json.loads((only_run_dir(ws) / "metrics.json").read_text())["data_version"] == version
    assert f"data version {version[:16]}: 1005 train, 201 test images" in out
    assert (ws / "data" / data_version.DECODED_CACHE).is_file()
    assert (ws / "data" / data_version.HASH_CACHE).is_file()


def test_lineage_verify_checks_the_data_version(tiny_cifar: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    ws = tiny_cifar.parent  # the data in W/data, where --verify looks
    add_increment(tiny_cifar, "first", IMAGES)
    assert run(["--out", ws, *ONE_EPOCH], capsys)[0] == 0
    run_id = only_run_dir(ws).name

    def verify() -> tuple[int, str]:
        status = lineage_cli.main(["--workspace", str(ws), run_id, "--verify"])
        return status, capsys.readouterr().out

    status, out = verify()
    assert status == 0, out
    assert "verified: the model, the dataset and the data version match" in out
    version = json.loads((ws / "metrics.json").read_text())["data_version"]
    assert f"version {version}" in out

    path = tiny_cifar / "increments" / "first" / "test" / "dog" / "d.png"
    pixels = np.asarray(Image.open(path)).copy()
    pixels[5, 5, 1] ^= 1
    Image.fromarray(pixels).save(path)
    status, out = verify()
    assert status == 1
    (problem,) = [line for line in out.splitlines() if "MISMATCH" in line]
    assert problem.startswith("ct.lineage: MISMATCH data version:") and version in problem

    metrics_path = only_run_dir(ws) / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    del metrics["data_version"], metrics["lineage"]["data_version"]
    metrics_path.write_text(json.dumps(metrics))
    status, out = verify()
    assert status == 0 and "ct.lineage: data version not recorded" in out


# ---------------------------------------------------------------- bad data


def _base_test_image(data: Path) -> np.ndarray:
    return load_cifar(data).test_x[7].numpy()


def _new_file(data: Path, rel: str) -> Path:
    path = data / "increments" / "new" / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _truncated(data: Path) -> str:
    path = write_image(data / "increments" / "new" / "train" / "cat" / "cut.png", 5, (64, 64))
    path.write_bytes(path.read_bytes()[:-200])
    return "cut.png"


def _not_an_image(data: Path) -> str:
    _new_file(data, "train/cat/fake.jpg").write_bytes(b"no jpeg here")
    return "fake.jpg"


def _leak_base_test(data: Path) -> str:
    save_pixels(data / "increments" / "new" / "train" / "frog" / "leak.png", _base_test_image(data))
    return "leak.png"


def _leak_increment_test(data: Path) -> str:
    pixels = np.random.default_rng(7).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    save_pixels(data / "increments" / "other" / "test" / "frog" / "held-out.png", pixels)
    save_pixels(data / "increments" / "new" / "train" / "frog" / "seen.bmp", pixels)
    return "seen.bmp"


def _leak_base_train(data: Path) -> str:
    save_pixels(data / "increments" / "new" / "test" / "deer" / "t.png",
                load_cifar(data).train_x[3].numpy())
    return "t.png"


def _duplicate(data: Path) -> str:
    pixels = np.random.default_rng(8).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    save_pixels(data / "increments" / "new" / "train" / "horse" / "one.png", pixels)
    save_pixels(data / "increments" / "new" / "train" / "horse" / "two.bmp", pixels)
    return "one.png"  # and two.bmp: both named (checked below)


def _wrong_class(data: Path) -> str:
    write_image(data / "increments" / "new" / "train" / "kitten" / "k.png", 9)
    return "kitten"


def _wrong_split(data: Path) -> str:
    write_image(data / "increments" / "new" / "validation" / "cat" / "v.png", 9)
    return "validation"


def _empty(data: Path) -> str:
    (data / "increments" / "hollow" / "train" / "cat").mkdir(parents=True)
    return "hollow"


def _stray_file(data: Path) -> str:
    write_image(_new_file(data, "train/cat/ok.png"), 12)
    _new_file(data, "train/cat/labels.csv").write_text("a,cat\n")
    return "labels.csv"


BAD_DATA: dict[str, tuple[Callable[[Path], str], str]] = {
    "truncated image": (_truncated, "is not a readable image"),
    "not an image inside": (_not_an_image, "is not a readable image"),
    "leakage from the base test set": (_leak_base_test, "leakage: training image"),
    "leakage from an increment's test set": (_leak_increment_test, "leakage: training image"),
    "test image in the base training set": (_leak_base_train, "leakage: test image"),
    "duplicate inside an increment": (_duplicate, "duplicate in increment new"),
    "folder that is not a class": (_wrong_class, "is not a class folder"),
    "split other than train and test": (_wrong_split, "only train/ and test/"),
    "empty increment": (_empty, "empty increment"),
    "non-image file": (_stray_file, "is not an image file"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_one_line_and_loses_nothing(case: str, tiny_cifar: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    add_increment(tiny_cifar, "good", {"train/cat/fine.png": 30, "test/dog/fine.png": 31})
    make, says = BAD_DATA[case]
    named = make(tiny_cifar)
    ws = tmp_path / "ws"
    ws.mkdir()
    earlier = {"accuracy.txt": "81.27\n", "metrics.json": '{"accuracy": 81.27}\n',
               "best.json": '{"accuracy": 80.0}\n'}
    for name, text in earlier.items():
        (ws / name).write_text(text)
    status, _, err = run(["--out", ws, "--data-dir", tiny_cifar, *ONE_EPOCH], capsys)
    assert status == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("train.py: error:") and says in line and named in line, line
    if case == "duplicate inside an increment":
        assert "two.bmp" in line
    assert {name: (ws / name).read_text() for name in earlier} == earlier
    assert not list(ws.glob("runs/*/metrics.json")) and not list(ws.glob("runs/*/model.pt"))
    assert not list(ws.glob("runs/*/checkpoint.pt")), "refused before the first epoch"


def test_increments_given_that_do_not_exist(tiny_cifar: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-folder"
    status, _, err = run(["--out", tmp_path / "ws", "--data-dir", tiny_cifar,
                          "--increments", missing, *ONE_EPOCH], capsys)
    assert status == 2 and err.count("\n") == 1
    assert f"--increments {missing} is not a folder" in err


def test_a_cache_of_good_data_does_not_hide_a_bad_image(tiny_cifar: Path, tmp_path: Path) -> None:
    add_increment(tiny_cifar, "first", IMAGES)
    base = base_of(tiny_cifar)
    add_increments(base, tiny_cifar, None, tmp_path, lambda line: None)
    _truncated(tiny_cifar)
    with pytest.raises(DataError, match=r"cut\.png is not a readable image"):
        add_increments(base, tiny_cifar, None, tmp_path, lambda line: None)
