"""What the trust signals cost on `/explain/series` with `output=dicom`.

    python -m benchmarks.bench_series_dicom [--model-dir models/demo] [--slices 12] [--runs 15]

A synthetic 12-slice MR series of noise (every slice flagged by the demo model's
out-of-distribution gate) is explained with output=dicom in process, as the route's
worker thread runs it (service.series_pipeline.run_series). The trust signals are
what a flagged answer adds to its DICOM results: the verdict, score, threshold and
warning items of the SR and the burned-in banner of the Secondary Capture. Their cost
is measured as the difference between building the results with them and building
the same results with the gate's verdicts removed, interleaved run by run, and
reported as a share of the whole request. Ratios from one run (the machine is shared).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.machine import load_average
from braincam.dicom_results import build_results, ood_warnings
from braincam.inference import OnnxModel
from braincam.series import read_series
from braincam.series_analysis import analyse
from service.core.config import Settings
from service.metrics import Metrics
from service.series_pipeline import SeriesParams, limits_from, run_series

ROOT = Path(__file__).resolve().parents[1]


def noise_series(n: int, size: int = 256, seed: int = 0) -> list[tuple[str, bytes]]:
    """n parallel axial MR slices of uniform noise, 12-bit, as a scanner writes them."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    rng = np.random.default_rng(seed)
    study, series_uid, frame = generate_uid(), generate_uid(), generate_uid()
    files = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
        ds.FrameOfReferenceUID = frame
        ds.PatientName, ds.PatientID = "Benchmark^Noise", "BRAINCAM-BENCH"
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20260101", "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.Modality, ds.Manufacturer = "MR", "braincam-benchmarks"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [-120.0, -120.0, -40.0 + 5.0 * k]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 5.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        files.append((f"IM{k:04d}.dcm", buf.getvalue()))
    return files


def _seconds(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=ROOT / "models" / "demo")
    p.add_argument("--slices", type=int, default=12)
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)

    model = OnnxModel(args.model_dir, providers=["CPUExecutionProvider"])
    settings = Settings(model_dir=args.model_dir)
    limits = limits_from(settings)
    files = noise_series(args.slices)
    params = SeriesParams(output="dicom", explain=True, ood_policy="warn")
    series = read_series(files, limits)
    result = analyse(model, series, explain=[], explain_deciding=True, method="gradcam",
                     ood_policy="warn")
    if result.gate is None:
        raise SystemExit("the model has no out-of-distribution detector: nothing to measure")
    if result.gate.in_distribution:
        raise SystemExit("the gate passed the noise series: no trust signals to measure")
    overlay = result.overlays[result.deciding_slice]
    warned = ood_warnings(result.gate)
    silent = dataclasses.replace(result, gate=None, ood=[None] * len(result.ood))

    metrics = Metrics()
    whole, with_signals, without = [], [], []
    run_series(model, metrics, files, limits, params, time.perf_counter())  # warm-up
    for _ in range(args.runs):
        whole.append(_seconds(lambda: run_series(
            model, metrics, files, limits, params, time.perf_counter())))
        with_signals.append(_seconds(lambda: build_results(
            series, result, model.spec, overlay, warned)))
        without.append(_seconds(lambda: build_results(series, silent, model.spec, overlay, [])))

    total = statistics.median(whole)
    extra = statistics.median(a - b for a, b in zip(with_signals, without, strict=True))
    lines = [
        "# Trust signals on /explain/series (output=dicom)",
        "",
        f"- model: {args.model_dir.name}; series: {args.slices} noise slices, "
        f"{result.gate.flagged} flagged; runs: {args.runs}; load average: {load_average()}",
        f"- whole request (in process), median: {total * 1000:.1f} ms",
        f"- DICOM results with the trust signals, median: "
        f"{statistics.median(with_signals) * 1000:.1f} ms; without: "
        f"{statistics.median(without) * 1000:.1f} ms",
        f"- trust signals' cost (paired median difference): {extra * 1000:.1f} ms = "
        f"**{100 * extra / total:.1f} %** of the request",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"{stamp}-series-dicom.md").write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
