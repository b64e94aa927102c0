"""Image dimensions read from raster headers, without decoding a pixel.

A 60 KB PNG can declare 100 000 x 100 000 pixels and inflate to gigabytes, and a
JPEG, BMP or TIFF header can do the same; the decoder allocates what the header
says. Reading width and height first lets the caller refuse such files before
OpenCV allocates anything. Each reader is bounded by the bytes it is given and
raises `UndecodableImage` on a header it cannot read: a file without a readable
size cannot be decoded either.
"""

from __future__ import annotations

import struct

from braincam.errors import UndecodableImage

# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic...):
# C0-CF except DHT (C4), JPG (C8) and DAC (CC), which share the range.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM, RSTn, SOI.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8), 0xD8})
_TIFF_WIDTH, _TIFF_LENGTH = 256, 257
# TIFF field types that can hold a dimension: SHORT, LONG, LONG8 (BigTIFF).
_TIFF_INT_TYPES = {3: "H", 4: "I", 16: "Q"}
_MAX_TIFF_ENTRIES = 4096  # a real first IFD has a few dozen


def raster_size(data: bytes, fmt: str) -> tuple[int, int]:
    """(width, height) declared by a PNG, JPEG, BMP or TIFF header."""
    readers = {"png": _png_size, "jpeg": _jpeg_size, "bmp": _bmp_size, "tiff": _tiff_size}
    try:
        width, height = readers[fmt](data)
    except (struct.error, IndexError) as exc:  # the header ends early
        raise _unreadable(fmt) from exc
    if width <= 0 or height <= 0:
        raise _unreadable(fmt)
    return width, height


def _unreadable(fmt: str) -> UndecodableImage:
    return UndecodableImage(f"could not read the image size from the {fmt.upper()} header")


def _png_size(data: bytes) -> tuple[int, int]:
    # The signature is followed by the IHDR chunk: length 13, type, width, height.
    if data[8:16] != b"\x00\x00\x00\x0dIHDR":
        raise _unreadable("png")
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def _jpeg_size(data: bytes) -> tuple[int, int]:
    # Walk the marker segments up to the first SOF; thumbnails inside APPn
    # segments are skipped with their segment, so this is the main frame.
    i = 2
    n = len(data)
    while i < n:
        if data[i] != 0xFF:
            raise _unreadable("jpeg")
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        marker = data[i]
        i += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame
            break
        (length,) = struct.unpack(">H", data[i : i + 2])
        if marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", data[i + 3 : i + 7])
            return int(width), int(height)
        if length < 2:
            break
        i += length
    raise _unreadable("jpeg")


def _bmp_size(data: bytes) -> tuple[int, int]:
    (header_size,) = struct.unpack("<I", data[14:18])
    if header_size == 12:  # OS/2 BITMAPCOREHEADER: unsigned 16-bit sizes
        width, height = struct.unpack("<HH", data[18:22])
    else:
        width, height = struct.unpack("<ii", data[18:26])
        height = abs(height)  # negative height: rows stored top-down
    return int(width), int(height)


def _tiff_size(data: bytes) -> tuple[int, int]:
    # The first IFD: OpenCV decodes the first page only.
    order = "<" if data[:2] == b"II" else ">"
    (version,) = struct.unpack(order + "H", data[2:4])
    big = version == 43
    if big:
        (offset,) = struct.unpack(order + "Q", data[8:16])
        count_fmt, entry_size, value_size = "Q", 20, 8
    else:
        (offset,) = struct.unpack(order + "I", data[4:8])
        count_fmt, entry_size, value_size = "H", 12, 4
    count_size = struct.calcsize(count_fmt)
    (count,) = struct.unpack(order + count_fmt, data[offset : offset + count_size])
    if count > _MAX_TIFF_ENTRIES:
        raise _unreadable("tiff")
    found: dict[int, int] = {}
    start = offset + count_size
    for k in range(int(count)):
        entry = data[start + k * entry_size : start + (k + 1) * entry_size]
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag in (_TIFF_WIDTH, _TIFF_LENGTH) and kind in _TIFF_INT_TYPES:
            code = _TIFF_INT_TYPES[kind]
            value_at = entry_size - value_size  # the value sits in the entry's last field
            (found[tag],) = struct.unpack(
                order + code, entry[value_at : value_at + struct.calcsize(code)]
            )
    if _TIFF_WIDTH not in found or _TIFF_LENGTH not in found:
        raise _unreadable("tiff")
    return int(found[_TIFF_WIDTH]), int(found[_TIFF_LENGTH])
