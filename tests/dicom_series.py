"""Synthetic MR series for the series, DICOM-results and Orthanc tests (made in code).

`mr_series` turns a list of 8-bit slices (the demo dataset's PNGs) into one valid
axial MR series: shared study/series/frame-of-reference UIDs, patient attributes,
ImageOrientationPatient/ImagePositionPatient along the slice normal, pixel spacing,
and InstanceNumbers that deliberately disagree with the geometry (reversed), so a
test proves the order comes from the positions.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

CLASSES = ("glioma", "meningioma", "notumor", "pituitary")


@dataclass
class SyntheticSeries:
    files: list[tuple[str, bytes]]  # (name, DICOM bytes), in slice order
    study_uid: str
    series_uid: str
    instance_uids: list[str]  # in slice order (inferior -> superior)


def demo_slices(demo_data: Path, labels: Sequence[str]) -> list[np.ndarray]:
    """One Testing PNG per requested label (cycling through each class's files)."""
    used: dict[str, int] = {}
    out = []
    for label in labels:
        files = sorted((demo_data / "Testing" / label).glob("*.png"))
        k = used.get(label, 0)
        used[label] = k + 1
        img = cv2.imread(str(files[k % len(files)]), cv2.IMREAD_GRAYSCALE)
        assert img is not None
        out.append(img)
    return out


def mr_series(
    slices: Sequence[np.ndarray],
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    description: str = "synthetic T1 axial",
    spacing: float = 5.0,
    oblique: bool = False,
) -> SyntheticSeries:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_of_reference = generate_uid()
    # Rows along +x, columns along +y; a tilted stack when `oblique` (still parallel).
    angle = 0.3 if oblique else 0.0
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, np.cos(angle), np.sin(angle)])
    normal = np.cross(row, col)
    files, uids = [], []
    n = len(slices)
    for k, img in enumerate(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PatientName, ds.PatientID = "Synthetic^Phantom", "BRAINCAM-TEST-1"
        ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20260101", "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "A1", ""
        ds.Modality, ds.Manufacturer = "MR", "braincam-tests"
        ds.SeriesNumber, ds.SeriesDescription = 3, description
        ds.InstanceNumber = n - k  # reversed on purpose: order must come from geometry
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
        ds.MRAcquisitionType, ds.EchoTrainLength = "2D", 1
        ds.SliceThickness, ds.EchoTime, ds.RepetitionTime = spacing, 10.0, 500.0
        ds.MagneticFieldStrength = 1.5
        ds.PositionReferenceIndicator = ""
        ds.ImageOrientationPatient = [*row.tolist(), *col.tolist()]
        origin = np.array([-120.0, -120.0, -40.0]) + k * spacing * normal
        ds.ImagePositionPatient = [round(float(v), 4) for v in origin]
        ds.SliceLocation = round(float(np.dot(origin, normal)), 4)
        ds.PixelSpacing = [1.0, 1.0]
        ds.Rows, ds.Columns = img.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        ds.PixelData = (img.astype(np.uint16) * 16).tobytes()  # 12-bit, like a scanner
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        files.append((f"IM{k:04d}.dcm", buf.getvalue()))
        uids.append(str(ds.SOPInstanceUID))
    return SyntheticSeries(files, study_uid, series_uid, uids)


def shuffled_names(files: list[tuple[str, bytes]], seed: int = 0) -> list[tuple[str, bytes]]:
    """The files in a random order, renamed so names sort in that random order too."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(files))
    return [(f"file{i:03d}.dcm", files[j][1]) for i, j in enumerate(order)]


def zipped(files: Sequence[tuple[str, bytes]], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in files:
            zf.writestr(name, data)
    return buf.getvalue()


def text_sr(study_uid: str) -> bytes:
    """A non-image DICOM object (a Basic Text SR without content) of the same study."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = BasicTextSRStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = BasicTextSRStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality = "SR"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def noise_slices(n: int, size: int = 64, seed: int = 0) -> list[np.ndarray]:
    """Uniform noise: nothing like a brain, so the out-of-distribution gate flags it."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size), dtype=np.uint8) for _ in range(n)]


def find_items(items: Any, code_value: str) -> list[Any]:
    """Every SR content item (at any depth) whose concept name has this code value."""
    out = []
    for item in items:
        if item.ConceptNameCodeSequence[0].CodeValue == code_value:
            out.append(item)
        if "ContentSequence" in item:
            out.extend(find_items(item.ContentSequence, code_value))
    return out


def read_verdict(sr: Any) -> dict[str, Any]:
    """The out-of-distribution verdict as a reader finds it in the SR's content tree:
    series and deciding slice (Yes/No), the slice's score and threshold, the flagged
    count, the detector's name, and the TEXT items by concept code."""

    def yes(code: str) -> bool | None:
        found = find_items(sr.ContentSequence, code)
        return None if not found else found[0].ConceptCodeSequence[0].CodeValue == "373066001"

    def number(item: Any, code: str) -> float:
        (num,) = find_items(item.ContentSequence, code)
        return float(num.MeasuredValueSequence[0].NumericValue)

    (series,) = find_items(sr.ContentSequence, "OOD-SERIES")
    (deciding,) = find_items(sr.ContentSequence, "OOD-SLICE")
    return {
        "series_in_distribution": yes("OOD-SERIES"),
        "slice_in_distribution": yes("OOD-SLICE"),
        "flagged": int(number(series, "OOD-FLAGGED")),
        "ood_score": number(deciding, "OOD-SCORE"),
        "ood_threshold": number(deciding, "122411"),
        "detector": find_items(deciding.ContentSequence, "111001")[0].TextValue,
        "texts": {
            item.ConceptNameCodeSequence[0].CodeValue: item.TextValue
            for item in sr.ContentSequence
            if item.ValueType == "TEXT"
        },
    }
