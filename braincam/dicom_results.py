"""Series results as DICOM objects of the same study, built with highdicom.

Two objects, each in its own new series:
- a Comprehensive SR: the finding (a code of the model's class), the probability of
  every class, the deciding slice (an IMAGE reference to the source instance) and the
  overlay (an IMAGE reference to the Secondary Capture), the algorithm identified as
  in the IHE AI Results profile (TID 4019: name, version, and parameters carrying the
  graphs' sha256), and the research-use statement;
- a Secondary Capture (RGB) of the heatmap overlay on the deciding slice.

Everything the JSON answer warns about travels with them: the out-of-distribution
verdict of the series and of the deciding slice (with the detector, its score and
threshold), the model's notice, the warnings (`ResultWarning`, one TEXT item each)
and, on a flagged series, an "UNLIKE TRAINING DATA" banner burned into the Secondary
Capture (BurnedInAnnotation YES). The codes are listed in docs/dicom.md.

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
from braincam.head import HEAD_WARNING, HeadCheck
from braincam.model_spec import ModelSpec
from braincam.ood import OodVerdict
from braincam.overlay import OOD_BANNER, with_banner
from braincam.series import Series
from braincam.series_analysis import SERIES_RULE, SeriesGate, SeriesResult

RESEARCH_ONLY = "RESEARCH USE ONLY - NOT FOR CLINICAL USE"
MANUFACTURER = "braincam"
# A private coding scheme for the model's classes and outputs ("99" prefix: local).
CODING_SCHEME = "99BRAINCAM"

# Concepts as (code value, scheme, meaning): standard codes where DICOM has one
# (DCM, SNOMED CT "SCT", UCUM), the private scheme where it has none (docs/dicom.md).
Concept = tuple[str, str, str]
YES: Concept = ("373066001", "SCT", "Yes")  # CID 230 Yes-No
NO: Concept = ("373067005", "SCT", "No")
THRESHOLD: Concept = ("122411", "DCM", "Threshold Value")
ALGORITHM_NAME: Concept = ("111001", "DCM", "Algorithm Name")
COMMENT: Concept = ("121106", "DCM", "Comment")
NO_UNITS: Concept = ("1", "UCUM", "no units")
SERIES_IN_DISTRIBUTION: Concept = ("OOD-SERIES", CODING_SCHEME, "Series like the training data")
SLICE_IN_DISTRIBUTION: Concept = ("OOD-SLICE", CODING_SCHEME, "Slice like the training data")
OOD_SCORE: Concept = ("OOD-SCORE", CODING_SCHEME, "Out-of-distribution score")
FLAGGED_SLICES: Concept = ("OOD-FLAGGED", CODING_SCHEME, "Slices unlike the training data")
MODEL_NOTICE: Concept = ("NOTICE", CODING_SCHEME, "Model notice")
WARNING: Concept = ("WARNING", CODING_SCHEME, "Warning")
# The SR concept of each warning the JSON answers carry, by their machine code; a
# code without its own concept is written as a generic WARNING item.
WARNING_CONCEPTS: dict[str, Concept] = {
    "out_of_distribution": ("W-OOD", CODING_SCHEME, "Warning: unlike the training data"),
    HEAD_WARNING: ("W-HEAD", CODING_SCHEME, "Warning: explanation outside the head"),
}
# Where the deciding slice's heatmap lies against the head (braincam.head): fractions.
HEAT_OUTSIDE_HEAD: Concept = ("HEAT-OUT", CODING_SCHEME, "Heatmap mass outside the head")
HEAT_ON_RIM: Concept = ("HEAT-RIM", CODING_SCHEME, "Heatmap mass on the head's rim")


@dataclass(frozen=True)
class ResultWarning:
    """A warning of the JSON answer, to be carried by the DICOM results too."""

    code: str  # machine code, as in the JSON (e.g. "out_of_distribution")
    text: str  # what a reader must know, in a sentence or two


def ood_warnings(gate: SeriesGate | None) -> list[ResultWarning]:
    """The out-of-distribution warning of a series, if any slice was flagged."""
    text = None if gate is None else gate.warning()
    return [] if text is None else [ResultWarning("out_of_distribution", text)]


def head_warnings(check: HeadCheck | None) -> list[ResultWarning]:
    """The warning of a map lying mostly outside the head (braincam.head), if any."""
    text = None if check is None else check.warning()
    return [] if text is None else [ResultWarning(HEAD_WARNING, text)]


def result_warnings(result: SeriesResult) -> list[ResultWarning]:
    """Every warning of an analysed series: the gate's, then the deciding slice's map's."""
    return [*ood_warnings(result.gate), *head_warnings(result.heads.get(result.deciding_slice))]


