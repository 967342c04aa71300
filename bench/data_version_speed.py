"""How long the data version takes: the first look hashes every increment file, later looks at
unchanged files read their digests from the cache (path, size, mtime). Target: an unchanged
60,000-image set in under 1 s.

    python bench/data_version_speed.py [--images 60000] [--rounds 3]

Writes a small base (tests/synthetic_cifar.py) and N distinct 32x32 PNG files in one increment,
then times `ct.data_version.compute` cold (no cache), warm (nothing changed) and after one image
changed, in this process.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ct import data_version  # noqa: E402
from tests.synthetic_cifar import make_cifar  # noqa: E402


def write_images(folder: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for n in range(count):
        path = folder / "train" / data_version.CLASSES[n % 10] / f"{n:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def timed(data: Path) -> tuple[float, data_version.DataVersion]:
    t0 = time.perf_counter()
    found = data_version.compute(data, cache_dir=data)
    return time.perf_counter() - t0, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=60_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ct-version-"))
    try:
        make_cifar(tmp / "data", per_batch=100, test=100)
        paths = write_images(tmp / "data" / "increments" / "bench", args.images)
        cold, found = timed(tmp / "data")
        print(f"{args.images} images, cold (every file hashed): {cold:.2f} s, "
              f"{found.hashed} hashed")
        for n in range(args.rounds):
            warm, found = timed(tmp / "data")
            print(f"unchanged, round {n + 1}: {warm:.2f} s, {found.hashed} hashed")
        Image.new("RGB", (32, 32), (1, 2, 3)).save(paths[0])
        changed, again = timed(tmp / "data")
        print(f"one image changed: {changed:.2f} s, {again.hashed} hashed, version "
              f"{'changed' if again.version != found.version else 'UNCHANGED (wrong)'}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
