"""The data a run trains on, and its version: the CIFAR-10 base plus labelled increments.

Standard library only: the trainer (in the container) records the version of what it reads, and
host tools (`python3 -m ct.pipeline.lineage --verify`, a change check) recompute it. The layout
(docs/data.md):

    <data dir>/increments/<name>/train/<class>/<image>    added to the training set
    <data dir>/increments/<name>/test/<class>/<image>     added to the test set (optional)

with <class> one of CLASSES and <image> a file named *.png, *.jpg, *.jpeg, *.bmp, *.gif or *.webp
(any case). Names starting with "." are left out everywhere (editors' and file managers' files).

The data version is one sha256 over the base dataset's sha256 (ct.workspace.dataset_sha256) and,
sorted, one entry `split/class/sha256(file bytes)` per increment image: it does not depend on
the order files are listed in, nor on the names of files or increments, and changes with any
byte of any image. The per-file digests are cached in the data cache folder (HASH_CACHE) under
each file's path relative to the increments folder, its size and modification time, so checking
an unchanged set of 60,000 images reads none of them again. The test version (test_version) is the
same digest over the test images' entries alone: the identity of the test set, the one thing two
accuracies must share to be compared (ct.pipeline.promote).

    python3 -m ct.data_version --data-dir D [--increments I] [--cache-dir C] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from ct import atomic
from ct import workspace as names

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")  # CIFAR-10's label order: an increment's class folder names its label
SPLITS = ("train", "test")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
INCREMENTS_DIR = "increments"  # in the data dir: the default increments folder

# In the data cache folder (the workspace's data/), beside the base dataset's caches:
HASH_CACHE = "increments-sha256.json"  # each increment file's sha256, by path, size and mtime
DECODED_CACHE = "increments-uint8.npz"  # the trainer's decoded increments, keyed by the version

_FORMAT = "ct-data-version 1"  # first line of what the version hashes: a new scheme, new versions


class DataVersionError(ValueError):
    """The data or the increments folder is not as documented; one line naming the file and
    what to do."""


class IncrementImage(NamedTuple):
    """One image of an increment: where it is (root/rel, rel being <increment>/<split>/<class>/
    <file>), its label and what its bytes hash to. A tuple of strings: tens of thousands are
    listed on every run, which Path objects would slow to seconds."""

    root: Path  # the increments folder
    rel: str
    label: int  # index into CLASSES
    sha256: str

    @property
    def increment(self) -> str:
        return self.rel.split("/", 1)[0]

    @property
    def split(self) -> str:
        return self.rel.split("/", 2)[1]

    @property
    def path(self) -> Path:
        return self.root / self.rel

    @property
    def entry(self) -> str:
        """What the version covers of this image: neither its file name nor its increment's."""
        return f"{self.split}/{CLASSES[self.label]}/{self.sha256}"


@dataclass(frozen=True)
class DataVersion:
    version: str
    base_sha256: str
    increments_dir: Path | None  # None: no increments folder
    increments: tuple[str, ...]  # names, sorted
    images: tuple[IncrementImage, ...]  # sorted by increment, split, class and file name
    hashed: int = 0  # files whose bytes were read to compute it (the others: from the cache)

    def counts(self) -> dict[str, dict[str, int]]:
        """{increment name: {"train": images, "test": images}}."""
        counts = {name: dict.fromkeys(SPLITS, 0) for name in self.increments}
        for image in self.images:
            counts[image.increment][image.split] += 1
        return counts

    def describe(self) -> dict[str, Any]:
        """The version and the increments' image counts, as the CLI's --json prints them."""
        counts = self.counts()
        return {"data_version": self.version, "base_sha256": self.base_sha256,
                "increments_dir": None if self.increments_dir is None else str(
                    self.increments_dir),
                "increments": counts,
                "increment_train": sum(c["train"] for c in counts.values()),
                "increment_test": sum(c["test"] for c in counts.values())}


def version_of(base_sha256: str, entries: Sequence[str]) -> str:
    """The data version of a base dataset digest and the increment images' entries, in any
    order (IncrementImage.entry)."""
    digest = hashlib.sha256(f"{_FORMAT}\nbase {base_sha256}\n".encode())
    for entry in sorted(entries):
        digest.update(f"{entry}\n".encode())
    return digest.hexdigest()


def test_version(dv: DataVersion) -> str:
    """The identity of the test set that runs on `dv` are measured on: the data version of the
    base and the increments' test images alone (version_of over the "test" entries), so runs
    with equal test versions were tested on the very same images whatever they trained on. With
    no increment test image it is version_of(base, []), the base's own data version: a record
    from before test versions (its lineage's dataset_sha256, no increment test image) names its
    test set too. Accuracies are comparable only between equal test versions."""
    return version_of(dv.base_sha256, [image.entry for image in dv.images
                                       if image.split == "test"])