def flagged(result: SeriesResult) -> bool:
    """Whether the series' decision rests on slices the gate flagged."""
    return result.gate is not None and not result.gate.in_distribution
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
    series: Series,
    result: SeriesResult,
    spec: ModelSpec,
    overlay: np.ndarray,
    warnings: Sequence[ResultWarning] | None = None,
) -> DicomResults:
    """The SR and the Secondary Capture of one analysed DICOM series.

    `overlay` is the RGB uint8 heatmap overlay of the deciding slice; `warnings` are
    every warning of the JSON answer these objects go with (None: the series' own,
    `result_warnings(result)`), each written into both objects.
    """
    from braincam.errors import InvalidParameter

    if series.format != "dicom" or not series.datasets:
        raise InvalidParameter(
            "DICOM results need a DICOM series (a NIfTI volume has no study to add them to)"
        )
    deciding = series.slices[result.deciding_slice]
    source = _with_type2(deciding.dataset)
    every = result_warnings(result) if warnings is None else list(warnings)
    sc = secondary_capture(source, overlay, result, spec, every)
    evidence = [_with_type2(ds) for ds in series.datasets]
    sr = structured_report(evidence, source, deciding.frame, sc, result, spec, every)
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


def _description(kind: str, result: SeriesResult) -> str:
    """SeriesDescription (64 chars): what worklists show, so a flagged series says it."""
    if flagged(result):
        return f"braincam {kind} - {OOD_BANNER} - RESEARCH USE ONLY"[:64]
    return f"braincam {kind} ({RESEARCH_ONLY})"[:64]


def secondary_capture(
    source: Any,
    overlay: np.ndarray,
    result: SeriesResult,
    spec: ModelSpec,
    warnings: Sequence[ResultWarning] = (),
) -> Any:
    import highdicom as hd
    from pydicom.uid import generate_uid

    rgb = np.ascontiguousarray(overlay, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"the overlay must be RGB [H,W,3], got {rgb.shape}")
    banner = flagged(result)
    if banner:
        rgb = with_banner(rgb)
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
        series_description=_description("heatmap", result),
        manufacturer_model_name=spec.name[:64],
        software_versions=f"braincam {braincam.__version__}",
        content_qualification="RESEARCH",
        content_date=date,
        content_time=time,
        series_date=date,
        series_time=time,
    )
    sc.ImageComments = " ".join(
        [
            *(f"WARNING: {w.text}." for w in warnings),
            f"{RESEARCH_ONLY}. Heatmap overlay (Grad-CAM family or occlusion) of the slice "
            f"deciding '{label}' (model {spec.name} v{spec.version}).",
            *([f"Model notice: {spec.notice}"] if spec.notice else []),
            DISCLAIMER,
        ]
    )[:10240]
    # YES: the banner is text burned into the pixels (no patient identity in it).
    sc.BurnedInAnnotation = "YES" if banner else "NO"
    # Type 2C in General Series: the source's value, else present and empty (unknown).
    sc.Laterality = source.get("Laterality", "") or ""
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = (
        f"heatmap overlay of model {spec.name} v{spec.version}"
        + (f", '{OOD_BANNER}' banner burned in" if banner else "")
    )[:1024]
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


def _concept(concept: Concept) -> Any:
    import highdicom as hd

    value, scheme, meaning = concept
    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def _num(concept: Concept, value: float, relationship: Any) -> Any:
    import highdicom as hd

    return hd.sr.NumContentItem(
        name=_concept(concept),
        value=float(value),
        unit=_concept(NO_UNITS),
        relationship_type=relationship,
    )


