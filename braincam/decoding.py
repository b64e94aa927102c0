"""Bytes -> uint8 display image, for every format the service accepts.

The format is sniffed from the bytes (magic numbers), never from a filename or
a Content-Type. 8-bit images pass through untouched (that is what the trainer
sees); deeper data (16-bit PNG/TIFF, DICOM, NIfTI, float TIFF) is windowed to
uint8: DICOM by its own window centre/width when present, everything else by
robust percentiles, so a stray hot pixel cannot black out the image.

Uploads are hostile until decoded: sizes are checked from the headers before any
decoder allocates (the pixel budget for 2-D images and slices, a byte budget for
volumes), DICOM is parsed only when it carries its preamble (no `force`), and a
.nii.gz is inflated no further than its header says the volume needs.
"""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from braincam.errors import (
    ImageTooLarge,
    InputError,
    InvalidParameter,
    UndecodableImage,
    UnsupportedMediaType,
)
from braincam.image_headers import raster_size

RASTER_FORMATS = ("png", "jpeg", "bmp", "tiff")
SUPPORTED_FORMATS = (*RASTER_FORMATS, "dicom", "nifti")
# Largest 2-D image (or DICOM frame / NIfTI slice plane) decoded, in pixels.
DEFAULT_MAX_PIXELS = 40_000_000
# Largest volume data (all DICOM frames, all NIfTI volumes) decoded, in bytes,
# and the voxels of the one 3-D volume a NIfTI upload is reduced to (it is
# reoriented whole, possibly as float64).
MAX_VOLUME_BYTES = 512 * 1024 * 1024
MAX_VOLUME_VOXELS = 64 * 1024 * 1024
_NIFTI_HEADER_BYTES = 540  # NIfTI-2; NIfTI-1 headers are 348
_max_pixels: ContextVar[int] = ContextVar("braincam_max_pixels", default=DEFAULT_MAX_PIXELS)
ROBUST_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class DecodedImage:
    """A 2-D slice ready for `preprocess`: uint8 HxW (grayscale) or HxWx3/4 (RGB[A])."""

    pixels: np.ndarray
    format: str
    bit_depth: int
    slice_index: int | None = None
    n_slices: int | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the decoded slice."""
        return int(self.pixels.shape[1]), int(self.pixels.shape[0])


@dataclass(frozen=True)
class OpenedImage:
    """A file parsed once (`open_image`): its slice count, any slice decoded on demand.

    `n_slices` is None for a 2-D image; `slice(None)` is that image, or the middle
    slice of a volume, as in `decode_image`.
    """

    format: str
    n_slices: int | None
    _decode: Callable[[int | None], DecodedImage]

    def slice(self, index: int | None = None) -> DecodedImage:
        return self._decode(index)


def sniff_format(data: bytes) -> str:
    """Name the container from its magic number; raise 415 for anything else."""
    head = data[:512]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"BM") and len(head) >= 26:
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x1f\x8b"):
        return "nifti"  # gzip: only NIfTI is accepted compressed; checked after inflating
    if _is_nifti_header(head):
        return "nifti"
    raise UnsupportedMediaType(
        "unrecognised file type: send PNG, JPEG, BMP, TIFF, DICOM or NIfTI (.nii/.nii.gz)"
    )


def _is_nifti_header(head: bytes) -> bool:
    return (len(head) >= 348 and head[344:347] in (b"n+1", b"ni1")) or (
        len(head) >= 8 and head[4:7] in (b"n+2", b"ni2")
    )


@contextmanager
def pixel_budget(max_pixels: int) -> Iterator[None]:
    """`decode_image` calls in this block (same thread or task) use `max_pixels`.

    For callers that run the decoder behind code they do not own (the service sets
    its configured budget around each worker task); an explicit `max_pixels`
    argument to `decode_image` takes precedence.
    """
    token = _max_pixels.set(max_pixels)
    try:
        yield
    finally:
        _max_pixels.reset(token)


def decode_image(
    data: bytes, slice_index: int | None = None, *, max_pixels: int | None = None
) -> DecodedImage:
    """Decode any supported upload. `slice_index` picks a frame of DICOM/NIfTI volumes.

    Images (and slices) over `max_pixels` are refused from their header with
    `ImageTooLarge` (default: the `pixel_budget` in force, else DEFAULT_MAX_PIXELS).
    """
    if not data:
        raise UndecodableImage("the uploaded file is empty")
    budget = _max_pixels.get() if max_pixels is None else max_pixels
    fmt = sniff_format(data)
    if fmt in RASTER_FORMATS:
        if slice_index is not None:
            raise InvalidParameter(f"'slice' applies to DICOM and NIfTI volumes, not {fmt}")
        return _decode_raster(data, fmt, budget)
    if fmt == "dicom":
        return _decode_dicom(data, slice_index, budget)
    return _decode_nifti(data, slice_index, budget)


def open_image(data: bytes, *, max_pixels: int | None = None) -> OpenedImage:
    """Parse a file once; `.slice(k)` then equals `decode_image(data, k)`.

    For every slice of a volume: `decode_image` per slice would parse (and for NIfTI
    reorient) the whole file each time. The same checks and decoders: a DICOM's
    frames come from one parsed dataset (pydicom keeps its pixel array), a NIfTI's
    slices from one canonical volume; a 2-D image is decoded when asked for.
    """
    if not data:
        raise UndecodableImage("the uploaded file is empty")
    budget = _max_pixels.get() if max_pixels is None else max_pixels
    fmt = sniff_format(data)
    if fmt in RASTER_FORMATS:
        return OpenedImage(fmt, None, lambda k: decode_image(data, k, max_pixels=budget))
    if fmt == "dicom":
        import pydicom

        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=False)
            _check_dicom_size(ds, budget)
            frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        except InputError:
            raise
        except Exception as exc:  # as in _decode_dicom: pydicom may raise anything
            raise UndecodableImage(
                f"could not decode the DICOM file: {type(exc).__name__}"
            ) from exc
        return OpenedImage(
            "dicom", frames, lambda k: decode_dicom_dataset(ds, k, max_pixels=budget)
        )
    volume, bit_depth = _nifti_volume(data, budget)
    n = int(volume.shape[2])

    def nifti_slice(k: int | None) -> DecodedImage:
        index = _pick_slice(n, k)
        return DecodedImage(_nifti_axial(volume, index), "nifti", bit_depth, index, n)

    return OpenedImage("nifti", n, nifti_slice)


def check_pixels(width: int, height: int, max_pixels: int, what: str = "image") -> None:
    """Refuse a declared size over the pixel budget (413), before decoding."""
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"the {what} is {width}x{height} pixels ({width * height / 1e6:.1f} MP), "
            f"over the {max_pixels / 1e6:.4g} MP limit"
        )


def _check_volume_bytes(nbytes: int, what: str) -> None:
    if nbytes > MAX_VOLUME_BYTES:
        raise ImageTooLarge(
            f"the {what} holds {nbytes / 2**20:.0f} MiB of pixel data, "
            f"over the {MAX_VOLUME_BYTES // 2**20} MiB limit"
        )


def load_image(path: str | Path) -> np.ndarray:
    """Read a file from disk through the same decoder the service uses."""
    return decode_image(Path(path).read_bytes()).pixels


def to_uint8(values: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Window arbitrary-range data to uint8; robust percentiles unless a window is given."""
    values = np.asarray(values, dtype=np.float32)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise UndecodableImage("the image holds no finite pixel values")
    if low is None or high is None:
        foreground = finite[finite > finite.min()]
        sample = foreground if foreground.size > 0.01 * finite.size else finite
        low, high = (float(v) for v in np.percentile(sample, ROBUST_PERCENTILES))
        low = min(low, float(finite.min())) if foreground.size else low
    if high <= low:
        high = low + 1.0
    scaled = (np.nan_to_num(values, nan=low) - low) * (255.0 / (high - low))
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)