def increments_folder(data_dir: Path, given: Path | None) -> Path | None:
    """The increments folder to read: `given` (which must be a folder), else the data dir's
    increments/ when there is one; None: no increments."""
    if given is None:
        default = Path(data_dir) / INCREMENTS_DIR
        return default if default.is_dir() else None
    if not Path(given).is_dir():
        raise DataVersionError(f"--increments {given} is not a folder; give the folder that "
                               "holds the increments, or leave --increments out")
    return Path(given)


class _Listed(NamedTuple):
    rel: str  # <increment>/<split>/<class>/<file>
    label: int
    size: int
    mtime_ns: int


def _visible(folder: str) -> list[os.DirEntry[str]]:
    with os.scandir(folder) as entries:
        return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def list_increments(folder: Path) -> list[_Listed]:
    """Every increment image under `folder`, checked against the layout; DataVersionError for
    anything else in it (a stray file, an unknown split or class, a non-image, an increment
    without a single image)."""
    listed: list[_Listed] = []
    for increment in _visible(str(folder)):
        if not increment.is_dir():
            raise DataVersionError(f"{increment.path} is a file; only increment folders belong "
                                   f"in {folder}: move it into <name>/train/<class>/ or remove it")
        found = len(listed)
        for split in _visible(increment.path):
            if split.name not in SPLITS or not split.is_dir():
                raise DataVersionError(f"{split.path}: an increment holds only train/ and test/ "
                                       "folders; rename or remove it")
            for cls in _visible(split.path):
                if not cls.is_dir():
                    raise DataVersionError(f"{cls.path}: images go into a class folder, "
                                           f"{split.name}/<class>/; move it there or remove it")
                if cls.name not in CLASSES:
                    raise DataVersionError(
                        f"{cls.path} is not a class folder (one of {', '.join(CLASSES)}); "
                        "rename it to its class or remove it")
                prefix = f"{increment.name}/{split.name}/{cls.name}/"
                listed += _class_images(prefix, CLASSES.index(cls.name), cls.path)
        if len(listed) == found:
            raise DataVersionError(f"{increment.path} is an empty increment (no image in "
                                   "train/<class>/ or test/<class>/); add images or remove it")
    return listed


