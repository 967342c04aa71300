"""A POST /predict body as a list of (file name, bytes), with the limits enforced while it is
read: a body over max_bytes is refused when its byte max_bytes + 1 arrives (or at once when its
Content-Length says so), never held whole first; a multipart body may hold at most max_images
files. Every refusal is a Refused(status, one line).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

IMAGE_TYPES = ("image/png", "image/jpeg", "application/octet-stream")
MULTIPART = "multipart/form-data"
PART = "image"
# After a refusal the rest of an over-large body is read and dropped (a client still sending
# would otherwise see a reset instead of the 413), up to this many bytes, then the connection
# is let go.
DRAIN_BYTES = 64 << 20


class Refused(Exception):
    """The request cannot be answered as asked: HTTP `status`, one-line `reason`."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


class TooLarge(Exception):
    pass


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def images_of(request: Request, max_bytes: int, max_images: int
                    ) -> list[tuple[str | None, bytes]]:
    """The images a request sends: one body (file name None), or multipart parts named
    'image'. Refused for a wrong content type (415), too many bytes or files (413), an empty
    body or a malformed form (400)."""
    kind = media_type(request)
    if kind not in (*IMAGE_TYPES, MULTIPART):
        shown = kind or "no Content-Type"
        raise Refused(415, f"{shown} is not accepted: send image/png, image/jpeg or "
                      f"application/octet-stream, or {MULTIPART} with parts named '{PART}'")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        await _drain(request)
        raise Refused(413, f"the body has {declared} bytes, over the limit of {max_bytes} "
                      "(CT_SERVE_MAX_BYTES); send a smaller image")
    try:
        if kind == MULTIPART:
            return await _parts(request, max_bytes, max_images)
        body = b"".join([chunk async for chunk in _limited(request, max_bytes)])
    except TooLarge:
        await _drain(request)
        raise Refused(413, f"the body is over the limit of {max_bytes} bytes "
                      "(CT_SERVE_MAX_BYTES); send a smaller image") from None
    except ClientDisconnect:
        raise Refused(400, "the client went away before the body ended") from None
    if not body:
        raise Refused(400, "the body is empty: send the image's bytes")
    return [(None, body)]


async def _limited(request: Request, max_bytes: int) -> AsyncIterator[bytes]:
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > max_bytes:
            raise TooLarge
        yield chunk


async def _drain(request: Request) -> None:
    dropped = 0
    try:
        async for chunk in request.stream():
            dropped += len(chunk)
            if dropped > DRAIN_BYTES:
                return
    except (ClientDisconnect, RuntimeError):  # gone, or nothing left to read
        return


async def _parts(request: Request, max_bytes: int, max_images: int
                 ) -> list[tuple[str | None, bytes]]:
    parser = MultiPartParser(request.headers, _limited(request, max_bytes),
                             max_files=max_images, max_fields=16)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if "Too many files" in exc.message:
            raise Refused(413, f"more than {max_images} files in one request "
                          "(CT_SERVE_MAX_IMAGES); send fewer at a time") from None
        raise Refused(400, f"the form cannot be read: {exc.message}") from None
    try:
        found = form.getlist(PART)
        if not found:
            raise Refused(400, f"the form has no part named '{PART}': send each image as a "
                          f"file part named '{PART}'")
        if not all(isinstance(part, UploadFile) for part in found):
            raise Refused(400, f"a part named '{PART}' is a text field, not a file")
        return [(part.filename or f"{PART}-{i}", await part.read())
                for i, part in enumerate(found, 1) if isinstance(part, UploadFile)]
    finally:
        await form.close()
