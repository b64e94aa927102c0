"""A corpus of hostile and unusual uploads, made in code (no fixture files).

`hostile_cases()` are requests the service must refuse with a 4xx JSON error;
`unusual_cases()` are odd but valid uploads it must answer correctly (200). Each
case builds its httpx request arguments afresh, so streamed bodies can be replayed.
Shared by test_hardening.py (every case once) and test_soak.py (mixed traffic).
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

Request = dict[str, Any]  # keyword arguments of httpx.Client.request


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], Request]
    status: int
    code: str | None = None  # expected `code`; None: any (statuses that vary by framework)
    path: str = "/predict"
    method: str = "POST"

    def request(self) -> Request:
        return {"method": self.method, "url": self.path, **self.build()}


def brain_slice(size: int = 64, seed: int = 0) -> np.ndarray:
    """A synthetic axial slice: an ellipse "brain" with a brighter blob, uint8 gray."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size), np.uint8)
    c = size // 2
    cv2.ellipse(img, (c, c), (int(size * 0.4), int(size * 0.45)), 0, 0, 360, 110, -1)
    cv2.circle(img, (c + int(rng.integers(-8, 8)), c - 6), size // 8, 220, -1)
    noise = rng.integers(0, 12, img.shape, dtype=np.uint8)
    return cv2.add(img, noise)


def encode(ext: str, img: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, img, params or [])
    assert ok, ext
    return buf.tobytes()


def upload(data: bytes, filename: str | bytes = "upload.bin", **form: str) -> Callable[[], Request]:
    def build() -> Request:
        return {"files": {"file": (filename, data, "application/octet-stream")}, "data": form}

    return build


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def png_declaring(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose IHDR declares width x height (8-bit gray), CRCs correct."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", idat or zlib.compress(b"\x00" * 64))
        + _chunk(b"IEND", b"")
    )


def png_gray_alpha(gray: np.ndarray) -> bytes:
    """8-bit gray + alpha (colour type 4), which OpenCV cannot write."""
    h, w = gray.shape
    ga = np.dstack([gray, np.full_like(gray, 180)]).reshape(h, 2 * w)
    rows = b"".join(b"\x00" + row.tobytes() for row in ga)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 4, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(rows))
        + _chunk(b"IEND", b"")
    )


def png_bomb(width: int, height: int) -> bytes:
    """A real, valid all-black PNG: tens of KB that decode to width*height bytes."""
    z = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte + pixels
    parts = [z.compress(row) for _ in range(height)]
    return png_declaring(width, height, b"".join(parts) + z.flush())


def jpeg_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(".jpg", brain_slice()))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def bmp_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(".bmp", brain_slice()))
    struct.pack_into("<ii", data, 18, width, height)
    return bytes(data)


def tiff_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(".tiff", brain_slice()))
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    for k in range(count):
        at = ifd + 2 + 12 * k
        tag, _kind = struct.unpack_from("<HH", data, at)
        if tag in (256, 257):  # ImageWidth, ImageLength -> LONG
            struct.pack_into("<HHII", data, at, tag, 4, 1, width if tag == 256 else height)
    return bytes(data)


