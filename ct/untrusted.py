"""Files a training container could have written, read by the host and the service without
trusting them. Standard library only: the pipeline (host side) and ct.serving (the serving
image) both use it.

The container can write anything in the workspace: a symbolic link where a file or folder is
expected, a FIFO, a huge file, a path with '..' in a record. So a workspace file is opened by
walking from the workspace root (the operator's --workspace, trusted) one component at a time
with O_NOFOLLOW, each folder through the descriptor of the one before it: no symbolic link is
followed anywhere below the root, even if one is swapped in meanwhile. The file itself must be a
regular file (fstat on the open descriptor, so the file checked is the file read) no larger than
the caller's limit, and what is returned are the bytes read from that descriptor.

Folders the host writes into (models/, report/, outbox/) are checked the same way before each
write (`real_folder`); the writes themselves are ct.atomic's (a temp file renamed over the
target, which replaces a symbolic link rather than following it).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW
_FILE_FLAGS = os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0)  # a FIFO must not block us
MAX_HASHED = 8 << 30  # a hashed file (a model, an export) is streamed, not held: only the absurd


class UntrustedFile(Exception):
    """A name or file refused (or unreadable): `path` (None for a bad name) and `cause`, a few
    words; str() is one line, "path: cause"."""

    def __init__(self, path: Path | None, cause: str) -> None:
        super().__init__(cause if path is None else f"{path}: {cause}")
        self.path, self.cause = path, cause


class Missing(UntrustedFile):
    """The file (or a folder on its way) does not exist."""


def plain_name(name: str, prefix: str = "") -> str:
    """`name` without `prefix` when it has it, which must then be a plain file name (no
    folder, no '..', no leading dot)."""
    base = name[len(prefix):] if prefix and name.startswith(prefix) else name
    if not PLAIN.fullmatch(base) or ".." in base:
        raise UntrustedFile(None, f"{name!r} is not a plain file name in {prefix or 'the folder'}")
    return base


def inside(name: Any) -> tuple[str, ...]:
    """The components of `name`, a relative path that stays inside its root: a non-empty string
    with no absolute start, no '..', no control character; else UntrustedFile."""
    if not isinstance(name, str) or not name or any(ord(c) < 0x20 or c == "\x7f" for c in name):
        raise UntrustedFile(None, f"{str(name)[:80]!r} is not a file name")
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise UntrustedFile(None, f"{name[:80]!r} is not a path inside the workspace")
    return path.parts


def within(name: Any, folder: str) -> bool:
    """Whether `name` is a path inside `folder` (both relative to one root), checked as inside()."""
    try:
        parts = inside(name)
    except UntrustedFile:
        return False
    top = PurePosixPath(folder).parts
    return len(parts) > len(top) and parts[:len(top)] == top


def _why(err: OSError, path: Path) -> UntrustedFile:
    if err.errno in (errno.ELOOP, errno.EMLINK):  # FreeBSD says EMLINK for O_NOFOLLOW
        return UntrustedFile(path, "a symbolic link, refused")
    if err.errno == errno.ENOENT:
        return Missing(path, err.strerror or "missing")
    return UntrustedFile(path, err.strerror or str(err))


def _linked(err: OSError, name: str, at: int) -> OSError:
    """O_DIRECTORY on a symbolic link says ENOTDIR: say ELOOP then, for the message."""
    if err.errno == errno.ENOTDIR:
        try:
            if stat.S_ISLNK(os.lstat(name, dir_fd=at).st_mode):
                return OSError(errno.ELOOP, os.strerror(errno.ELOOP))
        except OSError:
            pass
    return err


def _relative(path: Path, root: Path) -> tuple[str, ...]:
    try:
        rel = Path(path).relative_to(root)
    except ValueError:
        raise UntrustedFile(path, f"not inside {root}") from None
    return inside(rel.as_posix()) if rel.parts else ()


def open_folder(root: Path, parts: tuple[str, ...] | str = (), create: bool = False) -> int:
    """A descriptor of root/parts (the caller closes it), reached without following a symbolic
    link below `root` (`create`: missing folders are made on the way). UntrustedFile (Missing)
    when it cannot be."""
    parts = inside(parts) if isinstance(parts, str) else parts
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as err:
        raise _why(err, Path(root)) from None
    try:
        for i, part in enumerate(parts):
            here = Path(root, *parts[:i + 1])
            if create:
                try:
                    os.mkdir(part, 0o777, dir_fd=fd)
                except FileExistsError:
                    pass
                except OSError as err:
                    raise _why(err, here) from None
            try:
                next_fd = os.open(part, _FOLDER_FLAGS, dir_fd=fd)
            except OSError as err:
                raise _why(_linked(err, part, fd), here) from None
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def folder(root: Path, parts: tuple[str, ...] | str = (), create: bool = False
           ) -> Iterator[int]:
    """open_folder as a context: the descriptor is closed on leaving it."""
    fd = open_folder(root, parts, create)
    try:
        yield fd
    finally:
        os.close(fd)


def real_folder(root: Path, name: str, create: bool = False) -> Path:
    """root/name, checked to be a folder with no symbolic link from `root` down (made when
    missing, with `create`): where the host may write. UntrustedFile when it is not."""
    with folder(root, name, create=create):
        return Path(root, *inside(name))


def open_in(at: int | None, name: str, path: Path, limit: int) -> int:
    """A descriptor of the regular file `name` in the folder `at` (a descriptor; None: `name`
    is a path, only its last component checked), at most `limit` bytes, not a link; `path` is
    what errors call it. The caller closes it."""
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=at)
    except OSError as err:
        raise _why(err, path) from None
    info = os.fstat(fd)
    problem = ("not a regular file" if not stat.S_ISREG(info.st_mode) else
               f"{info.st_size} bytes, over the {limit} allowed"
               if info.st_size > limit else "")
    if problem:
        os.close(fd)
        raise UntrustedFile(path, problem)
    return fd


@contextmanager
def opened(path: Path, limit: int, root: Path | None = None) -> Iterator[int]:
    """A descriptor of the regular file `path` (at most `limit` bytes), the symbolic links
    refused: every component below `root` when given (then `path` must be inside it), else the
    last one only (for a caller that checked the folder itself)."""
    path = Path(path)
    if root is None:
        fd = open_in(None, str(path), path, limit)
    else:
        parts = _relative(path, root)
        if not parts:
            raise UntrustedFile(path, "the workspace itself, not a file in it")
        with folder(root, parts[:-1]) as at:
            fd = open_in(at, parts[-1], path, limit)
    try:
        yield fd
    finally:
        os.close(fd)


def read_fd(fd: int, path: Path, limit: int) -> bytes:
    """At most `limit` bytes of an open file; a file that grew past it while read is refused."""
    chunks, size = [], 0
    while size <= limit:
        chunk = os.read(fd, min(1 << 20, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        raise UntrustedFile(path, f"grew over the {limit} bytes allowed while read")
    return b"".join(chunks)


def read_bytes(path: Path, limit: int, root: Path | None = None) -> bytes:
    """The bytes of the regular file `path`, opened as `opened` does; at most `limit` bytes (a
    larger file is refused, not cut). UntrustedFile (Missing) with one line otherwise."""
    with opened(path, limit, root) as fd:
        try:
            return read_fd(fd, Path(path), limit)
        except OSError as err:
            raise _why(err, Path(path)) from None


def read_text(path: Path, limit: int, root: Path | None = None) -> str:
    """read_bytes as UTF-8 text."""
    try:
        return read_bytes(path, limit, root).decode("utf-8")
    except UnicodeDecodeError:
        raise UntrustedFile(Path(path), "not UTF-8 text") from None


def read_json(path: Path, limit: int, root: Path | None = None) -> Any:
    """read_bytes parsed as JSON (any value; callers check its type and fields). The parser's
    complaint names a position, never the content."""
    text = read_text(path, limit, root)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UntrustedFile(Path(path), f"not valid JSON (line {err.lineno} column "
                            f"{err.colno}: {err.msg})") from None
    except RecursionError:
        raise UntrustedFile(Path(path), "nested too deeply to be read") from None


def sha256(path: Path, root: Path | None = None, limit: int = MAX_HASHED) -> str:
    """The hex sha256 of the regular file `path`, opened as `opened` does (a link's target's
    digest would tell whether a host file holds some content), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with opened(path, limit, root) as fd:
        try:
            for block in iter(lambda: os.read(fd, 1 << 20), b""):
                digest.update(block)
        except OSError as err:
            raise _why(err, Path(path)) from None
    return digest.hexdigest()
