"""Reading files a container could have written (the models folder, serving/wanted.json)
without trusting their names: the service's view of ct.untrusted (plain names only, no symbolic
links followed, regular files only, a size cap; the bytes returned are the bytes the caller
checks and uses)."""

from __future__ import annotations

from pathlib import Path

from ct import untrusted
from ct.untrusted import PLAIN, plain_name

__all__ = ["PLAIN", "UnsafeFile", "models_dir", "plain_name", "read_plain"]

UnsafeFile = untrusted.UntrustedFile  # a name or file the service refuses to read


def models_dir(workspace: Path) -> Path:
    """WS/models, which must be a real folder (a link could point the service anywhere)."""
    return untrusted.real_folder(workspace, "models")


def read_plain(path: Path, limit: int) -> bytes:
    """The bytes of the regular file `path`, opened without following a link there; at most
    `limit` bytes (a larger file is refused, not cut)."""
    return untrusted.read_bytes(path, limit)
