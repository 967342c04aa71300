"""The CIFAR-10 test set, read for the pipeline's own measurement of a candidate
(ct.serving.measure): numpy and the standard library, no torch, no code from the data.

The test batch is a pickle (the official python-version layout). pickle.loads would import and
call whatever the file names, so it is read with RestrictedUnpickler, which resolves only the
globals a CIFAR batch holds (numpy's array reconstruction, ndarray, dtype, and bytes written by
protocol 2 as _codecs.encode(text, "latin1")) and refuses any other before anything is called.
Even those are checked: an array is reconstructed empty (its shape (0,), as numpy pickles it)
and filled from its state, a dtype is a plain integer type, the codec is latin-1. What is read
is then checked like the trainer checks it: uint8 (N, 3072) images, N labels in 0..9, each class
present, N within the expected count when one is given.

Read from a `cifar-10-batches-py/` folder or a `cifar-10-python.tar.gz` archive (in one pass,
member by member; no file is unpacked), or a folder holding either (the folder first, as
ct.workspace.dataset_source chooses). With `md5`, the archive's bytes must hash to it (the
official download's checksum), so that an archive anyone could have written is trusted by
content, not by place.
"""

from __future__ import annotations

import _codecs
import hashlib
import io
import pickle
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ct import workspace as names

TEST_BATCH = "test_batch"
MEMBER = f"{names.DATA_FOLDER}/{TEST_BATCH}"
MAX_BATCH_BYTES = 128 << 20  # the official test batch is 31 MB; a re-encoded one up to ~1.5x
NUM_CLASSES = 10
PIXELS = 3 * 32 * 32
OFFICIAL_MD5 = names.DATA_ARCHIVE_MD5  # of the archive the trainer downloads
INTEGER_DTYPES = frozenset({"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8"})


class TestSetError(Exception):
    """The test set is missing, not a CIFAR-10 test batch, or not what was expected; str() is
    one line."""


@dataclass(frozen=True)
class TestSet:
    images: np.ndarray  # uint8 (N, 3, 32, 32)
    labels: np.ndarray  # int64 (N,)
    source: Path  # the folder or archive read
    sha256: str  # of the test batch's bytes
    base_sha256: str  # the dataset's (ct.workspace.dataset_sha256: what data versions name)

    def __len__(self) -> int:
        return len(self.labels)


# ---------------------------------------------------------------- the restricted unpickler


def _numpy_reconstruct() -> Callable[..., Any]:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy 2
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


def _reconstruct(subtype: Any, shape: Any, dtype_code: Any) -> np.ndarray:
    """numpy's array reconstruction, for an empty ndarray only: the state fills it."""
    if subtype is not np.ndarray or tuple(shape) != (0,):
        raise pickle.UnpicklingError("an array reconstruction other than numpy's own")
    return _numpy_reconstruct()(np.ndarray, (0,), dtype_code)


def _dtype(code: Any, align: Any = False, copy: Any = False) -> np.dtype:
    text = code.decode("ascii", "replace") if isinstance(code, bytes) else code
    if not isinstance(text, str) or text not in INTEGER_DTYPES:
        raise pickle.UnpicklingError(f"a dtype other than a plain integer ({str(text)[:20]!r})")
    return np.dtype(text, align=bool(align), copy=bool(copy))


def _latin1(text: Any, encoding: Any = "utf-8") -> bytes:
    """Protocol 2's bytes: _codecs.encode(str, "latin1"); any other codec is refused."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("a codec call other than latin-1 bytes")
    return _codecs.encode(text, "latin1")


ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _latin1,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only ALLOWED's globals (a CIFAR batch's)."""

    def find_class(self, module: str, name: str) -> Any:
        found = ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(
                f"global {module[:60]}.{name[:60]} is not allowed in a CIFAR-10 batch")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed in a CIFAR-10 batch")


def unpickle(raw: bytes, name: str) -> dict[bytes, Any]:
    """A batch's dict, read by RestrictedUnpickler; TestSetError for anything else."""
    try:
        batch = RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise TestSetError(f"{name} refused: {exc}") from None
    except Exception as exc:  # a damaged pickle raises many types
        raise TestSetError(f"{name} is not a readable CIFAR-10 pickle "
                           f"({type(exc).__name__})") from None
    if not isinstance(batch, dict):
        raise TestSetError(f"{name} holds a {type(batch).__name__}, not a CIFAR-10 batch dict")
    return batch


