"""Read a /classify request body into image uploads, enforcing the byte limits while the bytes arrive.

FastAPI's File() parameters would spool the whole body before the handler runs; reading request.stream()
ourselves lets a 2 GB upload be refused with 413 after max_upload_bytes, not after 2 GB.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from app.errors import (
    ServiceError,
    client_disconnected,
    malformed_multipart,
    no_images,
    too_many_files,
    unsupported_type,
    upload_too_large,
    wrong_field,
)

if TYPE_CHECKING:  # python_multipart declares its callbacks TypedDict for type checkers only
    from python_multipart.multipart import MultipartCallbacks

FILE_FIELD = "file"
_MULTIPART_OVERHEAD = 16 * 1024  # boundaries and part headers per file, generously
_MAX_FIELD_BYTES = 64 * 1024  # non-file form fields are ignored, but not read without bound either


@dataclass
class Upload:
    data: bytes
    filename: str | None = None  # multipart only: a raw body has no name


def _is_image_type(content_type: str) -> bool:
    return content_type.startswith("image/")


def _check_part_type(content_type: str | None, filename: str | None) -> None:
    # Browsers and curl send image/*; tools that don't know the type send application/octet-stream. Anything
    # else (text/plain, application/pdf) was declared as not an image by the client itself.
    if content_type and not (_is_image_type(content_type) or content_type == "application/octet-stream"):
        raise unsupported_type(f"{filename or 'the upload'} was sent as {content_type}; send images (image/*)")


@dataclass
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    name: str | None = None
    filename: str | None = None
    content_type: str | None = None
    data: bytearray = field(default_factory=bytearray)


class _MultipartCollector:
    """Callbacks for python-multipart's streaming parser; keeps the `file` parts, checks limits per chunk."""

    def __init__(self, max_bytes: int, max_files: int, on_image: Callable[[int], None] | None = None) -> None:
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.on_image = on_image
        self.files: list[Upload] = []
        self._part: _Part | None = None
        self._field = b""
        self._value = b""

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": lambda d, s, e: setattr(self, "_field", self._field + d[s:e]),
            "on_header_value": lambda d, s, e: setattr(self, "_value", self._value + d[s:e]),
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def on_part_begin(self) -> None:
        self._part = _Part()

    def on_header_end(self) -> None:
        assert self._part is not None
        self._part.headers[self._field.decode("latin-1").lower()] = self._value.decode("latin-1")
        self._field, self._value = b"", b""

    def on_headers_finished(self) -> None:
        part = self._part
        assert part is not None
        _, options = parse_options_header(part.headers.get("content-disposition", ""))
        part.name = options.get(b"name", b"").decode("utf-8", "replace") or None
        filename = options.get(b"filename")
        part.filename = filename.decode("utf-8", "replace") if filename is not None else None
        ctype, _ = parse_options_header(part.headers.get("content-type", ""))
        part.content_type = ctype.decode("latin-1").lower() or None
        if part.name == FILE_FIELD:
            if len(self.files) >= self.max_files:
                raise too_many_files(self.max_files)
            _check_part_type(part.content_type, part.filename)
            if self.on_image is not None:  # admission: may refuse (429) before this image's bytes are read
                self.on_image(len(self.files) + 1)
        elif part.filename is not None or (part.content_type and _is_image_type(part.content_type)):
            # A file under another name (`image`, `images`, `files`, ...) is a client using the wrong field, not an
            # oversized form field: say which field to use before reading its bytes. Refused rather than accepted
            # so that one request never has two ways to carry its images.
            raise wrong_field(part.name, FILE_FIELD)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        assert part is not None
        part.data += data[start:end]
        limit = self.max_bytes if part.name == FILE_FIELD else _MAX_FIELD_BYTES
        if len(part.data) > limit:
            what = f"image {part.filename or len(self.files) + 1}" if part.name == FILE_FIELD else "a form field"
            raise upload_too_large(f"{what} is over the {limit} byte limit; send a smaller image")

    def on_part_end(self) -> None:
        part = self._part
        if part is not None and part.name == FILE_FIELD:
            self.files.append(Upload(bytes(part.data), part.filename))
        self._part = None


@dataclass(frozen=True)
class DeclaredBody:
    """What a request's headers say about its body, once they passed the checks headers alone allow."""

    boundary: bytes | None  # multipart's; None: one raw image/* body
    length: int | None  # the declared Content-Length


def check_headers(request: Request, max_bytes: int, max_files: int) -> DeclaredBody:
    """Refuse from the headers alone a body that cannot be served whatever the load: a type we don't read (415),
    multipart without a boundary (400), a declared Content-Length over the byte limits (413). The route calls this
    before admission, so such a request is told what is wrong, not to retry later (429)."""
    raw_type, params = parse_options_header(request.headers.get("content-type", ""))
    content_type = raw_type.decode("latin-1").lower()
    declared = request.headers.get("content-length")
    length = int(declared) if declared and declared.isdigit() else None
    if content_type == "multipart/form-data":
        boundary = params.get(b"boundary")
        if not boundary:
            raise malformed_multipart("multipart/form-data without a boundary parameter")
        budget = _multipart_budget(max_bytes, max_files)
        if length is not None and length > budget:
            raise upload_too_large(f"the body is {length} bytes; at most {max_files} images of {max_bytes} bytes each")
        return DeclaredBody(boundary, length)
    if _is_image_type(content_type):
        if length is not None and length > max_bytes:
            raise upload_too_large(f"the body is {length} bytes; the limit is {max_bytes} per image")
        return DeclaredBody(None, length)
    if not content_type:
        raise unsupported_type("no Content-Type; send multipart/form-data with `file` fields, or an image/* body")
    raise unsupported_type(f"{content_type} is not accepted; send multipart/form-data with `file` fields, or image/*")


def _multipart_budget(max_bytes: int, max_files: int) -> int:
    return max_files * (max_bytes + _MULTIPART_OVERHEAD)


async def read_uploads(
    request: Request, max_bytes: int, max_files: int, on_image: Callable[[int], None] | None = None
) -> list[Upload]:
    """The request's images in upload order: multipart `file` fields, or one raw image/* body.

    on_image(n) is called as the n-th image's part starts, before its bytes are read: the route's admission, which
    raises a ServiceError (429) when the queue cannot take n images, so a refused request is not read further."""
    body = check_headers(request, max_bytes, max_files)
    try:
        if body.boundary is not None:
            return await _read_multipart(request, body.boundary, max_bytes, max_files, on_image)
        return [await _read_raw(request, max_bytes)]
    except ClientDisconnect:
        raise client_disconnected() from None


async def _read_raw(request: Request, max_bytes: int) -> Upload:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise upload_too_large(f"the body is over the {max_bytes} byte limit per image")
    return Upload(bytes(body))


async def _read_multipart(
    request: Request, boundary: bytes, max_bytes: int, max_files: int, on_image: Callable[[int], None] | None
) -> list[Upload]:
    budget = _multipart_budget(max_bytes, max_files)
    collector = _MultipartCollector(max_bytes, max_files, on_image)
    parser = MultipartParser(boundary, collector.callbacks())
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > budget:
                raise upload_too_large(f"the body is over {budget} bytes")
            parser.write(chunk)
        parser.finalize()
    except ServiceError:
        raise
    except Exception as err:  # python-multipart raises on malformed framing
        raise malformed_multipart(f"the multipart body is malformed: {err}") from None
    if not collector.files:
        raise no_images(FILE_FIELD)
    return collector.files
