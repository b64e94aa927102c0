"""POST /predict/series and /explain/series through the HTTP app, on the tiny model."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.core.config import Settings
from tests.clients import ready_client
from tests.dicom_series import (
    demo_slices,
    mr_series,
    noise_slices,
    read_verdict,
    shuffled_names,
    text_sr,
    zipped,
)
from tests.hostile_inputs import nifti

CPU = "CPUExecutionProvider"
MAX_SLICES = 40
LABELS = ["notumor", "glioma", "meningioma", "pituitary", "notumor", "glioma"] * 5  # 30


@pytest.fixture(scope="module")
def service(tiny_model_dir: Path) -> Iterator[TestClient]:
    settings = Settings(
        model_dir=tiny_model_dir,
        providers=CPU,
        max_series_slices=MAX_SLICES,
        max_series_upload_mb=2,
        max_concurrency=2,
    )
    with ready_client(settings) as client:
        yield client


@pytest.fixture(scope="module")
def synthetic(demo_data: Path):  # type: ignore[no-untyped-def]
    return mr_series(demo_slices(demo_data, LABELS))


def _files(files: list[tuple[str, bytes]]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (name, data, "application/dicom")) for name, data in files]


def test_predict_series_matches_single_predictions(service: TestClient, synthetic) -> None:  # type: ignore[no-untyped-def]
    extra = [("sr.dcm", text_sr(synthetic.study_uid))]
    r = service.post("/predict/series", files=_files(shuffled_names(synthetic.files) + extra))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["series"]["ordered_by"] == "position"
    assert body["series"]["n_slices"] == 30 and body["series"]["skipped"] == {"not_an_image": 1}
    assert body["series"]["series_instance_uid"] == synthetic.series_uid
    assert [s["sop_instance_uid"] for s in body["slices"]] == synthetic.instance_uids
    assert body["batches"] == 2  # 30 slices in batches of 16
    assert body["overlay_png"] is None and body["dicom"] is None
    deciding = body["slices"][body["deciding_slice"]]
    assert body["label"] == deciding["label"] and body["probabilities"] == deciding["probabilities"]
    for k in (0, 7, 29):  # each slice as /predict answers for its file alone
        single = service.post("/predict", files={"file": ("x.dcm", synthetic.files[k][1])}).json()
        for label, p in single["probabilities"].items():
            assert body["slices"][k]["probabilities"][label] == pytest.approx(p, abs=1e-6)
        # ... and the out-of-distribution verdict too (the tiny model has a detector).
        assert single["ood_score"] is not None
        assert body["slices"][k]["ood_score"] == pytest.approx(single["ood_score"], rel=1e-5)
        assert body["slices"][k]["in_distribution"] == single["in_distribution"]


def test_series_throughput_vs_single_calls(service: TestClient, synthetic) -> None:  # type: ignore[no-untyped-def]
    """Measured (printed with -s): one 30-slice request vs 30 /predict calls."""
    files = _files(synthetic.files)
    service.post("/predict/series", files=files)  # warm
    t0 = time.perf_counter()
    r = service.post("/predict/series", files=files)
    series_s = time.perf_counter() - t0
    assert r.status_code == 200
    t0 = time.perf_counter()
    singles = [service.post("/predict", files={"file": ("x.dcm", d)}) for _, d in synthetic.files]
    single_s = time.perf_counter() - t0
    assert all(s.status_code == 200 for s in singles)
    labels = [s["label"] for s in r.json()["slices"]]
    assert labels == [s.json()["label"] for s in singles]
    print(
        f"\n30-slice series: {series_s * 1000:.0f} ms = {30 / series_s:.0f} slices/s; "
        f"30 single /predict calls: {single_s * 1000:.0f} ms = {30 / single_s:.0f} slices/s"
    )


def test_zip_upload(service: TestClient, synthetic) -> None:  # type: ignore[no-untyped-def]
    data = zipped(shuffled_names(synthetic.files, seed=5))
    r = service.post("/predict/series", files=[("files", ("series.zip", data, "application/zip"))])
    assert r.status_code == 200, r.text
    assert [s["sop_instance_uid"] for s in r.json()["slices"]] == synthetic.instance_uids


def test_nifti_volume(service: TestClient, demo_data: Path) -> None:
    volume = np.stack(demo_slices(demo_data, LABELS[:8]), axis=2).astype(np.int16)
    files = [("files", ("t1.nii", nifti(volume), "application/octet-stream"))]
    r = service.post("/predict/series", files=files)
    assert r.status_code == 200, r.text
    assert r.json()["series"]["format"] == "nifti" and r.json()["series"]["n_slices"] == 8
    r = service.post("/predict/series", files=files, data={"output": "dicom"})
    assert r.status_code == 422 and "DICOM series" in r.json()["detail"]


def _png(b64: str) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_COLOR)
    assert img is not None
    return img


def test_explain_series(service: TestClient, synthetic) -> None:  # type: ignore[no-untyped-def]
    files = _files(synthetic.files[:6])
    r = service.post("/explain/series", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert _png(body["overlay_png"]).shape == (64, 64, 3)
    shown = [i for i, s in enumerate(body["slices"]) if s["overlay_png"]]
    assert shown == [body["deciding_slice"]]
    r = service.post("/explain/series", files=files, data={"slices": "all"})
    assert all(s["overlay_png"] for s in r.json()["slices"])
    r = service.post("/explain/series", files=files, data={"slices": "0,9"})
    assert r.status_code == 422 and r.json()["code"] == "invalid_parameter"


def test_output_dicom(service: TestClient, synthetic) -> None:  # type: ignore[no-untyped-def]
    import pydicom

    r = service.post("/predict/series", files=_files(synthetic.files[:6]), data={"output": "dicom"})
    assert r.status_code == 200, r.text
    body = r.json()
    kinds = {o["kind"]: o for o in body["dicom"]}
    assert set(kinds) == {"sr", "secondary_capture"}
    sr = pydicom.dcmread(io.BytesIO(base64.b64decode(kinds["sr"]["data_base64"])))
    sc = pydicom.dcmread(io.BytesIO(base64.b64decode(kinds["secondary_capture"]["data_base64"])))
    assert sr.StudyInstanceUID == sc.StudyInstanceUID == synthetic.study_uid
    assert sr.SOPInstanceUID == kinds["sr"]["sop_instance_uid"]
    deciding_uid = body["slices"][body["deciding_slice"]]["sop_instance_uid"]
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == deciding_uid
    finding = next(
        i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121071"
    )
    assert finding.ConceptCodeSequence[0].CodeValue == body["label"]


def test_mixed_series_422(service: TestClient, demo_data: Path, synthetic) -> None:  # type: ignore[no-untyped-def]
    other = mr_series(demo_slices(demo_data, ["glioma"]), description="DWI")
    r = service.post("/predict/series", files=_files(synthetic.files[:3] + other.files))
    assert r.status_code == 422
    assert other.series_uid in r.json()["detail"] and "DWI" in r.json()["detail"]


def test_bounds(service: TestClient, demo_data: Path) -> None:
    too_many = mr_series(demo_slices(demo_data, ["notumor"] * (MAX_SLICES + 1)))
    r = service.post("/predict/series", files=_files(too_many.files))
    assert r.status_code == 413 and "slice limit" in r.json()["detail"]
    bomb = zipped([("bomb.dcm", bytes(16 << 20))])
    r = service.post("/predict/series", files=[("files", ("b.zip", bomb, "application/zip"))])
    assert r.status_code == 413 and "compression ratio" in r.json()["detail"]
    buf = io.BytesIO()
    import zipfile

    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../../etc/cron.d/x", b"x")
    r = service.post(
        "/predict/series", files=[("files", ("t.zip", buf.getvalue(), "application/zip"))]
    )
    assert r.status_code == 422 and "unsafe path" in r.json()["detail"]
    big = [("files", (f"f{i}.dcm", bytes(600_000), "application/dicom")) for i in range(4)]
    r = service.post("/predict/series", files=big)
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"
    assert "2 MiB limit" in r.json()["detail"]
    r = service.post("/predict/series", files=[("files", ("x.txt", b"hello", "text/plain"))])
    assert r.status_code == 422 and "no DICOM image" in r.json()["detail"]


def test_dicomweb_route_off_unless_configured(service: TestClient) -> None:
    r = service.post("/dicomweb/analyze", json={"study_instance_uid": "1.2.3"})
    assert r.status_code == 404 and r.json()["code"] == "dicomweb_disabled"


def test_dicomweb_route_pacs_unreachable(tiny_model_dir: Path) -> None:
    """A PACS that does not answer is a 502 in the service's error shape, not a 500."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = Settings(
        model_dir=tiny_model_dir,
        providers=CPU,
        api_key="k",
        dicomweb_url=f"http://127.0.0.1:{port}/dicom-web",
        max_concurrency=1,
    )
    with ready_client(settings) as client:
        r = client.post(
            "/dicomweb/analyze", json={"study_instance_uid": "1.2.3"}, headers={"X-API-Key": "k"}
        )
    assert r.status_code == 502 and r.json()["code"] == "pacs_unreachable", r.text


