"""A small CIFAR-10 look-alike written in the real on-disk format (python-version pickles).

Each class gets its own colour and stripe orientation plus noise, so a small CNN learns it to well
above 80% in a few epochs: the pipeline tests need runs that clear (or, with a higher threshold,
miss) the accuracy gate quickly. Layout and dtypes follow the official archive exactly.
"""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = len(labels)
    yy, xx = np.mgrid[0:32, 0:32]
    palette = np.random.default_rng(1234).integers(40, 216, size=(10, 3))  # same in every batch
    out = np.empty((n, 3, 32, 32), dtype=np.float32)
    for cls in range(10):
        idx = np.flatnonzero(labels == cls)
        stripes = np.sin((xx * np.cos(cls * 0.31) + yy * np.sin(cls * 0.31)) * (0.4 + 0.05 * cls))
        base = palette[cls][:, None, None] + 30.0 * stripes[None]
        out[idx] = base[None]
    out += rng.normal(0.0, 25.0, size=out.shape)
    return np.clip(out, 0, 255).astype(np.uint8).reshape(n, 3072)


def _write_batch(path: Path, labels: np.ndarray, rng: np.random.Generator, name: str) -> None:
    batch = {
        b"batch_label": name.encode(),
        b"labels": [int(x) for x in labels],
        b"data": _images(labels, rng),
        b"filenames": [f"{name}_{i:05d}.png".encode() for i in range(len(labels))],
    }
    with open(path, "wb") as handle:
        pickle.dump(batch, handle, protocol=2)


def make_cifar(root: Path, per_batch: int = 200, test: int = 200, seed: int = 0) -> Path:
    """Write `root/cifar-10-batches-py/` with 5 training batches and a test batch; return root."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        labels = rng.permutation(np.arange(per_batch) % 10)
        _write_batch(folder / f"data_batch_{i}", labels, rng, f"training batch {i} of 5")
    test_labels = rng.permutation(np.arange(test) % 10)
    _write_batch(folder / "test_batch", test_labels, rng, "testing batch 1 of 1")
    meta = {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": per_batch,
            b"num_vis": 3072}
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump(meta, handle, protocol=2)
    return root


def make_cifar_archive(root: Path, **kwargs: int) -> Path:
    """The same set packed as `root/cifar-10-python.tar.gz`, like the official download."""
    staging = make_cifar(root / "staging", **kwargs)
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive
