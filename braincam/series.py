"""A whole series in: DICOM files (loose or in one zip) or a NIfTI volume -> ordered slices.

Uploads are hostile until proven otherwise, so every bound is checked from what the
container declares before anything is inflated or decoded: the zip's entry count,
each entry's path, its declared size and compression ratio, their total; then the
DICOM headers' slice count and pixel total, before a single pixel is decoded.

Slices are ordered by their position along the slice normal (ImagePositionPatient
projected on the cross product of the ImageOrientationPatient row and column
cosines), which is what "slice order" means geometrically; file names and
InstanceNumber lie or are missing too often. One upload is one series: several
SeriesInstanceUIDs are refused, naming them. Objects without pixels (SR, KO, PR,
DICOMDIR) and files that are not DICOM are skipped and counted, not fatal.
"""

from __future__ import annotations

import io
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from braincam.decoding import (
    DEFAULT_MAX_PIXELS,
    MAX_VOLUME_BYTES,
    check_pixels,
    decode_dicom_dataset,
    decode_nifti_volume,
    sniff_format,
)
from braincam.errors import (
    ImageTooLarge,
    InputError,
    InvalidParameter,
    PayloadTooLarge,
    UndecodableImage,
)

ZIP_MAGIC = b"PK\x03\x04"
# Entries smaller than this are not ratio-checked: however well they compress,
# they cannot inflate to anything that matters (and tiny files compress oddly).
RATIO_CHECK_MIN_BYTES = 1 << 20
# Orientation vectors of slices of one stack agree to this (cosine of the angle
# between their normals); a localizer in another plane does not.
SAME_PLANE_COSINE = 0.9999
# Storage SOP classes that hold pixels but are not slices of an acquisition.
_NOT_SLICES = {
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
}

OrderedBy = Literal["position", "instance_number", "upload", "volume"]


@dataclass(frozen=True)
class SeriesLimits:
    """Bounds of one series upload; the service takes them from its settings."""

    max_slices: int = 512
    max_total_pixels: int = 256 * 1024 * 1024
    max_slice_pixels: int = DEFAULT_MAX_PIXELS
    max_zip_entries: int = 2048
    max_zip_bytes: int = MAX_VOLUME_BYTES  # total declared uncompressed size
    max_compression_ratio: float = 200.0  # per entry (DICOM slices deflate ~2-10x)


@dataclass
class SeriesSlice:
    pixels: np.ndarray  # uint8 display image, as `decode_image` gives it
    source: str  # file name or zip entry ("volume" for NIfTI)
    position: float | None = None  # mm along the slice normal
    dataset: Any = None  # the pydicom Dataset it came from (DICOM)
    frame: int | None = None  # frame of a multi-frame instance

    @property
    def sop_instance_uid(self) -> str | None:
        return None if self.dataset is None else str(self.dataset.SOPInstanceUID)


@dataclass
class Series:
    format: Literal["dicom", "nifti"]
    slices: list[SeriesSlice]
    ordered_by: OrderedBy
    series_instance_uid: str | None = None
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    bit_depth: int = 8

    @property
    def datasets(self) -> list[Any]:
        """The distinct source instances (multi-frame instances once), in slice order."""
        seen: dict[int, Any] = {}
        for s in self.slices:
            if s.dataset is not None:
                seen.setdefault(id(s.dataset), s.dataset)
        return list(seen.values())


def read_series(
    files: Sequence[tuple[str, bytes]], limits: SeriesLimits | None = None
) -> Series:
    """Uploaded files -> one ordered series. One zip, one NIfTI volume, or DICOM files."""
    limits = limits or SeriesLimits()
    if not files:
        raise InvalidParameter("no files were uploaded")
    if len(files) > limits.max_zip_entries:
        raise PayloadTooLarge(
            f"{len(files)} files uploaded; a series is at most {limits.max_zip_entries} files"
        )
    if len(files) == 1 and files[0][1].startswith(ZIP_MAGIC):
        files = unzip(files[0][1], limits)
    elif any(data.startswith(ZIP_MAGIC) for _, data in files):
        raise InvalidParameter("send one zip on its own, not a zip among other files")
    nifti = [name for name, data in files if _is_nifti(data)]
    if nifti:
        if len(files) != 1:
            raise InvalidParameter("a NIfTI volume is a whole series: send it on its own")
        return _nifti_series(files[0][1], limits)
    return _build_series(*_parse_dicom(files), limits)


def unzip(data: bytes, limits: SeriesLimits) -> list[tuple[str, bytes]]:
    """The files of a zip, after checking every entry from the central directory."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        entries = [e for e in archive.infolist() if not e.is_dir()]
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise UndecodableImage(f"could not read the zip: {exc}") from exc
    if len(entries) > limits.max_zip_entries:
        raise PayloadTooLarge(
            f"the zip holds {len(entries)} files, over the {limits.max_zip_entries} limit"
        )
    total = 0
    for entry in entries:
        _check_entry_name(entry.filename)
        if entry.flag_bits & 0x1:
            raise InvalidParameter(f"zip entry {entry.filename[:128]!r} is encrypted")
        total += entry.file_size
        ratio = entry.file_size / max(entry.compress_size, 1)
        if entry.file_size >= RATIO_CHECK_MIN_BYTES and ratio > limits.max_compression_ratio:
            raise PayloadTooLarge(
                f"zip entry {entry.filename[:128]!r} would inflate {ratio:.0f}-fold, over the "
                f"{limits.max_compression_ratio:g}x compression ratio limit"
            )
    if total > limits.max_zip_bytes:
        raise PayloadTooLarge(
            f"the zip would inflate to {total / 2**20:.0f} MiB, "
            f"over the {limits.max_zip_bytes / 2**20:.0f} MiB limit"
        )
    out = []
    for entry in entries:
        try:
            with archive.open(entry) as fh:
                # Never more than declared (+1 to notice a lie): the checks above hold.
                content = fh.read(entry.file_size + 1)
        except (zipfile.BadZipFile, NotImplementedError, ValueError, OSError, EOFError) as exc:
            raise UndecodableImage(
                f"could not inflate zip entry {entry.filename[:128]!r}: {exc}"
            ) from exc
        if len(content) > entry.file_size:
            raise UndecodableImage(f"zip entry {entry.filename[:128]!r} is larger than declared")
        out.append((entry.filename, content))
    return out


def _check_entry_name(name: str) -> None:
    """Refuse absolute paths, drive letters, backslashes and any '..' component: nothing
    is written to disk, but such names only come from archives built to attack."""
    parts = name.split("/")
    if (
        name.startswith("/")
        or "\\" in name
        or "\x00" in name
        or (len(name) > 1 and name[1] == ":")
        or ".." in parts
    ):
        raise InvalidParameter(f"zip entry {name[:128]!r} has an unsafe path")


def _is_nifti(data: bytes) -> bool:
    try:
        return sniff_format(data) == "nifti"
    except InputError:
        return False


def _nifti_series(data: bytes, limits: SeriesLimits) -> Series:
    decoded = decode_nifti_volume(data, max_pixels=limits.max_slice_pixels)
    _check_counts(len(decoded), sum(d.pixels.shape[0] * d.pixels.shape[1] for d in decoded), limits)
    slices = [SeriesSlice(d.pixels, "volume", position=float(d.slice_index or 0)) for d in decoded]
    return Series("nifti", slices, "volume", bit_depth=decoded[0].bit_depth if decoded else 8)


def _parse_dicom(files: Sequence[tuple[str, bytes]]) -> tuple[list[tuple[str, Any]], Counter[str]]:
    import pydicom

    skipped: Counter[str] = Counter()
    parsed = []
    for name, data in files:
        if len(data) < 132 or data[128:132] != b"DICM":
            skipped["not_dicom"] += 1
            continue
        try:
            # Pixel data stays encoded bytes here: nothing is decoded before the bounds.
            ds = pydicom.dcmread(io.BytesIO(data), force=False)
            has_pixels = "PixelData" in ds or "FloatPixelData" in ds
            sop_class = str(ds.get("SOPClassUID", ""))
        except Exception as exc:  # pydicom raises many types on damaged files
            raise UndecodableImage(
                f"could not read DICOM file {name[:128]!r}: {type(exc).__name__}"
            ) from exc
        if not has_pixels or sop_class in _NOT_SLICES:
            skipped["not_an_image"] += 1
            continue
        parsed.append((name, ds))
    return parsed, skipped


def series_from_datasets(datasets: Sequence[Any], limits: SeriesLimits | None = None) -> Series:
    """Parsed DICOM instances (as a DICOMweb retrieve returns them) -> one ordered series."""
    items: list[tuple[str, Any]] = []
    skipped: Counter[str] = Counter()
    for ds in datasets:
        if "PixelData" in ds and str(ds.get("SOPClassUID", "")) not in _NOT_SLICES:
            items.append((str(ds.get("SOPInstanceUID", "instance")), ds))
        else:
            skipped["not_an_image"] += 1
    return _build_series(items, skipped, limits or SeriesLimits())


def _build_series(
    items: list[tuple[str, Any]], skipped: Counter[str], limits: SeriesLimits
) -> Series:
    """(name, dataset) pairs of one upload -> the checked, ordered, decoded series."""
    if not items:
        raise UndecodableImage(
            "no DICOM image found in the upload"
            + (f" (skipped: {_describe(skipped)})" if skipped else "")
        )
    _check_one_series(items)
    frames = [max(int(ds.get("NumberOfFrames", 1) or 1), 1) for _, ds in items]
    pixels = 0
    for (name, ds), n in zip(items, frames, strict=True):
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        if rows <= 0 or cols <= 0:
            raise UndecodableImage(f"DICOM file {name[:128]!r} declares no image size")
        check_pixels(cols, rows, limits.max_slice_pixels, "DICOM frame")
        pixels += rows * cols * n
    _check_counts(sum(frames), pixels, limits)
    ordered, ordered_by = _order(items)
    slices = []
    for name, ds, position in ordered:
        n = max(int(ds.get("NumberOfFrames", 1) or 1), 1)
        for frame in range(n):
            decoded = _decode_slice(name, ds, frame if n > 1 else None, limits)
            slices.append(
                SeriesSlice(decoded.pixels, name, position, ds, frame if n > 1 else None)
            )
    first = ordered[0][1]
    return Series(
        "dicom",
        slices,
        ordered_by,
        series_instance_uid=str(first.get("SeriesInstanceUID", "")) or None,
        skipped=dict(skipped),
        bit_depth=int(first.get("BitsAllocated", 8) or 8),
    )


def _decode_slice(name: str, ds: Any, frame: int | None, limits: SeriesLimits) -> Any:
    """One slice's pixels; a failure names the file (or instance) it came from."""
    try:
        return decode_dicom_dataset(ds, frame, max_pixels=limits.max_slice_pixels)
    except InputError as exc:
        where = f"DICOM file {name[:128]!r}" + ("" if frame is None else f", frame {frame}")
        raise type(exc)(f"{where}: {exc.detail}") from exc