def _decode_raster(data: bytes, fmt: str, max_pixels: int) -> DecodedImage:
    check_pixels(*raster_size(data, fmt), max_pixels)
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:  # size limits and corrupt headers raise here
        raise UndecodableImage(f"could not decode the {fmt.upper()} image") from exc
    if img is None or img.size == 0:
        raise UndecodableImage(f"could not decode the {fmt.upper()} image")
    bit_depth = int(img.dtype.itemsize * 8)
    if img.dtype != np.uint8:
        img = to_uint8(img) if img.ndim == 2 else _window_colour(img)
    if img.ndim == 3:
        if img.shape[2] == 1:
            img = img[:, :, 0]
        elif img.shape[2] == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        elif img.shape[2] == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA)
        else:
            raise UndecodableImage(f"unsupported channel count {img.shape[2]}")
    return DecodedImage(pixels=np.ascontiguousarray(img), format=fmt, bit_depth=bit_depth)


def _window_colour(img: np.ndarray) -> np.ndarray:
    # One window for all colour channels keeps hues; alpha is rescaled on its own.
    colour = to_uint8(img[:, :, :3])
    if img.shape[2] == 4:
        alpha = to_uint8(
            img[:, :, 3],
            0.0,
            float(np.iinfo(img.dtype).max) if np.issubdtype(img.dtype, np.integer) else 1.0,
        )
        return np.dstack([colour, alpha])
    return colour


