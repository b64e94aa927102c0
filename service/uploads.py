"""Reading the uploaded file with a hard size bound."""

from __future__ import annotations

from fastapi import UploadFile

from braincam.errors import PayloadTooLarge
from service.middleware import upload_limit_message

CHUNK_BYTES = 1 << 20


async def read_upload(file: UploadFile, limit: int) -> bytes:
    """The file's bytes, read in chunks and refused as soon as they pass `limit`."""
    too_large = PayloadTooLarge(upload_limit_message(limit))
    if file.size is not None and file.size > limit:
        raise too_large
    chunks: list[bytes] = []
    total = 0
    while chunk := await file.read(CHUNK_BYTES):
        total += len(chunk)
        if total > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)
