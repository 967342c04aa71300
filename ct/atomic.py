"""Atomic writes: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


class WriteError(OSError):
    """Writing `target` failed. `reason` says why and names the culprit when it is another path
    (a parent that is a file, say), never one of our temp files, which the caller cannot know."""

    def __init__(self, target: Path, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.target = target
        culprit = None if cause.filename is None else Path(os.fsdecode(cause.filename))
        if cause.errno == errno.ENOTDIR:
            culprit = _file_in_the_way(target) or culprit
        elsewhere = culprit is not None and culprit.parent != target.parent
        self.reason = f"{self.strerror}: {culprit}" if elsewhere else str(self.strerror)

    def __str__(self) -> str:
        return f"{self.target}: {self.reason}"


def _file_in_the_way(target: Path) -> Path | None:
    """The outermost parent of `target` that exists but is not a folder (ENOTDIR's cause)."""
    for parent in reversed(target.parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def write_via(path: Path, write: Any) -> None:
    """Write through `write(tmp_path)` into a temp file beside `path`, fsync, then rename."""
    tmp = _stage(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _stage(path: Path, write: Callable[[Path], object]) -> Path:
    """A temp file beside `path` holding what `write(tmp)` put there, fsynced; not yet renamed."""
    _make_parent(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would, so the
        # results stay readable to whoever reads the workspace (Jenkins archiving, other users).
        os.chmod(tmp, 0o666 & ~_current_umask())
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        # A file sits where the folder must be; "file exists" would send the reader elsewhere.
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(path.parent)) from None


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make the renames in `folder` durable, so that after a crash a record never names a file
    whose own rename was lost. Best effort: some file systems refuse fsync on a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    write_via(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    write_via(Path(path), lambda tmp: tmp.write_bytes(data))


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def copy_file(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    write_via(Path(dst), lambda tmp: shutil.copyfile(src, tmp))


# ---------------------------------------------------------------- several files as one change


def write_files(files: Mapping[Path, bytes]) -> None:
    """Replace each file atomically and all of them as one change: when any cannot be written,
    every one keeps its old content (or stays absent). Raises WriteError naming the file."""
    old = {path: _old_content(path) for path in files}
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            staged.append((path, _stage_for(path, data)))
        _replace_all(staged, old)
    finally:
        for _, tmp in staged:
            tmp.unlink(missing_ok=True)  # gone already when renamed
    for folder in {path.parent for path in files}:
        _fsync_dir(folder)


def _old_content(path: Path) -> bytes | None:
    """What to put back if a later file of the same change fails; also finds a folder (or an
    unreadable file) in the way before anything is written."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise WriteError(path, err) from err


def _stage_for(path: Path, data: bytes) -> Path:
    try:
        return _stage(path, lambda tmp: tmp.write_bytes(data))
    except OSError as err:
        raise WriteError(path, err) from err


def _replace_all(staged: list[tuple[Path, Path]], old: Mapping[Path, bytes | None]) -> None:
    done: list[Path] = []
    for path, tmp in staged:
        try:
            os.replace(tmp, path)
        except OSError as err:
            _restore(done, old)
            raise WriteError(path, err) from err
        done.append(path)


def _restore(done: list[Path], old: Mapping[Path, bytes | None]) -> None:
    """Undo the renames already made. Best effort: the caller must see the first error, and a
    folder that took the new file a moment ago takes the old content back as well."""
    for path in reversed(done):
        content = old[path]
        try:
            if content is None:
                path.unlink()
            else:
                write_bytes(path, content)
        except OSError:
            pass


# ---------------------------------------------------------------- content-addressed files, links


def store_by_content(source: Path, folder: Path, prefix: str, suffix: str) -> tuple[Path, str]:
    """Copy `source` to folder/<prefix><sha256[:16]><suffix>; return that path and the sha256.
    The hash is taken from the bytes copied, so a source that changes under us is never stored
    under another content's name. Same content, same name: storing it again changes nothing."""
    digest = hashlib.sha256()

    def copy(tmp: Path) -> None:
        with open(source, "rb") as src, open(tmp, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                dst.write(block)

    incoming = folder / f"{prefix}incoming{suffix}"
    try:
        tmp = _stage(incoming, copy)
    except OSError as err:
        raise WriteError(incoming, err) from err
    stored = folder / f"{prefix}{digest.hexdigest()[:16]}{suffix}"
    try:
        os.replace(tmp, stored)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise WriteError(stored, err) from err
    _fsync_dir(folder)
    return stored, digest.hexdigest()


def is_incoming_leftover(name: str, prefix: str, suffix: str) -> bool:
    """A temp file store_by_content left behind when it was killed mid-copy."""
    return name.startswith(f".{prefix}incoming{suffix}.") and name.endswith(".tmp")


def replace_symlink(link: Path, target: str) -> None:
    """Point `link` at `target` in one step: a new link under a temp name, renamed over the old
    one, so a reader finds the old target or the new one, never no file at all."""
    tmp = _temp_symlink(link, target)
    try:
        os.replace(tmp, link)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise WriteError(link, err) from err
    _fsync_dir(link.parent)


def _temp_symlink(link: Path, target: str) -> Path:
    while True:
        tmp = link.with_name(f".{link.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.symlink(target, tmp)
            return tmp
        except FileExistsError:
            continue  # another writer's temp name; draw again
        except OSError as err:
            raise WriteError(link, err) from err