def test_dicomweb_cli_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    from braincam.dicomweb_cli import main

    assert main(["--url", "http://x", "--study", "1.2", "--header", "no-colon"]) == 2
    assert "--header must be" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["--url", "http://x"])  # --study missing
    assert exit_.value.code == 2


SERIES_ROUTES = ("/predict/series", "/explain/series")


@pytest.fixture(scope="module")
def foreign() -> list[tuple[str, bytes]]:
    """A DICOM series of noise: the out-of-distribution gate flags every slice."""
    return mr_series(noise_slices(5, seed=3)).files


def _decode_dicom(body: dict) -> dict:  # type: ignore[type-arg]
    import pydicom

    return {
        o["kind"]: pydicom.dcmread(io.BytesIO(base64.b64decode(o["data_base64"])))
        for o in body["dicom"]
    }


def test_flagged_series_answered_with_the_warning(service: TestClient, foreign) -> None:  # type: ignore[no-untyped-def]
    """BRAINCAM_OOD_POLICY=warn (the default): answered, and every form says it."""
    before = {route: _flagged_count(service, route, "warn") for route in SERIES_ROUTES}
    for route in SERIES_ROUTES:
        for output in ("json", "dicom"):
            r = service.post(route, files=_files(foreign), data={"output": output})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["in_distribution"] is False and body["flagged_slices"] == 5
            assert all(s["in_distribution"] is False for s in body["slices"])
            deciding = body["slices"][body["deciding_slice"]]
            assert body["ood_score"] == deciding["ood_score"] > body["ood_threshold"]
            (warning,) = body["warnings"]
            assert warning["code"] == "out_of_distribution"
            assert warning["detail"].startswith("UNLIKE TRAINING DATA: all 5 slices")
            if output == "dicom":
                objects = _decode_dicom(body)
                verdict = read_verdict(objects["sr"])
                assert verdict["series_in_distribution"] is False and verdict["flagged"] == 5
                assert verdict["ood_score"] == pytest.approx(body["ood_score"], rel=1e-6)
                assert verdict["texts"]["W-OOD"] == warning["detail"]
                assert objects["secondary_capture"].BurnedInAnnotation == "YES"
    for route in SERIES_ROUTES:
        assert _flagged_count(service, route, "warn") == before[route] + 2


