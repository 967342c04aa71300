"""One way to turn an image file into what the network reads: uint8 (3, 32, 32) RGB, exactly as
the training data is made (ct.trainer.increments decodes labelled increments with it, the
service and `python -m ct.serving.predict` decode what they are asked about with it).

The decoding: Pillow opens the file, applies the EXIF orientation, converts to RGB (an alpha
channel is dropped, a palette or grey level expanded) and resizes with Lanczos to 32x32 unless it
is 32x32 already. `Limits` adds what a service facing strangers needs: the formats it accepts
and a largest pixel count, checked from the header BEFORE a pixel is decoded (a small file that
claims 20000x20000 pixels would take gigabytes). A truncated file always fails (this module never
sets Pillow's LOAD_TRUNCATED_IMAGES). Every failure is an ImageError with a one-line reason.

Pillow and numpy only: no torch (the serving image has none).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

SIZE = 32
# ImageError.kind: what went wrong, for a caller that maps it to an answer (HTTP status, say).
EMPTY, NOT_IMAGE, DAMAGED, TOO_LARGE = "empty", "not an image", "damaged", "too large"
UNREADABLE = "unreadable"  # the file system refused (no such file, no permission)


class ImageError(ValueError):
    """The image cannot be decoded. `kind` is one of the kinds above;
    `detail` is Pillow's own words (or ours), one line; str() is a one-line reason."""

    def __init__(self, kind: str, detail: str, advice: str) -> None:
        self.kind, self.detail = kind, " ".join(detail.split())
        super().__init__(f"{kind}: {self.detail}; {advice}")


@dataclass(frozen=True)
class Limits:
    """What an image must be to be decoded: `formats` the Pillow format names accepted (None:
    whatever Pillow reads), `max_pixels` the largest width * height (None: Pillow's own guard)."""

    formats: tuple[str, ...] | None = None
    max_pixels: int | None = None


# The service's defaults (its settings may lower or raise max_pixels).
SERVING = Limits(formats=("PNG", "JPEG"), max_pixels=4096 * 4096)
ANY = Limits()


def decode(source: bytes | str | os.PathLike[str], limits: Limits = ANY) -> np.ndarray:
    """The image in `source` (its bytes, or a path) as uint8 (3, 32, 32); ImageError else."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone in this process asked Pillow to guess pixels
        raise ImageError(DAMAGED, "Pillow is set to load truncated images",
                         "unset PIL.ImageFile.LOAD_TRUNCATED_IMAGES")
    opened_from = _opened_from(source)
    try:
        with Image.open(opened_from, formats=limits.formats) as image:
            _check_size(image, limits)
            image.load()  # decodes every byte now: a truncated file fails here
            rgb = (ImageOps.exif_transpose(image) or image).convert("RGB")
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own guard, inside Image.open
        limit = f"over the limit of {limits.max_pixels} pixels: " if limits.max_pixels else ""
        raise ImageError(TOO_LARGE, f"{limit}{exc}", "send a smaller image") from exc
    except Image.UnidentifiedImageError as exc:
        if limits.formats:
            wanted = " or ".join(limits.formats)
            raise ImageError(NOT_IMAGE, f"not a {wanted} file",
                             f"send a {wanted} image") from exc
        raise ImageError(NOT_IMAGE, "not a file Pillow can read", "send an image") from exc
    except OSError as exc:
        if exc.errno is None:  # Pillow's own OSErrors: a truncated or broken stream
            raise ImageError(DAMAGED, f"{type(exc).__name__}: {exc}",
                             "send the whole file, undamaged") from exc
        raise ImageError(UNREADABLE, f"{type(exc).__name__}: {exc.strerror}",
                         "check the path and its permissions") from exc
    except Exception as exc:  # Pillow raises SyntaxError, ValueError... for bad files
        raise ImageError(DAMAGED, f"{type(exc).__name__}: {exc}",
                         "send the whole file, undamaged") from exc
    if rgb.size != (SIZE, SIZE):
        rgb = rgb.resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).copy()


def _opened_from(source: bytes | str | os.PathLike[str]) -> io.BytesIO | str | os.PathLike[str]:
    """What Image.open reads; ImageError for no bytes at all (Pillow would call that
    'cannot identify', which sends the reader looking for a format problem)."""
    if isinstance(source, bytes):
        if not source:
            raise ImageError(EMPTY, "no bytes", "send a PNG or JPEG file")
        return io.BytesIO(source)
    try:
        empty = os.path.getsize(source) == 0
    except OSError as exc:
        raise ImageError(UNREADABLE, f"{type(exc).__name__}: {exc.strerror}",
                         "check the path") from exc
    if empty:
        raise ImageError(EMPTY, "the file is empty", "replace it with an image")
    return source


def _check_size(image: Image.Image, limits: Limits) -> None:
    """Refuse from the header alone: nothing is decoded yet when Image.open returns."""
    width, height = image.size
    if limits.max_pixels is not None and width * height > limits.max_pixels:
        raise ImageError(TOO_LARGE, f"{width}x{height} pixels is over the limit of "
                         f"{limits.max_pixels} pixels", "send a smaller image")
    if width < 1 or height < 1:
        raise ImageError(DAMAGED, f"{width}x{height} pixels", "send an image with pixels")

