"""A real PACS: Orthanc with its DICOMweb plugin, started by the test (tests/orthanc.py).

A synthetic MR series goes in by STOW-RS; braincam fetches it by WADO-RS (the CLI's
`main` and the authenticated POST /dicomweb/analyze), stores the SR and Secondary
Capture back by STOW-RS, and the test reads them back with QIDO-RS/WADO-RS and checks
their content and references.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.clients import ready_client
from tests.dicom_series import demo_slices, mr_series, noise_slices, read_verdict, text_sr
from tests.orthanc import orthanc

API_KEY = "test-key-orthanc"
LABELS = ["notumor", "glioma", "notumor", "meningioma", "pituitary", "notumor", "glioma"]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with orthanc(tmp_path_factory.mktemp("orthanc")) as url:
        yield url


def _upload(url: str, files: list[tuple[str, bytes]]) -> None:
    import pydicom

    from braincam.dicomweb import connect

    connect(url).store_instances([pydicom.dcmread(io.BytesIO(d)) for _, d in files])


def _series_by_modality(client: Any, study_uid: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in client.search_for_series(study_instance_uid=study_uid):
        modality = item["00080060"]["Value"][0]
        out.setdefault(modality, []).append(item["0020000E"]["Value"][0])
    return out


def _read_back(client: Any, study_uid: str, summary: dict[str, Any]) -> tuple[Any, Any]:
    """QIDO-RS finds the result instances, WADO-RS retrieves them."""
    objects = []
    for key in ("sr", "secondary_capture"):
        ref = summary[key]
        found = client.search_for_instances(
            study_instance_uid=study_uid, series_instance_uid=ref["series_instance_uid"]
        )
        assert [i["00080018"]["Value"][0] for i in found] == [ref["sop_instance_uid"]]
        objects.append(
            client.retrieve_instance(
                study_uid, ref["series_instance_uid"], ref["sop_instance_uid"]
            )
        )
    return objects[0], objects[1]


def _check_results(sr: Any, sc: Any, synthetic: Any, summary: dict[str, Any]) -> None:
    assert sr.StudyInstanceUID == sc.StudyInstanceUID == synthetic.study_uid
    assert sr.PatientID == sc.PatientID == "BRAINCAM-TEST-1"
    finding = next(
        i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121071"
    )
    assert finding.ConceptCodeSequence[0].CodeMeaning == summary["label"]
    source = next(i for i in finding.ContentSequence if i.ValueType == "IMAGE")
    deciding = source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    assert deciding == summary["deciding_sop_instance_uid"] in synthetic.instance_uids
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == deciding
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {*synthetic.instance_uids, sc.SOPInstanceUID}
    texts = " ".join(i.TextValue for i in sr.ContentSequence if i.ValueType == "TEXT")
    assert "RESEARCH USE ONLY" in texts
    assert sc.PhotometricInterpretation == "RGB" and sc.pixel_array.shape == (64, 64, 3)


def test_cli_round_trip(
    pacs: str, tiny_model_dir: Path, demo_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from braincam.dicomweb import connect
    from braincam.dicomweb_cli import main

    synthetic = mr_series(demo_slices(demo_data, LABELS))
    _upload(pacs, [*synthetic.files, ("sr.dcm", text_sr(synthetic.study_uid))])
    argv = ["--url", pacs, "--study", synthetic.study_uid, "--model-dir", str(tiny_model_dir)]
    t0 = time.perf_counter()
    assert main(argv) == 0
    elapsed = time.perf_counter() - t0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1  # the MR series only: the uploaded SR series is not analysed
    summary = json.loads(lines[0])
    assert summary["series_instance_uid"] == synthetic.series_uid
    assert summary["n_slices"] == len(LABELS) and summary["stored"] is True
    client = connect(pacs)
    sr, sc = _read_back(client, synthetic.study_uid, summary)
    _check_results(sr, sc, synthetic, summary)
    modalities = _series_by_modality(client, synthetic.study_uid)
    assert len(modalities["SR"]) == 2 and len(modalities["MR"]) == 1
    # Analysing the study again leaves braincam's own result series alone.
    with capsys.disabled():
        print(f"\nOrthanc round trip (fetch + analyse + store, CLI incl. model load): "
              f"{elapsed * 1000:.0f} ms; stages {summary['timing_ms']}")
    assert main(argv) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1


def test_route_round_trip(pacs: str, tiny_model_dir: Path, demo_data: Path) -> None:
    from braincam.dicomweb import connect
    from service.core.config import Settings

    synthetic = mr_series(demo_slices(demo_data, LABELS[:4]))
    _upload(pacs, synthetic.files)
    settings = Settings(
        model_dir=tiny_model_dir,
        providers="CPUExecutionProvider",
        api_key=API_KEY,
        dicomweb_url=pacs,
        max_concurrency=1,
    )
    body = {"study_instance_uid": synthetic.study_uid}
    with ready_client(settings) as client:
        assert client.post("/dicomweb/analyze", json=body).status_code == 401
        headers = {"X-API-Key": API_KEY}
        bad = client.post(
            "/dicomweb/analyze", json={"study_instance_uid": "../studies"}, headers=headers
        )
        assert bad.status_code == 422 and "DICOM UID" in bad.json()["detail"]
        missing = client.post(
            "/dicomweb/analyze", json={"study_instance_uid": "1.2.3.999"}, headers=headers
        )
        assert missing.status_code == 404, missing.text
        t0 = time.perf_counter()
        r = client.post("/dicomweb/analyze", json=body, headers=headers)
        elapsed = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    (summary,) = r.json()["results"]
    print(f"\nOrthanc round trip through POST /dicomweb/analyze: {elapsed * 1000:.0f} ms")
    sr, sc = _read_back(connect(pacs), synthetic.study_uid, summary)
    _check_results(sr, sc, synthetic, summary)
    np.testing.assert_array_equal(sc.pixel_array.shape, (64, 64, 3))


def _foreign_study(pacs: str) -> Any:
    """A study whose one series is noise: the out-of-distribution gate flags every slice."""
    synthetic = mr_series(noise_slices(4, seed=7))
    _upload(pacs, synthetic.files)
    return synthetic


def test_cli_ood_policy(
    pacs: str, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """reject: exit 1, the reason on stderr, nothing stored; warn: stored, and the SR and
    the overlay say it."""
    from braincam.dicomweb import connect
    from braincam.dicomweb_cli import main

    synthetic = _foreign_study(pacs)
    client = connect(pacs)
    argv = ["--url", pacs, "--study", synthetic.study_uid, "--model-dir", str(tiny_model_dir)]
    assert main([*argv, "--ood-policy", "reject"]) == 1
    err = capsys.readouterr().err
    assert "all 4 of 4 slices" in err and "nothing was stored in the PACS" in err
    assert _series_by_modality(client, synthetic.study_uid) == {"MR": [synthetic.series_uid]}

    assert main([*argv, "--ood-policy", "warn"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip())
    assert summary["in_distribution"] is False and summary["flagged_slices"] == 4
    assert summary["warnings"][0]["code"] == "out_of_distribution"
    assert "UNLIKE TRAINING DATA" in captured.err
    sr, sc = _read_back(client, synthetic.study_uid, summary)
    verdict = read_verdict(sr)
    assert verdict["series_in_distribution"] is False and verdict["flagged"] == 4
    assert verdict["ood_score"] == pytest.approx(summary["ood_score"], rel=1e-6)
    assert verdict["texts"]["W-OOD"] == summary["warnings"][0]["detail"]
    assert sc.BurnedInAnnotation == "YES" and "UNLIKE TRAINING DATA" in sc.SeriesDescription


def test_route_ood_policy(pacs: str, tiny_model_dir: Path) -> None:
    from braincam.dicomweb import connect
    from service.core.config import Settings

    synthetic = _foreign_study(pacs)
    client = connect(pacs)
    body = {"study_instance_uid": synthetic.study_uid}
    headers = {"X-API-Key": API_KEY}
    results = {}
    for policy in ("reject", "warn"):
        settings = Settings(
            model_dir=tiny_model_dir,
            providers="CPUExecutionProvider",
            api_key=API_KEY,
            dicomweb_url=pacs,
            max_concurrency=1,
            ood_policy=policy,
        )
        with ready_client(settings) as service:
            results[policy] = service.post("/dicomweb/analyze", json=body, headers=headers)
        if policy == "reject":
            r = results[policy]
            assert r.status_code == 422 and r.json()["code"] == "out_of_distribution", r.text
            assert synthetic.series_uid in r.json()["detail"]
            assert "all 4 of 4 slices" in r.json()["detail"]
            assert "nothing was stored" in r.json()["detail"]
            assert _series_by_modality(client, synthetic.study_uid) == {
                "MR": [synthetic.series_uid]
            }
    r = results["warn"]
    assert r.status_code == 200, r.text
    (summary,) = r.json()["results"]
    assert summary["in_distribution"] is False and summary["stored"] is True
    assert r.json()["model"]["name"]
    sr, sc = _read_back(client, synthetic.study_uid, summary)
    assert read_verdict(sr)["series_in_distribution"] is False
    assert sc.BurnedInAnnotation == "YES"