def _pick_slice(n: int, slice_index: int | None) -> int:
    if slice_index is None:
        return n // 2
    if not 0 <= slice_index < n:
        raise InvalidParameter(
            f"'slice' must be between 0 and {n - 1} for this volume, got {slice_index}"
        )
    return slice_index


def _decode_dicom(data: bytes, slice_index: int | None, max_pixels: int) -> DecodedImage:
    import pydicom  # imported lazily: only DICOM uploads pay for it

    try:
        # force=False: a file without the DICM preamble is not guessed at.
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
    except Exception as exc:  # damaged bytes raise any type
        raise UndecodableImage(f"could not decode the DICOM file: {type(exc).__name__}") from exc
    return decode_dicom_dataset(ds, slice_index, max_pixels=max_pixels)


def decode_dicom_dataset(
    ds: Any, frame: int | None = None, *, max_pixels: int | None = None
) -> DecodedImage:
    """A parsed DICOM dataset (e.g. one slice of a series) -> its display image, with
    the same size checks and windowing as `decode_image` gives the file's bytes."""
    budget = _max_pixels.get() if max_pixels is None else max_pixels
    try:
        _check_dicom_size(ds, budget)
        return _dicom_slice(ds, frame)
    except InputError:
        raise
    except Exception as exc:  # pydicom parses values lazily: any field may raise, any type
        raise UndecodableImage(f"could not decode the DICOM file: {type(exc).__name__}") from exc