def dicom(
    pixels: np.ndarray,
    *,
    preamble: bool = True,
    rows_cols: tuple[int, int] | None = None,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
) -> bytes:
    """A minimal MR DICOM of uint16 `pixels` [H,W], or frames [n,H,W] (n > 1: multi-frame).

    `rows_cols` overrides the declared size; `rescale` is (slope, intercept) and
    `window` (center, width), each written only when given.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["braincam-test"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.Rows, ds.Columns = rows_cols or pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if pixels.ndim == 3 and pixels.shape[0] > 1:
        ds.NumberOfFrames = int(pixels.shape[0])
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    # Without the 128-byte preamble and "DICM": parseable only with force=True.
    return data if preamble else data[132:]


def nifti(volume: np.ndarray) -> bytes:
    import nibabel as nib

    return bytes(nib.Nifti1Image(volume, np.diag([1.0, 1.0, 2.0, 1.0])).to_bytes())


def nifti_declaring(dims: tuple[int, ...], trailing: int = 0) -> bytes:
    """A NIfTI-1 header with dims patched in (no consistency), plus `trailing` zeros."""
    head = bytearray(nifti(np.zeros((4, 4, 4), np.int16))[:352])
    padded = list(dims) + [1] * (7 - len(dims))
    struct.pack_into("<8h", head, 40, len(dims), *padded)
    return bytes(head) + bytes(trailing)


def multipart_stream(total: int, boundary: str = "braincamhardening") -> Callable[[], Request]:
    """A chunked (no Content-Length) multipart body of `total` file bytes."""

    def build() -> Request:
        def body() -> Iterator[bytes]:
            yield (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                'filename="x.png"\r\nContent-Type: image/png\r\n\r\n'
            ).encode()
            yield b"\x89PNG\r\n\x1a\n"
            sent = 8
            while sent < total:
                n = min(1 << 16, total - sent)
                sent += n
                yield bytes(n)
            yield f"\r\n--{boundary}--\r\n".encode()

        return {
            "content": body(),
            "headers": {"content-type": f"multipart/form-data; boundary={boundary}"},
        }

    return build


def raw_multipart(data: bytes, filename: bytes) -> Callable[[], Request]:
    """One file part whose filename is raw bytes (httpx would encode a str as UTF-8)."""
    boundary = b"braincamraw"
    body = (
        b"--"
        + boundary
        + b'\r\nContent-Disposition: form-data; name="file"; filename="'
        + filename
        + b'"\r\nContent-Type: application/octet-stream\r\n\r\n'
        + data
        + b"\r\n--"
        + boundary
        + b"--\r\n"
    )
    return raw_body(body, "multipart/form-data; boundary=" + boundary.decode())


def raw_body(content: bytes, content_type: str) -> Callable[[], Request]:
    return lambda: {"content": content, "headers": {"content-type": content_type}}


def hostile_cases(max_upload_bytes: int) -> list[Case]:
    """Every case a distinct kind of bad request; `max_upload_bytes` is the server's."""
    gray = brain_slice()
    png = encode(".png", gray)
    jpeg = encode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, 90])
    vol = np.stack([gray.T.astype(np.int16) * (k + 1) for k in range(5)], axis=2)
    nii = nifti(vol)
    bad_crc = bytearray(png)
    bad_crc[33 + 8 + 10] ^= 0xFF  # a byte inside the first IDAT's data
    nan_tiff = encode(".tiff", np.full((16, 16), np.nan, np.float32))
    html = b"<!DOCTYPE html><html><body><script>alert(1)</script></body></html>"
    dicm = b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x04\x00junk" + bytes(64)
    png_up = upload(png)
    return [
        Case("empty_file", upload(b""), 422, "undecodable_image"),
        Case("truncated_png", upload(png[: len(png) // 2]), 422, "undecodable_image"),
        Case("truncated_jpeg", upload(jpeg[: len(jpeg) // 2]), 422, "undecodable_image"),
        Case("header_only_png", upload(png[:33]), 422, "undecodable_image"),
        Case("bad_crc_png", upload(bytes(bad_crc)), 422, "undecodable_image"),
        Case("wrong_magic_gif", upload(b"GIF89a" + png[6:]), 415, "unsupported_media_type"),
        Case("plain_text", upload(b"patient: anonymous\n" * 20), 415, "unsupported_media_type"),
        Case("html", upload(html), 415, "unsupported_media_type"),
        Case(
            "svg_with_script",
            upload(b'<svg xmlns="http://www.w3.org/2000/svg"><script>x()</script></svg>'),
            415,
            "unsupported_media_type",
        ),
        Case("polyglot_html_then_png", upload(html + png), 415, "unsupported_media_type"),
        Case("pdf", upload(b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n"), 415, "unsupported_media_type"),
        Case("zip", upload(b"PK\x03\x04" + bytes(64)), 415, "unsupported_media_type"),
        Case(
            "png_huge_dimensions", upload(png_declaring(100_000, 100_000)), 413, "image_too_large"
        ),
        Case("png_bomb_48mp", upload(png_bomb(8000, 6000)), 413, "image_too_large"),
        Case(
            "jpeg_huge_dimensions", upload(jpeg_declaring(65_000, 65_000)), 413, "image_too_large"
        ),
        Case("bmp_huge_dimensions", upload(bmp_declaring(50_000, -50_000)), 413, "image_too_large"),
        Case(
            "tiff_huge_dimensions", upload(tiff_declaring(90_000, 90_000)), 413, "image_too_large"
        ),
        Case("float_tiff_all_nan", upload(nan_tiff), 422, "undecodable_image"),
        Case(
            "body_over_limit",
            upload(b"\x89PNG\r\n\x1a\n" + bytes(2 * max_upload_bytes)),
            413,
            "payload_too_large",
        ),
        Case(
            "chunked_body_over_limit",
            multipart_stream(max_upload_bytes + (256 << 10)),
            413,
            "payload_too_large",
        ),
        Case("missing_file_field", lambda: {"data": {"slice": "1"}}, 422, "validation_error"),
        Case(
            "wrong_field_name",
            lambda: {"files": {"image": ("a.png", png, "image/png")}},
            422,
            "validation_error",
        ),
        Case("json_body", lambda: {"json": {"file": "aGVsbG8="}}, 422, "validation_error"),
        Case(
            "malformed_multipart",
            raw_body(
                b'--x\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nabc',
                "multipart/form-data; boundary=x",
            ),
            422,  # the unterminated part is dropped: no file
            "validation_error",
        ),
        Case(
            "too_many_form_fields",
            lambda: {
                "files": {"file": ("a.png", png, "image/png")},
                "data": {f"f{i}": "1" for i in range(1500)},
            },
            400,
        ),
        Case("bad_dicom", upload(dicm), 422, "undecodable_image"),
        Case(
            "dicom_without_preamble",
            upload(dicom((gray.astype(np.uint16) * 16), preamble=False)),
            415,
            "unsupported_media_type",
        ),
        Case(
            "dicom_huge_frame",
            upload(dicom(np.zeros((8, 8), np.uint16), rows_cols=(65_535, 65_535))),
            413,
            "image_too_large",
        ),
        Case("nifti_truncated", upload(nii[: len(nii) // 2]), 422, "undecodable_image"),
        Case(
            "nifti_absurd_shape",
            upload(nifti_declaring((30_000, 30_000, 30_000))),
            413,
            "image_too_large",
        ),
        Case("nifti_negative_dim", upload(nifti_declaring((-5, 64, 64))), 422, "undecodable_image"),
        Case(
            "nifti_gzip_bomb",
            upload(gzip.compress(nifti_declaring((4000, 4000, 400), trailing=8 << 20), 9)),
            413,
            "image_too_large",
        ),
        Case(
            "gzip_not_nifti", upload(gzip.compress(b"hello" * 100)), 415, "unsupported_media_type"
        ),
        Case("bad_target", upload(png, target="banana"), 422, "invalid_parameter", "/explain"),
        Case("bad_method", upload(png, method="deepdream"), 422, "invalid_parameter", "/explain"),
        Case("alpha_out_of_range", upload(png, alpha="1.5"), 422, "validation_error", "/explain"),
        Case("bad_colormap", upload(png, colormap="sepia"), 422, "invalid_parameter", "/explain"),
        Case(
            "huge_parameter_value",
            upload(png, target="x" * 40_000),
            422,
            "invalid_parameter",
            "/explain",
        ),
        Case("slice_on_2d_image", upload(png, slice="0"), 422, "invalid_parameter"),
        Case("slice_out_of_range", upload(nii, slice="99"), 422, "invalid_parameter"),
        Case("negative_slice", upload(nii, slice="-1"), 422, "validation_error"),
        Case("unknown_route", png_up, 404, "not_found", "/admin"),
        Case("wrong_method", lambda: {}, 405, "method_not_allowed", "/predict", "GET"),
    ]


def unusual_cases() -> list[Case]:
    """Odd but valid uploads: each must be a 200 equal to the in-process result."""
    gray = brain_slice(seed=1)
    rgb = cv2.applyColorMap(gray, cv2.COLORMAP_BONE)
    png = encode(".png", gray)
    return [
        Case("png_16bit", upload(encode(".png", gray.astype(np.uint16) * 257)), 200),
        Case(
            "png_rgba",
            upload(encode(".png", np.dstack([rgb, np.full(gray.shape, 99, np.uint8)]))),
            200,
        ),
        Case("png_gray_alpha", upload(png_gray_alpha(gray)), 200),
        Case("png_1x1", upload(encode(".png", np.full((1, 1), 200, np.uint8))), 200),
        Case(
            "jpeg_progressive", upload(encode(".jpg", gray, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])), 200
        ),
        Case("non_utf8_filename", raw_multipart(png, b"\xff\xfe\xc3(scan).png"), 200),
        Case("crlf_in_filename", upload(png, filename="a\r\nX-Injected: 1.png"), 200),
        Case(
            "png_with_trailing_html", upload(png + b"<html><script>alert(1)</script></html>"), 200
        ),
        Case("dicom_12bit", upload(dicom(gray.astype(np.uint16) * 16)), 200),
    ]
