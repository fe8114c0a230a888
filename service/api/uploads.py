"""Receiving a dataset upload: the multipart body streamed to disk under a size limit."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path, PurePath

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from service.api.errors import APIError, invalid
from service.api.staging import staging_file
from service.settings import Settings

FIELD = "file"
PURPOSE_FIELD = "purpose"  # OpenAI's files API sends one with the file ("fine-tune")
_MAX_PURPOSE_BYTES = 64


@dataclass
class Upload:
    path: Path
    filename: str
    size: int
    sha256: str
    purpose: str | None = None  # the form's purpose field, if it had one


def _too_large(limit: int) -> APIError:
    return APIError(413, "payload_too_large", f"upload exceeds the limit of {limit} bytes", field=FIELD)


class _FilePart:
    """Collects the ``file`` part of a multipart body into a staged file, hashing as it goes,
    and the short ``purpose`` field."""

    def __init__(self, staged, limit: int):
        self.staged = staged
        self.limit = limit
        self.size = 0
        self.sha = hashlib.sha256()
        self.filename: str | None = None
        self.too_large = False
        self.seen = False
        self._in_file = False
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self.ended = False  # the closing boundary was read
        self.purpose: bytearray | None = None
        self._in_purpose = False

    def callbacks(self) -> dict:
        return {
            "on_end": self._end,
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field_data,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._in_file = self._in_purpose = False

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field = self._header_value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if options.get(b"name") == FIELD.encode() and not self.seen:
            self.seen = self._in_file = True
            self.filename = options.get(b"filename", b"").decode("utf-8", "replace")
        elif options.get(b"name") == PURPOSE_FIELD.encode() and self.purpose is None:
            self.purpose = bytearray()
            self._in_purpose = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_purpose:
            self.purpose += data[start : min(end, start + _MAX_PURPOSE_BYTES + 1 - len(self.purpose))]
            return
        if not self._in_file or self.too_large:
            return
        chunk = data[start:end]
        self.size += len(chunk)
        if self.size > self.limit:
            self.too_large = True
            return
        self.sha.update(chunk)
        self.staged.write(chunk)

    def _part_end(self) -> None:
        self._in_file = self._in_purpose = False

    def _end(self) -> None:
        self.ended = True


def _purpose(raw: bytearray | None) -> str | None:
    if raw is None:
        return None
    if len(raw) > _MAX_PURPOSE_BYTES:
        raise invalid(PURPOSE_FIELD, f"purpose: at most {_MAX_PURPOSE_BYTES} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid(PURPOSE_FIELD, "purpose: not valid UTF-8") from None


async def receive_upload(request: Request, settings: Settings) -> Upload:
    """Stream the request's multipart ``file`` field to a staged file under RLORA_HOME.

    Raises 413 as soon as the file passes ``max_upload_bytes`` (before reading the rest) and
    422 when there is no ``file`` field. The caller deletes ``Upload.path`` when done.
    """
    limit = settings.max_upload_bytes
    content_type, options = parse_options_header(request.headers.get("content-type"))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise invalid(FIELD, "send the dataset as multipart/form-data with a 'file' field")
    declared = request.headers.get("content-length")
    # The multipart framing adds a few hundred bytes; a body this far over cannot fit.
    if declared and declared.isdigit() and int(declared) > limit + 64 * 1024:
        raise _too_large(limit)

    fd, path = staging_file(settings, "upload-")
    try:
        with os.fdopen(fd, "wb") as staged:
            part = _FilePart(staged, limit)
            try:
                parser = MultipartParser(boundary, part.callbacks())  # refuses an overlong boundary
                async for chunk in request.stream():
                    parser.write(chunk)
                    if part.too_large:
                        raise _too_large(limit)
                parser.finalize()
            except FormParserError as err:
                raise invalid(FIELD, f"malformed multipart body: {err}") from None
            if not part.ended:
                raise invalid(FIELD, "malformed multipart body: it ends before its closing boundary (truncated upload?)")
            staged.flush()
            # Up to max_upload_bytes reach the disk here: seconds, off the event loop.
            await run_in_threadpool(os.fsync, staged.fileno())
        if not part.seen:
            raise invalid(FIELD, "no 'file' field in the multipart body")
        # NUL and other control characters out: no use in a name, and PostgreSQL refuses NUL.
        name = "".join(ch for ch in (part.filename or "") if ch.isprintable() or ch == " ")
        filename = PurePath(name.replace("\\", "/")).name[:255] or "dataset"
        return Upload(path=path, filename=filename, size=part.size, sha256=part.sha.hexdigest(), purpose=_purpose(part.purpose))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