def _check_dicom_size(ds: Any, max_pixels: int) -> None:
    """Bound what `pixel_array` will allocate (compressed transfer syntaxes inflate)."""
    rows, columns = int(ds.Rows), int(ds.Columns)
    if rows <= 0 or columns <= 0:
        raise UndecodableImage(f"invalid DICOM image size {columns}x{rows}")
    check_pixels(columns, rows, max_pixels, "DICOM frame")
    frames = max(int(getattr(ds, "NumberOfFrames", 1) or 1), 1)
    samples = max(int(getattr(ds, "SamplesPerPixel", 1) or 1), 1)
    sample_bytes = max((int(getattr(ds, "BitsAllocated", 8) or 8) + 7) // 8, 1)
    _check_volume_bytes(rows * columns * frames * samples * sample_bytes, "DICOM file")
    _check_pixel_data_length(ds, rows * columns * frames * samples)


def _check_pixel_data_length(ds: Any, samples: int) -> None:
    """Native (uncompressed) pixel data shorter than the image it declares: a truncated
    file, said as such (pydicom's own error names neither the file nor the cause)."""
    meta = getattr(ds, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None)
    if (
        syntax is None
        or syntax.is_compressed
        or "PixelData" not in ds
        or str(ds.get("PhotometricInterpretation", "")) == "YBR_FULL_422"  # subsampled
    ):
        return
    bits = int(ds.get("BitsAllocated", 8) or 8)
    expected = (samples * bits + 7) // 8
    actual = len(ds.PixelData)
    if actual < expected:
        raise UndecodableImage(
            f"the pixel data holds {actual} bytes where the header declares {expected} "
            f"({ds.Columns}x{ds.Rows} pixels, {bits}-bit): the file is truncated"
        )


def _dicom_slice(ds: Any, slice_index: int | None) -> DecodedImage:
    import pydicom

    arr = ds.pixel_array
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    is_colour = int(getattr(ds, "SamplesPerPixel", 1) or 1) > 1
    if frames > 1:
        index = _pick_slice(frames, slice_index)
        arr = arr[index]
    else:
        if slice_index not in (None, 0):
            raise InvalidParameter("'slice' must be 0 for a single-frame DICOM")
        index = 0
    bit_depth = int(getattr(ds, "BitsAllocated", 8) or 8)
    if is_colour:
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            arr = convert_color_space(arr, photometric, "RGB")
        pixels = arr.astype(np.uint8) if arr.dtype == np.uint8 else to_uint8(arr)
        return DecodedImage(pixels, "dicom", bit_depth, index, frames)
    values = arr.astype(np.float32)
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    values = values * slope + intercept
    low = high = None
    centre, width = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
    if centre is not None and width is not None:
        c = float(centre[0] if isinstance(centre, pydicom.multival.MultiValue) else centre)
        w = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        if w > 1:
            low, high = c - w / 2.0, c + w / 2.0
    pixels = to_uint8(values, low, high)
    if photometric == "MONOCHROME1":  # 0 is white in MONOCHROME1
        pixels = 255 - pixels
    return DecodedImage(pixels, "dicom", bit_depth, index, frames)


class _Inflater:
    """A gzip stream inflated on demand, never further than asked."""

    def __init__(self, data: bytes) -> None:
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._pending = data
        self.out = b""

    def inflate_to(self, size: int) -> bytes:
        if size > len(self.out) and self._pending:
            try:
                chunk = self._z.decompress(self._pending, size - len(self.out))
            except zlib.error as exc:
                raise UndecodableImage("corrupt gzip stream") from exc
            self._pending = self._z.unconsumed_tail
            self.out += chunk
        return self.out


def _nifti_header(head: bytes) -> tuple[Any, tuple[int, ...], int]:
    """(image class, data shape, bytes up to the end of the data) from the header
    alone, after checking the shape is one we are willing to load."""
    import nibabel as nib  # lazily: only NIfTI uploads pay for it

    nifti2 = head[4:7] in (b"n+2", b"ni2")
    cls = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    # The header proper with a cleared extension flag: extensions (read later with
    # the image) are not needed for the shape, and may lie beyond `head`.
    fixed = head[: 540 if nifti2 else 348] + bytes(4)
    try:
        header = cls.header_class.from_fileobj(io.BytesIO(fixed))
        shape = tuple(int(d) for d in header.get_data_shape())
        itemsize = int(header.get_data_dtype().itemsize)
        offset = int(header.get_data_offset())
    except Exception as exc:  # nibabel raises several types on invalid headers
        raise UndecodableImage(f"invalid NIfTI header: {type(exc).__name__}") from exc
    if len(shape) < 2 or min(shape) < 1:
        raise UndecodableImage(f"unsupported NIfTI shape {shape}")
    if math.prod(shape[:3]) > MAX_VOLUME_VOXELS:
        raise ImageTooLarge(
            f"the NIfTI volume {shape[:3]} has over {MAX_VOLUME_VOXELS // 2**20} Mi voxels"
        )
    return cls, shape, offset + math.prod(shape) * itemsize


def _decode_nifti(data: bytes, slice_index: int | None, max_pixels: int) -> DecodedImage:
    volume, bit_depth = _nifti_volume(data, max_pixels)
    n = int(volume.shape[2])
    index = _pick_slice(n, slice_index)
    return DecodedImage(_nifti_axial(volume, index), "nifti", bit_depth, index, n)


def decode_nifti_volume(data: bytes, *, max_pixels: int | None = None) -> list[DecodedImage]:
    """Every axial slice of a NIfTI volume, inferior to superior, each windowed exactly
    as `decode_image(data, k)` windows slice k."""
    budget = _max_pixels.get() if max_pixels is None else max_pixels
    volume, bit_depth = _nifti_volume(data, budget)
    n = int(volume.shape[2])
    return [DecodedImage(_nifti_axial(volume, k), "nifti", bit_depth, k, n) for k in range(n)]


def _nifti_axial(volume: np.ndarray, index: int) -> np.ndarray:
    # RAS+ canonical axial slice, rotated so anterior is up (radiological viewers' layout).
    axial = np.rot90(np.asarray(volume[:, :, index], dtype=np.float32))
    return np.ascontiguousarray(to_uint8(axial))


def _nifti_volume(data: bytes, max_pixels: int) -> tuple[np.ndarray, int]:
    """The RAS+ canonical 3-D volume (first of a 4-D series) and its bits per voxel."""
    import nibabel as nib  # lazily: only NIfTI uploads pay for it

    gz = _Inflater(data) if data.startswith(b"\x1f\x8b") else None
    head = gz.inflate_to(_NIFTI_HEADER_BYTES) if gz else data[:_NIFTI_HEADER_BYTES]
    if not _is_nifti_header(head):
        if gz:
            raise UnsupportedMediaType("gzip upload is not a NIfTI volume")
        raise UndecodableImage("not a valid NIfTI header")
    cls, shape, end = _nifti_header(head)
    # Any two of the first three axes can become the axial plane after reorientation.
    a, b = sorted(shape[:3] + (1,) * (3 - len(shape[:3])))[-2:]
    check_pixels(a, b, max_pixels, "NIfTI slice plane")
    _check_volume_bytes(end, "NIfTI file")
    raw = gz.inflate_to(end) if gz else data
    if len(raw) < end:
        raise UndecodableImage("the NIfTI file is truncated: less data than its header declares")
    try:
        img = cls.from_bytes(raw)
        if len(shape) > 3:  # 4-D series: the first volume, sliced before any data is read
            img = img.slicer[(slice(None),) * 3 + (0,) * (len(shape) - 3)]
        img = nib.as_closest_canonical(img)
        volume = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises several types on damaged data
        raise UndecodableImage(f"could not read the NIfTI volume: {type(exc).__name__}") from exc
    if volume.ndim == 2:
        volume = volume[:, :, None]
    if volume.ndim != 3 or min(volume.shape[:2]) < 2:
        raise UndecodableImage(f"unsupported NIfTI shape {volume.shape}")
    return volume, int(np.dtype(img.get_data_dtype()).itemsize * 8)