def _class_images(prefix: str, label: int, folder: str) -> list[_Listed]:
    images = []
    for entry in _visible(folder):
        if not entry.is_file() or entry.name[entry.name.rfind("."):].lower() not in IMAGE_SUFFIXES:
            raise DataVersionError(
                f"{entry.path} is not an image file ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                "remove it from the class folder")
        stat = entry.stat()
        images.append(_Listed(prefix + entry.name, label, stat.st_size, stat.st_mtime_ns))
    return images


def file_sha256s(listed: Sequence[_Listed], root: Path, cache_dir: Path | None
                 ) -> tuple[list[str], int]:
    """The sha256 of each listed file's bytes, and how many were hashed (not from the cache).
    The cache (cache_dir/HASH_CACHE) keeps the files of this listing only, and is rewritten
    (atomically) only when something changed."""
    cache = None if cache_dir is None else Path(cache_dir) / HASH_CACHE
    known = _read_hash_cache(cache)
    fresh: dict[str, list[Any]] = {}
    digests, hashed = [], 0
    for item in listed:
        saved = known.get(item.rel)
        if saved is not None and saved[0] == item.size and saved[1] == item.mtime_ns:
            fresh[item.rel] = saved
            digests.append(saved[2])
            continue
        path = root / item.rel
        try:
            digest = names.hash_files([path])
        except OSError as exc:
            raise DataVersionError(f"cannot read {path} ({exc.strerror}); make it "
                                   "readable or remove it") from exc
        hashed += 1
        fresh[item.rel] = [item.size, item.mtime_ns, digest]
        digests.append(digest)
    # rewritten only when a file was hashed or one the cache knew is gone
    if cache is not None and (hashed or len(fresh) != len(known)):
        try:
            atomic.write_text(cache, json.dumps({"format": 1, "files": fresh}) + "\n")
        except OSError:
            pass  # a read-only cache folder only costs the hashing next time
    return digests, hashed


def _read_hash_cache(cache: Path | None) -> dict[str, list[Any]]:
    if cache is None:
        return {}
    try:
        saved = json.loads(cache.read_text(encoding="utf-8"))
        files = saved["files"] if saved.get("format") == 1 else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # no cache, or a damaged one: hash again
    if not isinstance(files, dict):
        return {}
    return {rel: value for rel, value in files.items()
            if isinstance(value, list) and len(value) == 3 and isinstance(value[2], str)
            and len(value[2]) == 64}


def base_sha256(source: Path, cache_dir: Path | None = None) -> tuple[str, bool]:
    """(ct.workspace.dataset_sha256 of `source`, whether it came from the cache). With
    `cache_dir`, the digest is kept in cache_dir/DATA_HASH_CACHE under the files' paths, sizes
    and modification times: later runs (and this CLI) on the same files do not read them
    again. Raises OSError when a file is unreadable."""
    files = names.dataset_files(source)
    key = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    cache = Path(cache_dir) / names.DATA_HASH_CACHE if cache_dir is not None else None
    if cache is not None:
        try:
            saved = json.loads(cache.read_text(encoding="utf-8"))
            if saved["key"] == key and len(saved["sha256"]) == 64:
                return str(saved["sha256"]), True
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no cache, another source's, or a damaged one: hash again
    digest = names.dataset_sha256(source)  # the host's --verify hashes with the same code
    if cache is not None:
        try:
            atomic.write_json(cache, {"key": key, "sha256": digest})
        except OSError:
            pass  # a read-only data folder only costs the hashing next time
    return digest, False


def compute(data_dir: Path, increments: Path | None = None, *, base: str | None = None,
            cache_dir: Path | None = None) -> DataVersion:
    """The data version of the base dataset in `data_dir` plus the increments (`increments`,
    else data_dir/increments when it exists). `base`: the base dataset's sha256 when the caller
    has it already (the trainer does); `cache_dir`: where the digests are cached (None: hash
    every file). DataVersionError (one line) for data that is missing or not as documented."""
    folder = increments_folder(data_dir, increments)
    if base is None:
        source = names.dataset_source(Path(data_dir))
        if source is None:
            raise DataVersionError(f"no {names.DATA_FOLDER}/ or {names.DATA_ARCHIVE} in "
                                   f"{data_dir}; check --data-dir")
        try:
            base, _ = base_sha256(source, cache_dir)
        except OSError as exc:
            raise DataVersionError(f"cannot read {exc.filename} to hash the dataset "
                                   f"({exc.strerror})") from exc
    if folder is None:
        return DataVersion(version_of(base, []), base, None, (), ())
    listed = list_increments(folder)
    digests, hashed = file_sha256s(listed, folder, cache_dir)
    images = tuple(IncrementImage(folder, item.rel, item.label, digest)
                   for item, digest in zip(listed, digests, strict=True))
    return DataVersion(version_of(base, [image.entry for image in images]), base, folder,
                       tuple(sorted({image.increment for image in images})), images, hashed)


def summary(metrics: Mapping[str, Any]) -> str:
    """A run's data in one line, from its metrics.json (`data_version`, `data`), for the mail and
    the report: "3f2a... (40000 + 10000 train, 10000 + 0 test images)"."""
    version, data = metrics.get("data_version"), metrics.get("data")
    if not version:
        return "not recorded"
    if not isinstance(data, dict):
        return str(version)
    return (f"{version} ({data.get('base_train')} + {data.get('increment_train')} train, "
            f"{data.get('base_test')} + {data.get('increment_test')} test images)")


def describe_lines(described: Mapping[str, Any]) -> list[str]:
    """DataVersion.describe() for people: the version first, then one line per increment."""
    lines = [f"data version {described['data_version']}",
             f"base sha256 {described['base_sha256']}"]
    for name, counts in described["increments"].items():
        lines.append(f"increment {name}: {counts['train']} train, {counts['test']} test images")
    where = described["increments_dir"] or "no increments folder"
    lines.append(f"increments: {len(described['increments'])} ({where}), "
                 f"{described['increment_train']} train, {described['increment_test']} test "
                 "images")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ct.data_version", description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True,
                        help=f"the folder with {names.DATA_FOLDER}/ or {names.DATA_ARCHIVE}")
    parser.add_argument("--increments", type=Path,
                        help=f"the increments folder (default: DATA_DIR/{INCREMENTS_DIR}, if any)")
    parser.add_argument("--cache-dir", type=Path,
                        help="where the file digests are cached (default: DATA_DIR)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    cache_dir = args.cache_dir if args.cache_dir is not None else args.data_dir
    try:
        described = compute(args.data_dir, args.increments, cache_dir=cache_dir).describe()
    except DataVersionError as err:
        print(f"ct.data_version: {err}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps(described, sort_keys=True) if args.json else
          "\n".join(describe_lines(described)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
