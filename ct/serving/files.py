"""Reading files a container could have written (the models folder, serving/wanted.json)
without trusting their names: plain names only, no symbolic links followed, regular files only,
a size cap, and the bytes returned are the bytes the caller checks and uses."""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class UnsafeFile(Exception):
    """A name or file the service refuses to read; str() is one line."""


def plain_name(name: str, prefix: str = "") -> str:
    """`name` without `prefix` when it has it, which must then be a plain file name (no
    folder, no '..', no leading dot)."""
    base = name[len(prefix):] if prefix and name.startswith(prefix) else name
    if not PLAIN.fullmatch(base) or ".." in base:
        raise UnsafeFile(f"{name!r} is not a plain file name in {prefix or 'the folder'}")
    return base


def models_dir(workspace: Path) -> Path:
    """WS/models, which must be a real folder (a link could point the service anywhere)."""
    folder = workspace / "models"
    try:
        info = os.lstat(folder)
    except OSError as exc:
        raise UnsafeFile(f"{folder}: {exc.strerror}") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeFile(f"{folder} is not a folder (a symbolic link is refused)")
    return folder


def read_plain(path: Path, limit: int) -> bytes:
    """The bytes of the regular file `path`, opened without following a link there; at most
    `limit` bytes (a larger file is refused, not cut)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        why = "a symbolic link, refused" if exc.errno == errno.ELOOP else exc.strerror
        raise UnsafeFile(f"{path}: {why}") from exc
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFile(f"{path} is not a regular file")
        if info.st_size > limit:
            raise UnsafeFile(f"{path} has {info.st_size} bytes, over the {limit} allowed")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise UnsafeFile(f"{path} grew over the {limit} bytes allowed while read")
    return data
