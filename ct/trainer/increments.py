"""Labelled increments (docs/data.md): images in class folders, appended to CIFAR-10's training
set (an increment's train/) and test set (its test/), each decoded with Pillow to 32x32 RGB.

Everything is checked before a run trains a step, so that bad data costs one line on stderr and
exit 2, and no result is written: an unreadable image, a duplicate inside one increment, a
training image with the pixels of a test image (leakage), and what ct.data_version checks of the
layout. The decoded images are cached in the data cache folder (DECODED_CACHE) under the data
version, so a later run on the same data decodes nothing and repeats no check.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ct import atomic, data_version
from ct.data_version import CLASSES, DataVersion, DataVersionError, IncrementImage
from ct.trainer.data import Cifar, DataError

SIZE = 32
# Part of the decoded cache's key, beside the data version: another decoding, another cache.
DECODING = "exif-transpose rgb lanczos-32 v1"
ARRAYS = ("train_x", "train_y", "test_x", "test_y")
Arrays = dict[str, np.ndarray]


def add_increments(base: Cifar, data_dir: Path, given: Path | None, cache_dir: Path | None,
                   log: Callable[[str], None]) -> Cifar:
    """`base` (with its sha256) plus the increments in `given`, else data_dir/increments when
    it exists, with its data version and counts set (Cifar.version, Cifar.record). DataError
    (one line naming the file) for anything not as docs/data.md describes."""
    try:
        version = data_version.compute(data_dir, given, base=base.sha256, cache_dir=cache_dir)
    except DataVersionError as err:
        raise DataError(str(err)) from None
    if not version.images:
        return replace(base, version=version.version, record=_record(base, version, 0, 0))
    if list(base.classes) != list(CLASSES):
        raise DataError(f"the base dataset names its classes {base.classes}, not CIFAR-10's "
                        f"{list(CLASSES)}: increments cannot be labelled against it")
    cache = None if cache_dir is None else cache_dir / data_version.DECODED_CACHE
    key = f"{version.version} {DECODING}"
    arrays = _read_cache(cache, key, version)
    if arrays is None:
        arrays = decode_and_check(version.images, base)
        _write_cache(cache, key, arrays)
        how = f"decoded and checked {len(version.images)} images"
    else:
        how = f"decoded images cached in {cache}"
    hashed = f"{version.hashed} file(s) hashed" if version.hashed else "file digests cached"
    log(f"increments {', '.join(version.increments)} in {version.increments_dir}: "
        f"{len(arrays['train_y'])} train, {len(arrays['test_y'])} test images ({how}; {hashed})")
    record = _record(base, version, len(arrays["train_y"]), len(arrays["test_y"]))
    return replace(
        base, version=version.version, record=record,
        train_x=torch.cat([base.train_x, torch.from_numpy(arrays["train_x"])]),
        train_y=torch.cat([base.train_y, torch.from_numpy(arrays["train_y"])]),
        test_x=torch.cat([base.test_x, torch.from_numpy(arrays["test_x"])]),
        test_y=torch.cat([base.test_y, torch.from_numpy(arrays["test_y"])]),
        source=f"{base.source} + {len(version.increments)} increment(s)")


def _record(base: Cifar, version: DataVersion, train: int, test: int) -> dict[str, Any]:
    """What metrics.json and the lineage keep as `data`: where the images came from."""
    return {"base_train": len(base.train_x), "base_test": len(base.test_x),
            "increment_train": train, "increment_test": test,
            "increments": list(version.increments)}


def decode(path: Path) -> np.ndarray:
    """The image as uint8 (3, 32, 32), decoded as ct.images decodes every image the network
    reads (EXIF orientation, RGB, Lanczos to 32x32). DataError naming the file when Pillow cannot
    read all of it."""
    try:
        from ct import images
    except ImportError as exc:
        raise DataError("increments need Pillow to decode their images: pip install pillow "
                        "(requirements.txt pins it; the training image has it)") from exc
    try:
        return images.decode(path)
    except images.ImageError as exc:
        raise DataError(f"{path} is not a readable image ({exc.kind}: {exc.detail}); replace it "
                        "or remove it") from exc


def _pixels_key(image: np.ndarray) -> bytes:
    return hashlib.blake2b(image.tobytes(), digest_size=16).digest()


def decode_and_check(images: Sequence[IncrementImage], base: Cifar) -> Arrays:
    """Decode every image (in listing order, so the first bad file is named), refuse duplicates
    inside one increment and leakage, and stack each split in the order of the images' entries,
    so that the same data version gives the same tensors whatever the file names."""
    pixels = [decode(image.path) for image in images]
    keys = [_pixels_key(p) for p in pixels]
    seen: dict[tuple[str, str, bytes], Path] = {}
    for image, key in zip(images, keys, strict=True):
        first = seen.setdefault((image.increment, image.split, key), image.path)
        if first != image.path:
            raise DataError(f"duplicate in increment {image.increment}: {image.path} has the "
                            f"same 32x32 pixels as {first}; remove one of them")
    _check_leakage(images, keys, base)
    arrays: Arrays = {}
    for split in data_version.SPLITS:
        chosen = sorted((i for i, image in enumerate(images) if image.split == split),
                        key=lambda i: (images[i].sha256, images[i].label))
        arrays[f"{split}_x"] = (np.stack([pixels[i] for i in chosen]) if chosen
                                else np.zeros((0, 3, SIZE, SIZE), np.uint8))
        arrays[f"{split}_y"] = np.array([images[i].label for i in chosen], dtype=np.int64)
    return arrays


def _check_leakage(images: Sequence[IncrementImage], keys: Sequence[bytes], base: Cifar) -> None:
    """No training image may have the pixels of a test image: an increment's training image
    against the base test set and every increment's test set, an increment's test image against
    the base training set."""
    tests = {key: str(image.path) for image, key in zip(images, keys, strict=True)
             if image.split == "test"}
    added_tests = bool(tests)
    for i, row in enumerate(base.test_x.numpy()):
        tests.setdefault(_pixels_key(row), f"base test image #{i}")
    for image, key in zip(images, keys, strict=True):
        if image.split == "train" and key in tests:
            raise DataError(f"leakage: training image {image.path} has the same 32x32 pixels "
                            f"as {tests[key]}; remove one of them")
    if added_tests:
        trains = {}
        for i, row in enumerate(base.train_x.numpy()):
            trains.setdefault(_pixels_key(row), i)
        for image, key in zip(images, keys, strict=True):
            if image.split == "test" and key in trains:
                raise DataError(f"leakage: test image {image.path} has the same 32x32 pixels as "
                                f"base training image #{trains[key]}; remove it")


def _read_cache(cache: Path | None, key: str, version: DataVersion) -> Arrays | None:
    if cache is None:
        return None
    try:
        with np.load(cache, allow_pickle=False) as saved:
            if str(saved["key"]) != key:
                return None
            arrays = {name: saved[name].copy() for name in ARRAYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # no cache, or a damaged one: decode again
    counts = {split: sum(image.split == split for image in version.images)
              for split in data_version.SPLITS}
    for split in data_version.SPLITS:
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if (x.dtype != np.uint8 or x.shape != (counts[split], 3, SIZE, SIZE)
                or y.dtype != np.int64 or y.shape != (counts[split],)):
            return None
    return arrays


def _write_cache(cache: Path | None, key: str, arrays: Arrays) -> None:
    if cache is None:
        return

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, key=np.array(key), **arrays)

    try:
        atomic.write_via(cache, save)
    except OSError:
        pass  # a read-only or full cache folder only costs speed
