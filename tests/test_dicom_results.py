"""Series analysis and its DICOM results: SR + Secondary Capture content, references,
and a clean bill from dciodvfy (Debian's dicom3tools)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from braincam.inference import OnnxModel
from braincam.series import read_series
from braincam.series_analysis import analyse, series_decision
from tests.dicom_series import demo_slices, mr_series, noise_slices, read_verdict, shuffled_names

LABELS = ["notumor", "glioma", "notumor", "meningioma", "pituitary", "notumor"]


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> OnnxModel:
    return OnnxModel(tiny_model_dir, providers=["CPUExecutionProvider"], intra_op_threads=1)


@pytest.fixture(scope="module")
def analysed(model: OnnxModel, demo_data: Path):  # type: ignore[no-untyped-def]
    from braincam.dicom_results import build_results

    synthetic = mr_series(demo_slices(demo_data, LABELS))
    series = read_series(shuffled_names(synthetic.files))
    result = analyse(model, series, explain_deciding=True)
    results = build_results(series, result, model.spec, result.overlays[result.deciding_slice])
    return synthetic, series, result, results


def test_series_matches_single_image_predictions(model: OnnxModel, analysed) -> None:  # type: ignore[no-untyped-def]
    """Each slice's probabilities equal /predict's path for that file alone."""
    from service.pipeline import prepare

    synthetic, series, result, _ = analysed
    for k, (_, data) in enumerate(synthetic.files):
        single = model.predict(prepare(data, None, model.spec).batch)[0]
        got = np.array([result.decisions[k].probabilities[label] for label in model.labels])
        np.testing.assert_allclose(got, single, rtol=1e-5, atol=1e-6)
    assert series.slices[result.deciding_slice].sop_instance_uid in synthetic.instance_uids


def test_series_rule(model: OnnxModel) -> None:
    from braincam.decision import decide

    spec = model.spec
    neg = spec.labels.index("notumor")

    def row(winner: int, p: float) -> np.ndarray:
        probs = np.full(len(spec.labels), (1 - p) / (len(spec.labels) - 1))
        probs[winner] = p
        return probs

    glioma, pituitary = spec.labels.index("glioma"), spec.labels.index("pituitary")
    decisions = [decide(r, spec) for r in (row(neg, 0.9), row(glioma, 0.6), row(pituitary, 0.8))]
    decision, k = series_decision(decisions, spec)
    assert (decision.label, k) == ("pituitary", 2)
    # A very confident notumor slice does not outvote a tumour slice.
    decisions = [decide(r, spec) for r in (row(neg, 0.99), row(glioma, 0.4))]
    assert series_decision(decisions, spec)[0].label == "glioma"
    # All negative: notumor, and the deciding slice is the closest call.
    decisions = [decide(r, spec) for r in (row(neg, 0.99), row(neg, 0.7), row(neg, 0.95))]
    decision, k = series_decision(decisions, spec)
    assert (decision.label, k) == ("notumor", 1)


def test_sr_content_and_references(model: OnnxModel, analysed) -> None:  # type: ignore[no-untyped-def]
    import highdicom as hd
    import pydicom

    synthetic, series, result, results = analysed
    sr = pydicom.dcmread(io.BytesIO(_encode(results.sr)))
    sc = pydicom.dcmread(io.BytesIO(_encode(results.secondary_capture)))
    report = hd.sr.ComprehensiveSR.from_dataset(sr)
    source = series.slices[result.deciding_slice].dataset
    for ds in (sr, sc):
        assert ds.StudyInstanceUID == synthetic.study_uid
        assert ds.PatientID == "BRAINCAM-TEST-1" and ds.PatientName == "Synthetic^Phantom"
        assert ds.SeriesInstanceUID != synthetic.series_uid
        assert ds.SOPInstanceUID not in synthetic.instance_uids
        assert "RESEARCH USE ONLY" in ds.SeriesDescription
        assert ds.ContentQualification == "RESEARCH"
    assert sr.SeriesInstanceUID != sc.SeriesInstanceUID
    assert sc.FrameOfReferenceUID == source.FrameOfReferenceUID
    # The evidence lists every source slice, plus the overlay.
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series_item in study.ReferencedSeriesSequence
        for item in series_item.ReferencedSOPSequence
    }
    assert evidence == {*synthetic.instance_uids, sc.SOPInstanceUID}
    text = _flatten(report.ContentSequence)
    spec = model.spec
    assert f"CODE Finding = {result.decision.label}" in text
    assert f"TEXT Algorithm Name = {spec.name}" in text
    assert f"TEXT Algorithm Version = {spec.version}" in text
    assert spec.graphs.classifier.sha256 in text
    assert "RESEARCH USE ONLY - NOT FOR CLINICAL USE" in text
    for label in spec.labels:
        p = result.decision.probabilities[label]
        assert f"NUM Probability of {label} = {p:.6g}" in text
    assert f"IMAGE Source of Measurement = {source.SOPInstanceUID}" in text
    assert f"IMAGE Heatmap overlay = {sc.SOPInstanceUID}" in text
    # The Secondary Capture: the overlay pixels, RGB, pointing at its source slice.
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    np.testing.assert_array_equal(sc.pixel_array, result.overlays[result.deciding_slice])
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert "RESEARCH USE ONLY" in sc.ImageComments
    image = hd.imread(io.BytesIO(_encode(results.secondary_capture)))
    np.testing.assert_array_equal(image.get_frame(1), result.overlays[result.deciding_slice])


def _flatten(items, depth: int = 0) -> str:  # type: ignore[no-untyped-def]
    """The content tree as 'TYPE name = value' lines (values: code meanings, numbers,
    text, referenced SOP instance UIDs)."""
    lines = []
    for item in items:
        kind = item.ValueType
        name = item.ConceptNameCodeSequence[0].CodeMeaning
        if kind == "CODE":
            value = item.ConceptCodeSequence[0].CodeMeaning
        elif kind == "NUM":
            value = f"{float(item.MeasuredValueSequence[0].NumericValue):.6g}"
        elif kind == "TEXT":
            value = item.TextValue
        elif kind == "IMAGE":
            value = item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        else:
            value = ""
        lines.append(f"{kind} {name} = {value}")
        if "ContentSequence" in item:
            lines.append(_flatten(item.ContentSequence, depth + 1))
    return "\n".join(lines)


def _encode(ds) -> bytes:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dciodvfy(data: bytes, tmp_path: Path, name: str) -> str:
    exe = shutil.which("dciodvfy")
    if exe is None:
        if os.environ.get("BRAINCAM_REQUIRE_ORTHANC"):
            pytest.fail("dciodvfy (Debian dicom3tools) is required here but not installed")
        pytest.skip("dciodvfy not installed (apt-get install dicom3tools)")
    path = tmp_path / name
    path.write_bytes(data)
    run = subprocess.run([exe, "-new", str(path)], capture_output=True, text=True, timeout=60)
    return run.stdout + run.stderr


def test_dciodvfy_reports_no_errors(analysed, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, _, _, results = analysed
    for name, ds in (("sr.dcm", results.sr), ("sc.dcm", results.secondary_capture)):
        report = dciodvfy(_encode(ds), tmp_path, name)
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert not errors, f"{name}:\n{report}"
        print(f"dciodvfy {name}:\n{report}")  # shown with -s: the measured validator output


def test_series_rule_binary_threshold(model: OnnxModel) -> None:
    """A binary model's threshold decides each slice, so a slice whose tumour
    probability passes a low threshold makes the series positive."""
    from braincam.decision import decide
    from braincam.model_spec import Decision as DecisionSpec

    spec = model.spec.model_copy(
        update={
            "task": "binary",
            "labels": ["notumor", "tumor"],
            "decision": DecisionSpec(positive_label="tumor", threshold=0.3),
        }
    )
    decisions = [decide(np.array(p), spec) for p in ([0.9, 0.1], [0.65, 0.35], [0.8, 0.2])]
    decision, k = series_decision(decisions, spec)
    assert (decision.label, k) == ("tumor", 1)
    decisions = [decide(np.array(p), spec) for p in ([0.9, 0.1], [0.75, 0.25])]
    decision, k = series_decision(decisions, spec)
    assert (decision.label, k, decision.confidence) == ("notumor", 1, 0.75)


NOTICE = "Test model: trained on synthetic lesions only, never saw a real scan."


@pytest.fixture(scope="module")
def flagged_series(model: OnnxModel):  # type: ignore[no-untyped-def]
    """A series of noise slices: the gate flags every one."""
    from braincam.dicom_results import build_results

    synthetic = mr_series(noise_slices(5))
    series = read_series(synthetic.files)
    result = analyse(model, series, explain_deciding=True)
    spec = model.spec.model_copy(update={"notice": NOTICE})
    results = build_results(series, result, spec, result.overlays[result.deciding_slice])
    return series, result, results


def test_series_rule_decides_on_in_distribution_slices(model: OnnxModel) -> None:
    from braincam.decision import decide

    spec = model.spec
    probs = {
        "glioma": [0.05, 0.9, 0.03, 0.02],
        "meningioma": [0.1, 0.2, 0.6, 0.1],
        "notumor": [0.9, 0.05, 0.03, 0.02],
    }
    order = ["notumor", "glioma", "meningioma", "pituitary"]

    def row(kind: str) -> np.ndarray:
        return np.array([probs[kind][order.index(label)] for label in spec.labels])

    decisions = [decide(row(k), spec) for k in ("notumor", "glioma", "meningioma")]
    # The confident glioma slice is flagged: the meningioma slice decides.
    decision, k = series_decision(decisions, spec, [True, False, True])
    assert (decision.label, k) == ("meningioma", 2)
    # Only the negative slice passes: notumor, although flagged slices look like tumours.
    decision, k = series_decision(decisions, spec, [True, False, False])
    assert (decision.label, k) == ("notumor", 0)
    # Every slice flagged: the rule runs over all of them.
    decision, k = series_decision(decisions, spec, [False, False, False])
    assert (decision.label, k) == ("glioma", 1)


def test_flagged_series_gate_and_reject(model: OnnxModel, flagged_series) -> None:  # type: ignore[no-untyped-def]
    from braincam.errors import OutOfDistribution

    series, result, _ = flagged_series
    gate = result.gate
    assert gate is not None and gate.in_distribution is False
    assert gate.flagged == gate.n_slices == 5
    assert all(v is not None and not v.in_distribution for v in result.ood)
    assert gate.deciding == result.ood[result.deciding_slice]
    assert "UNLIKE TRAINING DATA: all 5 slices" in (gate.warning() or "")
    with pytest.raises(OutOfDistribution, match="all 5 of 5 slices") as refused:
        analyse(model, series, explain_deciding=True, ood_policy="reject")
    assert refused.value.status_code == 422 and refused.value.code == "out_of_distribution"


def test_mixed_series_leaves_flagged_slices_out(model: OnnxModel, demo_data: Path) -> None:
    slices = demo_slices(demo_data, LABELS)
    noise = noise_slices(3, seed=1)
    series = read_series(mr_series([noise[0], *slices[:3], noise[1], *slices[3:], noise[2]]).files)
    result = analyse(model, series)
    gate = result.gate
    assert gate is not None
    passed = [bool(v and v.in_distribution) for v in result.ood]
    assert not any(passed[k] for k in (0, 4, 8))  # the noise slices
    assert gate.flagged == passed.count(False) >= 3 and gate.in_distribution
    assert passed[result.deciding_slice]
    expected, _ = series_decision(
        [result.decisions[i] for i, p in enumerate(passed) if p], model.spec
    )
    assert result.decision == expected
    warning = gate.warning() or ""
    assert f"{gate.flagged} of {len(passed)} slices" in warning and "left out" in warning


def test_sr_carries_the_verdict_and_the_notice(flagged_series, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import highdicom as hd
    import pydicom

    _, result, results = flagged_series
    data = _encode(results.sr)
    report = hd.sr.ComprehensiveSR.from_dataset(pydicom.dcmread(io.BytesIO(data)))
    verdict = read_verdict(report)
    deciding = result.ood[result.deciding_slice]
    assert verdict["series_in_distribution"] is False
    assert verdict["slice_in_distribution"] is False
    assert verdict["flagged"] == 5
    assert verdict["detector"] == "mahalanobis out-of-distribution detector"
    assert verdict["ood_score"] == pytest.approx(deciding.ood_score, rel=1e-6)
    assert verdict["ood_threshold"] == pytest.approx(deciding.ood_threshold, rel=1e-6)
    assert verdict["texts"]["NOTICE"] == NOTICE
    assert verdict["texts"]["W-OOD"].startswith("UNLIKE TRAINING DATA: all 5 slices")
    assert "UNLIKE TRAINING DATA" in report.SeriesDescription
    text = _flatten(report.ContentSequence)
    assert "TEXT Algorithm Parameters = temperature " in text
    assert "CODE Series like the training data = No" in text
    for name, ds in (("sr.dcm", results.sr), ("sc.dcm", results.secondary_capture)):
        report_text = dciodvfy(_encode(ds), tmp_path, name)
        errors = [line for line in report_text.splitlines() if line.startswith("Error")]
        assert not errors, f"{name}:\n{report_text}"


def test_in_distribution_sr_says_so(analysed) -> None:  # type: ignore[no-untyped-def]
    import pydicom

    _, _, result, results = analysed
    sr = pydicom.dcmread(io.BytesIO(_encode(results.sr)))
    verdict = read_verdict(sr)
    gate = result.gate
    assert verdict["series_in_distribution"] is gate.in_distribution
    assert verdict["flagged"] == gate.flagged
    assert ("W-OOD" in verdict["texts"]) == (gate.flagged > 0)
    assert "NOTICE" not in verdict["texts"]  # the tiny model has no notice


def test_banner_only_on_a_flagged_series(analysed, flagged_series) -> None:  # type: ignore[no-untyped-def]
    from braincam.overlay import banner_height

    _, _, result, results = analysed
    sc = results.secondary_capture
    assert not result.gate or result.gate.in_distribution
    assert sc.BurnedInAnnotation == "NO"
    np.testing.assert_array_equal(sc.pixel_array, result.overlays[result.deciding_slice])

    _, result, results = flagged_series
    sc = results.secondary_capture
    overlay = result.overlays[result.deciding_slice]
    band = banner_height(overlay.shape[0])
    assert sc.BurnedInAnnotation == "YES"
    assert "UNLIKE TRAINING DATA" in sc.SeriesDescription and "WARNING" in sc.ImageComments
    assert NOTICE in sc.ImageComments
    pixels = sc.pixel_array
    np.testing.assert_array_equal(pixels[band:], overlay[band:])  # the image below is kept
    top = pixels[:band].reshape(-1, 3).astype(int)
    red = np.all(top == (176, 0, 32), axis=1).mean()
    lighter = (top.min(axis=1) > 40).mean()  # text pixels: white blended into the red
    assert red > 0.5 and lighter > 0.02  # a red band with text on it


def test_every_warning_of_the_answer_reaches_the_sr(model: OnnxModel, flagged_series) -> None:  # type: ignore[no-untyped-def]
    """A caller's warnings (the JSON answer's) are written as they are; a code without a
    concept of its own becomes a generic Warning item, in the SC's comments too."""
    from braincam.dicom_results import ResultWarning, build_results, ood_warnings

    series, result, _ = flagged_series
    warnings = [*ood_warnings(result.gate), ResultWarning("new_kind", "Something to know.")]
    results = build_results(
        series, result, model.spec, result.overlays[result.deciding_slice], warnings
    )
    verdict = read_verdict(results.sr)
    assert verdict["texts"]["WARNING"] == "Something to know."
    assert verdict["texts"]["W-OOD"] == warnings[0].text
    assert "WARNING: Something to know." in results.secondary_capture.ImageComments