def warning_items(warnings: Sequence[ResultWarning]) -> list[Any]:
    """One TEXT item per warning, named by its concept (WARNING_CONCEPTS)."""
    import highdicom as hd

    return [
        hd.sr.TextContentItem(
            name=_concept(WARNING_CONCEPTS.get(w.code, WARNING)),
            value=w.text,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        for w in warnings
    ]


def head_items(check: HeadCheck | None) -> list[Any]:
    """The heatmap's shares outside the head and on its rim (fractions of its mass), as
    NUM items next to the overlay they describe; none when the map is flat."""
    import highdicom as hd

    if check is None:
        return []
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    shares = ((HEAT_OUTSIDE_HEAD, check.heat_outside_head), (HEAT_ON_RIM, check.heat_on_rim))
    return [_num(concept, value, contains) for concept, value in shares if value is not None]


def _verdict_item(concept: Concept, in_distribution: bool, relationship: Any) -> Any:
    import highdicom as hd

    return hd.sr.CodeContentItem(
        name=_concept(concept),
        value=_concept(YES if in_distribution else NO),
        relationship_type=relationship,
    )


def slice_verdict_item(verdict: OodVerdict, spec: ModelSpec) -> Any:
    """The gate's verdict on one referenced slice: Yes/No, with the detector's name (DCM
    Algorithm Name; how it was fitted is in model.json), the slice's score and the
    threshold as properties. Every item costs ~2.5 ms through highdicom and pydicom
    (built, deep-copied, re-read, searched three times, written): the tree holds what a
    reader needs and no more."""
    import highdicom as hd

    properties = hd.sr.RelationshipTypeValues.HAS_PROPERTIES
    item = _verdict_item(SLICE_IN_DISTRIBUTION, verdict.in_distribution, properties)
    detector = spec.ood.detector if spec.ood is not None else "unknown"
    name = hd.sr.TextContentItem(
        name=_concept(ALGORITHM_NAME),
        value=f"{detector} out-of-distribution detector",
        relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
    )
    item.ContentSequence = hd.sr.ContentSequence(
        [
            name,
            _num(OOD_SCORE, verdict.ood_score, properties),
            _num(THRESHOLD, verdict.ood_threshold, properties),
        ]
    )
    return item


def series_verdict_item(gate: SeriesGate) -> Any:
    """The series-level verdict, with how many slices the gate flagged (of the slices
    the evidence lists)."""
    import highdicom as hd

    properties = hd.sr.RelationshipTypeValues.HAS_PROPERTIES
    item = _verdict_item(
        SERIES_IN_DISTRIBUTION, gate.in_distribution, hd.sr.RelationshipTypeValues.CONTAINS
    )
    item.ContentSequence = hd.sr.ContentSequence([_num(FLAGGED_SLICES, gate.flagged, properties)])
    return item


def _calibration_parameter(spec: ModelSpec) -> str:
    calibration = spec.calibration
    if calibration is None:
        return "temperature: none (probabilities are the model's own softmax)"
    return (
        f"temperature {calibration.temperature:.6g} (probabilities = softmax(logits / T), "
        f"fitted on {calibration.fit_size} images)"
    )


def structured_report(
    evidence: Sequence[Any],
    source: Any,
    frame: int | None,
    sc: Any,
    result: SeriesResult,
    spec: ModelSpec,
    warnings: Sequence[ResultWarning] = (),
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
        # The series rule is stated once, in the Comment on the deciding slice; the
        # manufacturer in the SR's Manufacturer and the observer (items cost time).
        parameters=[*parameters, _calibration_parameter(spec)],
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
    gate = result.gate
    deciding_verdict = [] if gate is None else [slice_verdict_item(gate.deciding, spec)]
    finding.ContentSequence = hd.sr.ContentSequence(
        [*algorithm, deciding_image, *deciding_verdict]
    )
    series_verdict = [] if gate is None else [series_verdict_item(gate)]
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
    comment = _concept(COMMENT)
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
    notice = (
        [
            hd.sr.TextContentItem(
                name=_concept(MODEL_NOTICE), value=spec.notice, relationship_type=contains
            )
        ]
        if spec.notice
        else []
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(),
            name=MANUFACTURER,
            model_name=f"{spec.name} v{spec.version}"[:64],
        ),
    )
    root = hd.sr.ContainerContentItem(
        name=hd.sr.CodedConcept("18748-4", "LN", "Diagnostic imaging report"),
    )
    root.ContentSequence = hd.sr.ContentSequence(
        # What a reader must weigh the finding by comes right after it.
        [
            *observer,
            finding,
            *series_verdict,
            *warning_items(warnings),
            *notice,
            *probabilities,
            overlay_image,
            *head_items(result.heads.get(result.deciding_slice)),
            *texts,
        ]
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
        series_description=_description("result", result),
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
