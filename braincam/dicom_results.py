"""Series results as DICOM objects of the same study, built with highdicom.

Two objects, each in its own new series:
- a Comprehensive SR: the finding (a code of the model's class), the probability of
  every class, the deciding slice (an IMAGE reference to the source instance) and the
  overlay (an IMAGE reference to the Secondary Capture), the algorithm identified as
  in the IHE AI Results profile (TID 4019: name, version, and parameters carrying the
  graphs' sha256), and the research-use statement;
- a Secondary Capture (RGB) of the heatmap overlay on the deciding slice.

Patient and study attributes come from the source instances (highdicom copies them),
the frame of reference is copied onto the Secondary Capture, every UID of the new
objects is new, and the SR's evidence lists every source instance it was inferred
from. Every object says "research use only" in its series description, and the
SR in its content; ContentQualification is RESEARCH.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import braincam
from braincam import DISCLAIMER
from braincam.model_spec import ModelSpec
from braincam.series import Series
from braincam.series_analysis import SERIES_RULE, SeriesResult

RESEARCH_ONLY = "RESEARCH USE ONLY - NOT FOR CLINICAL USE"
MANUFACTURER = "braincam"
# A private coding scheme for the model's classes and outputs ("99" prefix: local).
CODING_SCHEME = "99BRAINCAM"
# Series numbers of the result series: high, so viewers list them after the source.
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
# The source's type-2 patient/study attributes highdicom reads; empty when absent.
_TYPE2_FROM_SOURCE = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


@dataclass(frozen=True)
class DicomResults:
    sr: Any  # highdicom ComprehensiveSR (a pydicom Dataset)
    secondary_capture: Any  # highdicom SCImage

    @property
    def datasets(self) -> list[Any]:
        return [self.sr, self.secondary_capture]


def build_results(
    series: Series, result: SeriesResult, spec: ModelSpec, overlay: np.ndarray
) -> DicomResults:
    """The SR and the Secondary Capture of one analysed DICOM series.

    `overlay` is the RGB uint8 heatmap overlay of the deciding slice.
    """
    from braincam.errors import InvalidParameter

    if series.format != "dicom" or not series.datasets:
        raise InvalidParameter(
            "DICOM results need a DICOM series (a NIfTI volume has no study to add them to)"
        )
    deciding = series.slices[result.deciding_slice]
    source = _with_type2(deciding.dataset)
    sc = secondary_capture(source, overlay, result, spec)
    evidence = [_with_type2(ds) for ds in series.datasets]
    sr = structured_report(evidence, source, deciding.frame, sc, result, spec)
    return DicomResults(sr, sc)


def _with_type2(ds: Any) -> Any:
    """A shallow copy with the type-2 attributes highdicom reads present (maybe empty)."""
    if all(name in ds for name in _TYPE2_FROM_SOURCE):
        return ds
    copy = ds.copy()
    for name in _TYPE2_FROM_SOURCE:
        if name not in copy:
            setattr(copy, name, None)
    return copy


def _orientation_letters(vector: Sequence[float]) -> str:
    """A direction cosine -> DICOM patient orientation letters (dominant axes first)."""
    letters = []
    for axis in np.argsort(-np.abs(np.asarray(vector, dtype=float)))[:2]:
        value = float(vector[axis])
        if abs(value) < 1e-3:
            continue
        letters.append(("L", "P", "H")[axis] if value > 0 else ("R", "A", "F")[axis])
    return "".join(letters) or "L"


def _patient_orientation(ds: Any) -> tuple[str, str]:
    try:
        iop = [float(v) for v in ds.ImageOrientationPatient]
        return _orientation_letters(iop[:3]), _orientation_letters(iop[3:])
    except (AttributeError, TypeError, ValueError):
        return ("L", "P")  # axial in the radiological layout decode_image produces


def _now() -> tuple[datetime.date, datetime.time]:
    now = datetime.datetime.now()
    return now.date(), now.time().replace(microsecond=0)


def secondary_capture(
    source: Any, overlay: np.ndarray, result: SeriesResult, spec: ModelSpec
) -> Any:
    import highdicom as hd
    from pydicom.uid import generate_uid

    rgb = np.ascontiguousarray(overlay, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"the overlay must be RGB [H,W,3], got {rgb.shape}")
    date, time = _now()
    label = result.decision.label
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=generate_uid(),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=_patient_orientation(source),
        series_description=f"braincam heatmap ({RESEARCH_ONLY})"[:64],
        manufacturer_model_name=spec.name[:64],
        software_versions=f"braincam {braincam.__version__}",
        content_qualification="RESEARCH",
        content_date=date,
        content_time=time,
        series_date=date,
        series_time=time,
    )
    sc.ImageComments = (
        f"{RESEARCH_ONLY}. Heatmap overlay (Grad-CAM family or occlusion) of the slice "
        f"deciding '{label}' "
        f"(model {spec.name} v{spec.version}). {DISCLAIMER}"
    )
    sc.BurnedInAnnotation = "NO"
    # Type 2C in General Series: the source's value, else present and empty (unknown).
    sc.Laterality = source.get("Laterality", "") or ""
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = f"heatmap overlay of model {spec.name} v{spec.version}"[:1024]
    sc.SourceImageSequence = [_reference(source, None)]
    if "FrameOfReferenceUID" in source:
        sc.FrameOfReferenceUID = source.FrameOfReferenceUID
    return sc


def _reference(ds: Any, frame: int | None) -> Any:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    if frame is not None:
        item.ReferencedFrameNumber = frame + 1
    return item


def _code(value: str, meaning: str) -> Any:
    import highdicom as hd

    return hd.sr.CodedConcept(value=value[:16], scheme_designator=CODING_SCHEME, meaning=meaning)


def structured_report(
    evidence: Sequence[Any],
    source: Any,
    frame: int | None,
    sc: Any,
    result: SeriesResult,
    spec: ModelSpec,
) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    contains = hd.sr.RelationshipTypeValues.CONTAINS
    decision = result.decision
    graphs = spec.graphs
    parameters = [f"classifier sha256 {graphs.classifier.sha256}"]
    gradcam = graphs.gradcam
    if gradcam is not None:  # a model directory may come without the Grad-CAM graph
        parameters.append(f"gradcam sha256 {gradcam.sha256}")
    algorithm = hd.sr.AlgorithmIdentification(
        name=spec.name,
        version=spec.version,
        parameters=[*parameters, f"series rule: {SERIES_RULE}"],
        manufacturer=MANUFACTURER,
    )
    finding = hd.sr.CodeContentItem(
        name=codes.DCM.Finding,
        value=_code(decision.label, decision.label),
        relationship_type=contains,
    )
    deciding_image = hd.sr.ImageContentItem(
        name=hd.sr.CodedConcept("121112", "DCM", "Source of Measurement"),
        referenced_sop_class_uid=source.SOPClassUID,
        referenced_sop_instance_uid=source.SOPInstanceUID,
        referenced_frame_numbers=None if frame is None else [frame + 1],
        relationship_type=hd.sr.RelationshipTypeValues.INFERRED_FROM,
    )
    finding.ContentSequence = hd.sr.ContentSequence([*algorithm, deciding_image])
    probabilities = [
        hd.sr.NumContentItem(
            name=_code(f"P-{i}", f"Probability of {label}"),
            value=float(decision.probabilities[label]),
            unit=hd.sr.CodedConcept("1", "UCUM", "no units"),
            relationship_type=contains,
        )
        for i, label in enumerate(spec.labels)
    ]
    overlay_image = hd.sr.ImageContentItem(
        name=_code("OVERLAY", "Heatmap overlay"),
        referenced_sop_class_uid=sc.SOPClassUID,
        referenced_sop_instance_uid=sc.SOPInstanceUID,
        relationship_type=contains,
    )
    comment = hd.sr.CodedConcept("121106", "DCM", "Comment")
    n = len(result.decisions)
    texts = [
        hd.sr.TextContentItem(name=comment, value=text, relationship_type=contains)
        for text in (
            f"{RESEARCH_ONLY}. {DISCLAIMER}",
            f"Series decision over {n} slices by the rule: {SERIES_RULE}. "
            f"Deciding slice {result.deciding_slice + 1} of {n} (ordered along the slice "
            f"normal), confidence {decision.confidence:.4f}.",
        )
    ]
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(),
            name=MANUFACTURER,
            manufacturer_name=MANUFACTURER,
            model_name=f"{spec.name} v{spec.version}"[:64],
        ),
    )
    root = hd.sr.ContainerContentItem(
        name=hd.sr.CodedConcept("18748-4", "LN", "Diagnostic imaging report"),
    )
    root.ContentSequence = hd.sr.ContentSequence(
        [*observer, finding, *probabilities, overlay_image, *texts]
    )
    date, time = _now()
    sr = hd.sr.ComprehensiveSR(
        evidence=[*evidence, sc],
        content=root,
        series_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=f"braincam result ({RESEARCH_ONLY})"[:64],
        manufacturer_model_name=spec.name[:64],
        software_versions=f"braincam {braincam.__version__}",
        content_qualification="RESEARCH",
        coding_schemes=[
            hd.coding_schemes.CodingSchemeIdentificationItem(
                designator=CODING_SCHEME,
                name="braincam model classes and outputs",
            )
        ],
        content_date=date,
        content_time=time,
        series_date=date,
        series_time=time,
    )
    return sr