def check_batch(batch: dict[bytes, Any], name: str, expect: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)); TestSetError naming what is wrong."""
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if not isinstance(data, np.ndarray) or not isinstance(labels, (list, np.ndarray)):
        raise TestSetError(f"{name} lacks b'data' (an array) or b'labels'; not a CIFAR-10 batch")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        raise TestSetError(f"{name}: data is {data.dtype} {data.shape}, not uint8 (N, {PIXELS})")
    if not _whole_numbers(labels):
        raise TestSetError(f"{name}: the labels are not a list of whole numbers")
    y = np.asarray(labels, dtype=np.int64)
    if len(y) != len(data) or not len(data):
        raise TestSetError(f"{name}: {len(y)} labels for {len(data)} images")
    if expect is not None and len(data) != expect:
        raise TestSetError(f"{name}: {len(data)} test images, not the {expect} expected")
    if y.min() < 0 or y.max() >= NUM_CLASSES:
        raise TestSetError(f"{name}: labels outside 0..{NUM_CLASSES - 1} "
                           f"({y.min()}..{y.max()})")
    missing = sorted(set(range(NUM_CLASSES)) - set(np.unique(y).tolist()))
    if missing:
        raise TestSetError(f"{name}: no test image of class(es) {missing}")
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32)), y


def _whole_numbers(labels: list[Any] | np.ndarray) -> bool:
    if isinstance(labels, np.ndarray):
        return labels.ndim == 1 and labels.dtype.kind in "iu"
    return all(isinstance(y, int) and not isinstance(y, bool) for y in labels)


# ---------------------------------------------------------------- where the batch is read


def locate(data: Path) -> Path:
    """The folder or archive `data` names or holds (the folder first, as the trainer)."""
    found = names.dataset_source(data)
    if found is None:
        raise TestSetError(f"no CIFAR-10 in {data}: expected {names.DATA_FOLDER}/ or "
                           f"{names.DATA_ARCHIVE} there")
    return found


def _read_capped(handle: BinaryIO, name: str) -> bytes:
    raw = handle.read(MAX_BATCH_BYTES + 1)
    if len(raw) > MAX_BATCH_BYTES:
        raise TestSetError(f"{name} is over {MAX_BATCH_BYTES >> 20} MiB: not a CIFAR-10 batch")
    return raw


def _from_folder(folder: Path) -> bytes:
    path = folder / TEST_BATCH
    try:
        with open(path, "rb") as handle:
            return _read_capped(handle, str(path))
    except OSError as exc:
        raise TestSetError(f"cannot read {path} ({exc.strerror or exc})") from None


class _Hashing(io.RawIOBase):
    """The archive's bytes as they are read, hashed on the way (one pass: md5 and members)."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle, self.md5 = handle, hashlib.md5(usedforsecurity=False)
        self.sha256 = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self.handle.read(len(buffer))
        self.md5.update(chunk)
        self.sha256.update(chunk)
        buffer[:len(chunk)] = chunk
        return len(chunk)


def _from_archive(archive: Path, md5: str | None) -> tuple[bytes, str]:
    """The test batch's bytes and the archive's sha256 (one pass over it)."""
    raw: bytes | None = None
    try:
        with open(archive, "rb") as handle:
            stream = _Hashing(handle)
            with tarfile.open(fileobj=io.BufferedReader(stream), mode="r|gz") as tar:
                for member in tar:  # a stream: each member once, in order
                    if member.name in (MEMBER, f"./{MEMBER}") and member.isfile():
                        if raw is not None:
                            raise TestSetError(f"{archive} holds {MEMBER} twice")
                        extracted = tar.extractfile(member)
                        assert extracted is not None  # a regular member always has one
                        raw = _read_capped(extracted, f"{archive}:{MEMBER}")
            while stream.readinto(bytearray(1 << 20)):  # the rest, for the checksum
                pass
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise TestSetError(f"{archive} is not a readable tar.gz ({exc})") from None
    if md5 is not None and stream.md5.hexdigest() != md5:
        raise TestSetError(f"{archive} has md5 {stream.md5.hexdigest()}, not {md5}: not the "
                           "archive expected")
    if raw is None:
        raise TestSetError(f"{archive} lacks {MEMBER}")
    return raw, stream.sha256.hexdigest()


def read_test_set(data: Path, expect: int | None = None, md5: str | None = None) -> TestSet:
    """The checked test set of the CIFAR-10 in `data` (a folder or an archive, or one holding
    either); with `md5`, only an archive of that checksum."""
    source = locate(data)
    if source.is_dir():
        if md5 is not None:
            raise TestSetError(f"{source} is a folder: only an archive can be checked against "
                               "an md5")
        raw = _from_folder(source)
        try:
            digest = names.dataset_sha256(source)
        except OSError as exc:
            raise TestSetError(f"cannot read {exc.filename} to hash the dataset "
                               f"({exc.strerror})") from None
    else:
        raw, digest = _from_archive(source, md5)
    images, labels = check_batch(unpickle(raw, TEST_BATCH), TEST_BATCH, expect)
    return TestSet(images, labels, source, hashlib.sha256(raw).hexdigest(), digest)