def _describe(skipped: Counter[str] | dict[str, int]) -> str:
    return ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in sorted(skipped.items()))


def _check_counts(n_slices: int, pixels: int, limits: SeriesLimits) -> None:
    if n_slices > limits.max_slices:
        raise PayloadTooLarge(
            f"the series has {n_slices} slices, over the {limits.max_slices} slice limit"
        )
    if pixels > limits.max_total_pixels:
        raise ImageTooLarge(
            f"the series holds {pixels / 1e6:.1f} MP, "
            f"over the {limits.max_total_pixels / 1e6:.4g} MP limit"
        )


def _check_one_series(items: list[tuple[str, Any]]) -> None:
    groups: dict[str, list[Any]] = {}
    for _, ds in items:
        groups.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
    if len(groups) > 1:
        names = "; ".join(
            f"{uid or '(no SeriesInstanceUID)'} "
            f"({str(members[0].get('SeriesDescription', '') or 'no description')[:64]}, "
            f"{len(members)} files)"
            for uid, members in sorted(groups.items())
        )
        raise InvalidParameter(
            f"the upload mixes {len(groups)} series; send one at a time: {names}"
        )


def _order(items: list[tuple[str, Any]]) -> tuple[list[tuple[str, Any, float | None]], OrderedBy]:
    """Sort by position along the slice normal; else InstanceNumber; else upload order."""
    geometry = [_geometry(ds) for _, ds in items]
    if all(g is not None for g in geometry):
        normals = [g[0] for g in geometry if g is not None]
        reference = normals[0]
        for (name, _), normal in zip(items, normals, strict=True):
            if abs(float(np.dot(reference, normal))) < SAME_PLANE_COSINE:
                raise InvalidParameter(
                    f"slice {name[:128]!r} lies in another plane than the rest of the series "
                    "(ImageOrientationPatient differs): send one stack of parallel slices"
                )
        positions = [float(np.dot(reference, g[1])) for g in geometry if g is not None]
        order = sorted(range(len(items)), key=lambda i: positions[i])
        return [(items[i][0], items[i][1], positions[i]) for i in order], "position"
    numbers = [items_number(ds) for _, ds in items]
    if all(n is not None for n in numbers):
        order = sorted(range(len(items)), key=lambda i: numbers[i] or 0)
        return [(items[i][0], items[i][1], None) for i in order], "instance_number"
    return [(name, ds, None) for name, ds in items], "upload"


def items_number(ds: Any) -> int | None:
    try:
        value = ds.get("InstanceNumber")
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _geometry(ds: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(unit slice normal, position) from the instance's patient geometry, if usable."""
    try:
        iop = [float(v) for v in ds.ImageOrientationPatient]
        ipp = [float(v) for v in ds.ImagePositionPatient]
    except (AttributeError, TypeError, ValueError):
        return None
    if len(iop) != 6 or len(ipp) != 3:
        return None
    normal = np.cross(np.array(iop[:3]), np.array(iop[3:]))
    length = float(np.linalg.norm(normal))
    if not np.isfinite(length) or length < 1e-6 or not np.all(np.isfinite(ipp)):
        return None
    return normal / length, np.array(ipp)