def _flagged_count(client: TestClient, endpoint: str, policy: str) -> float:
    prefix = f'braincam_out_of_distribution_total{{endpoint="{endpoint}",policy="{policy}"}} '
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def test_in_distribution_series_has_no_warning(service: TestClient, synthetic) -> None:  # type: ignore[no-untyped-def]
    r = service.post("/explain/series", files=_files(synthetic.files[:6]), data={"output": "dicom"})
    assert r.status_code == 200, r.text
    body = r.json()
    flagged = [s["index"] for s in body["slices"] if s["in_distribution"] is False]
    assert body["flagged_slices"] == len(flagged) < 6 and body["in_distribution"] is True
    assert body["deciding_slice"] not in flagged
    assert [w["code"] for w in body["warnings"]] == (["out_of_distribution"] if flagged else [])
    objects = _decode_dicom(body)
    assert read_verdict(objects["sr"])["series_in_distribution"] is True
    assert objects["secondary_capture"].BurnedInAnnotation == "NO"
    np.testing.assert_array_equal(
        objects["secondary_capture"].pixel_array[..., ::-1], _png(body["overlay_png"])
    )


def test_reject_policy_refuses_flagged_series(tiny_model_dir: Path, foreign, synthetic) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(
        model_dir=tiny_model_dir, providers=CPU, ood_policy="reject", max_concurrency=1
    )
    with ready_client(settings) as client:
        for route in SERIES_ROUTES:
            for output in ("json", "dicom"):
                r = client.post(route, files=_files(foreign), data={"output": output})
                assert r.status_code == 422, r.text
                assert r.json()["code"] == "out_of_distribution"
                assert "all 5 of 5 slices" in r.json()["detail"]
                assert "BRAINCAM_OOD_POLICY=reject" in r.json()["detail"]
        # A series the gate passes (if only in part) is answered as under warn.
        r = client.post("/predict/series", files=_files(synthetic.files[:6]))
        assert r.status_code == 200 and r.json()["in_distribution"] is True, r.text
        for route in SERIES_ROUTES:
            assert _flagged_count(client, route, "reject") == 2


def test_more_loose_files_than_the_multipart_limit_is_413(service: TestClient) -> None:
    files = [("files", (f"f{i}.dcm", b"x", "application/dicom")) for i in range(1001)]
    r = service.post("/predict/series", files=files)
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large", r.text
    assert "more than 1000 files" in r.json()["detail"] and "zip" in r.json()["detail"]


def test_truncated_slice_named(service: TestClient, synthetic) -> None:  # type: ignore[no-untyped-def]
    files = list(synthetic.files[:4])
    name, data = files[2]
    files[2] = (name, data[:-300])
    r = service.post("/predict/series", files=_files(files))
    assert r.status_code == 422 and r.json()["code"] == "undecodable_image", r.text
    detail = r.json()["detail"]
    assert name in detail and "truncated" in detail and "bytes" in detail
