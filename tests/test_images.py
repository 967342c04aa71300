"""ct.images: any PNG/JPEG (and, for training increments, what Pillow reads) becomes the
network's uint8 (3, 32, 32) as the training data is made; the limits a service needs hold
before a pixel is decoded; every failure is an ImageError of one line."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from ct import images
from ct.images import SERVING, ImageError, Limits, decode


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    return rgb.convert(mode)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data)))


def png_header(width: int, height: int) -> bytes:
    """An 8-bit RGB PNG that claims that size and holds 100 bytes of pixel data: its header
    is all a decoder may look at before it refuses."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(bytes(100))) + png_chunk(b"IEND", b""))


def with_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """A real JPEG whose frame header (SOF0) claims another size."""
    at = data.index(b"\xff\xc0")
    return data[:at + 5] + struct.pack(">HH", height, width) + data[at + 9:]


# ---------------------------------------------------------------- what comes out


def test_the_training_decoding_for_every_mode_and_size() -> None:
    exact = noise((32, 32))
    assert np.array_equal(decode(encoded(exact, "PNG")),
                          np.asarray(exact).transpose(2, 0, 1)), "32x32 is left as it is"
    odd = noise((47, 13), "RGBA", 1)
    expected = odd.convert("RGB").resize((32, 32), Image.Resampling.LANCZOS)
    assert np.array_equal(decode(encoded(odd, "PNG")), np.asarray(expected).transpose(2, 0, 1))
    for image, fmt in ((noise((1, 1)), "PNG"), (noise((500, 300)), "JPEG"),
                       (noise((13, 47), "L"), "PNG"), (noise((40, 30), "P"), "PNG"),
                       (noise((33, 31), "CMYK"), "JPEG"), (noise((64, 64), "LA"), "PNG"),
                       (noise((20, 20), "I;16"), "PNG"), (noise((50, 40), "1"), "PNG")):
        out = decode(encoded(image, fmt), SERVING)
        assert out.shape == (3, 32, 32) and out.dtype == np.uint8, (image.mode, image.size)
        assert out.flags.c_contiguous


def test_grey_and_palette_expand_to_three_equal_or_looked_up_channels() -> None:
    grey = decode(encoded(noise((13, 47), "L"), "PNG"))
    assert np.array_equal(grey[0], grey[1]) and np.array_equal(grey[1], grey[2])
    palette = noise((32, 32), "P", 3)
    assert np.array_equal(decode(encoded(palette, "PNG")),
                          np.asarray(palette.convert("RGB")).transpose(2, 0, 1))


def test_exif_orientation_is_applied() -> None:
    """64 wide, red left half, blue right half, EXIF 6 (shown turned 90 degrees clockwise):
    the picture as shown has red on top."""
    picture = Image.new("RGB", (64, 32), (0, 0, 255))
    picture.paste((255, 0, 0), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode(encoded(picture, "JPEG", exif=exif, quality=95)).astype(int)
    top, bottom = out[:, :10], out[:, -10:]
    assert top[0].mean() > 200 and top[2].mean() < 60, "red on top"
    assert bottom[2].mean() > 200 and bottom[0].mean() < 60, "blue below"


def test_bytes_and_paths_decode_alike_and_increments_use_this_decoding(tmp_path: Path) -> None:
    from ct.trainer.increments import decode as increment_decode

    for name, image, fmt in (("a.png", noise((70, 20), "RGBA"), "PNG"),
                             ("b.jpg", noise((33, 33)), "JPEG")):
        path = tmp_path / name
        path.write_bytes(encoded(image, fmt))
        assert np.array_equal(decode(path), decode(path.read_bytes()))
        assert np.array_equal(increment_decode(path), decode(path))


# ---------------------------------------------------------------- limits and refusals


def test_a_decompression_bomb_is_refused_from_its_header() -> None:
    """A PNG header claiming 20000x20000 pixels (400 million, 1.2 GB of RGB) holds no pixel
    data at all: refused as too large, not as damaged, so the size was checked first."""
    bomb = png_header(20000, 20000)
    for limits in (SERVING, Limits(max_pixels=10**6)):
        with pytest.raises(ImageError) as caught:
            decode(bomb, limits)
        assert caught.value.kind == images.TOO_LARGE, caught.value
        assert "over the limit of" in str(caught.value) and "\n" not in str(caught.value)
    # just over the service's limit, still only a header
    with pytest.raises(ImageError, match="4097x4096 pixels is over the limit"):
        decode(png_header(4097, 4096), SERVING)
    # a real JPEG whose frame header lies about its size, refused from the header: its pixels are
    # never decoded (a decode would fail on the truncated data, not on the size)
    jpeg = with_jpeg_size(encoded(noise((64, 64)), "JPEG"), 30000, 30000)
    with pytest.raises(ImageError) as caught:
        decode(jpeg, SERVING)
    assert caught.value.kind == images.TOO_LARGE


def test_without_a_limit_pillow_guards_against_bombs_itself() -> None:
    with pytest.raises(ImageError) as caught:
        decode(png_header(20000, 20000))
    assert caught.value.kind == images.TOO_LARGE


def test_the_service_reads_png_and_jpeg_only_training_reads_more() -> None:
    for fmt in ("GIF", "BMP", "WEBP", "TIFF"):
        data = encoded(noise((40, 40)), fmt)
        assert decode(data).shape == (3, 32, 32), fmt
        with pytest.raises(ImageError) as caught:
            decode(data, SERVING)
        assert caught.value.kind == images.NOT_IMAGE
        assert str(caught.value) == ("not an image: not a PNG or JPEG file; send a PNG or JPEG "
                                     "image")


BAD: dict[str, tuple[bytes, str]] = {
    "empty": (b"", images.EMPTY),
    "text": (b"this is not an image\n" * 10, images.NOT_IMAGE),
    "truncated png": (encoded(noise((64, 64)), "PNG")[:-300], images.DAMAGED),
    "truncated jpeg": (encoded(noise((64, 64)), "JPEG")[:400], images.DAMAGED),
    "png signature only": (b"\x89PNG\r\n\x1a\n", images.DAMAGED),
    "zero-sized png": (png_header(0, 10), images.DAMAGED),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_bytes_are_one_line_errors(case: str) -> None:
    data, kind = BAD[case]
    with pytest.raises(ImageError) as caught:
        decode(data, SERVING)
    error = caught.value
    assert error.kind in (kind, images.NOT_IMAGE if kind == images.DAMAGED else kind), error
    assert "\n" not in str(error) and str(error).startswith(error.kind), error
    assert "0x" not in str(error), "no object addresses in a reason"


def test_truncated_images_fail_even_if_someone_asked_pillow_to_guess(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    good = encoded(noise((40, 40)), "PNG")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageError, match="LOAD_TRUNCATED_IMAGES"):
        decode(good)


def test_files_that_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as caught:
        decode(tmp_path / "missing.png")
    assert caught.value.kind == images.UNREADABLE
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError) as caught:
        decode(tmp_path / "empty.png")
    assert caught.value.kind == images.EMPTY
