"""The uploads the benchmarks send: the demo PNG and slices of the sizes users send.

Users upload 512x512 and 1024x1024 slices (PNG, JPEG) and DICOMs, not the 150x150
demo images. These are made from the demo slice: upscaled (bicubic), then given
Gaussian noise of sigma 3 grey levels, seeded, as real scans carry. Without noise
an upscaled slice is smoother than any scan, and PNG encoding and decoding, whose
cost depends on the content, would look cheaper than they are.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np

NOISE_SIGMA = 3.0
JPEG_QUALITY = 92


@dataclass(frozen=True)
class Upload:
    key: str  # "png 512", ...
    data: bytes
    note: str  # what it is, for the report


def _upscaled(gray: np.ndarray, size: int, seed: int) -> np.ndarray:
    big = cv2.resize(gray, (size, size), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    noise = np.random.default_rng(seed).normal(0.0, NOISE_SIGMA, big.shape)
    return np.clip(big + noise, 0, 255).astype(np.uint8)


def _encode(ext: str, gray: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, gray, params or [])
    if not ok:
        raise RuntimeError(f"could not encode {ext}")
    return buf.tobytes()


def dicom_bytes(gray: np.ndarray) -> bytes:
    """A 12-bit MR DICOM (explicit VR little endian) of a uint8 slice, x16 + offset."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["braincam-benchmark"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.Rows, ds.Columns = gray.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.WindowCenter, ds.WindowWidth = 2100.0, 4000.0
    ds.PixelData = (gray.astype(np.uint16) * 16 + 50).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def benchmark_uploads(demo_png: bytes, sizes: tuple[int, ...] = (512, 1024)) -> list[Upload]:
    """The demo PNG as it is, then PNG and JPEG at each size, and a DICOM at the first."""
    gray = cv2.imdecode(np.frombuffer(demo_png, np.uint8), cv2.IMREAD_GRAYSCALE)
    if gray is None:
        raise ValueError("the demo image is not a readable PNG")
    h, w = gray.shape
    out = [Upload(f"demo png {w}x{h}", demo_png, f"the demo test image, {len(demo_png) >> 10} KiB")]
    for i, size in enumerate(sizes):
        big = _upscaled(gray, size, seed=i)
        png = _encode(".png", big)
        jpeg = _encode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        out.append(Upload(f"png {size}", png, f"{size}x{size} 8-bit PNG, {len(png) >> 10} KiB"))
        out.append(Upload(f"jpeg {size}", jpeg,
                          f"{size}x{size} JPEG q{JPEG_QUALITY}, {len(jpeg) >> 10} KiB"))
        if i == 0:
            dcm = dicom_bytes(big)
            out.append(Upload(f"dicom {size}", dcm,
                              f"{size}x{size} 12-bit MR DICOM, {len(dcm) >> 10} KiB"))
    return out
