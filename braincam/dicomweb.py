"""braincam beside a PACS: fetch a series by WADO-RS, analyse it, store the SR and the
Secondary Capture back by STOW-RS (dicomweb-client does the DICOMweb).

The series is streamed instance by instance and bounded as it arrives (instances,
slices, pixels: the same `SeriesLimits` as an upload), after QIDO-RS said how many
instances it holds. braincam's own result series (SR, and the Secondary Capture
recognised by its series description) are never analysed again.

Every requested series is analysed before anything is stored: with the
out-of-distribution policy `reject`, a series whose every slice the gate flags
refuses the whole request (422 `out_of_distribution`) and the PACS receives nothing;
with `warn`, what is stored says it (SR verdict and warning, banner on the overlay).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from braincam.dicom_results import DicomResults, build_results, result_warnings
from braincam.errors import InputError, InvalidParameter, OutOfDistribution, PayloadTooLarge
from braincam.inference import OnnxModel
from braincam.series import Series, SeriesLimits, series_from_datasets
from braincam.series_analysis import SeriesResult, analyse

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# Modalities of objects that are not image series (QIDO's Modality of a series).
_NOT_IMAGE_MODALITIES = {"SR", "KO", "PR", "SEG", "DOC", "RTSTRUCT", "REG", "PLAN"}
RESULT_DESCRIPTION_PREFIX = "braincam "
# DICOM JSON tags (QIDO-RS answers).
_SERIES_UID, _MODALITY, _DESCRIPTION, _N_INSTANCES = "0020000E", "00080060", "0008103E", "00201209"


class PacsError(Exception):
    """The PACS refused or failed a request; `status` is what the service answers."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


class NotFound(InputError):
    status_code = 404
    code = "not_found"


def check_uid(value: str, what: str) -> str:
    """A DICOM UID (digits and dots, <= 64 chars): it goes into the PACS's URLs."""
    value = value.strip()
    if len(value) > 64 or not _UID.fullmatch(value):
        raise InvalidParameter(f"{what} must be a DICOM UID (digits and dots, at most 64)")
    return value


@dataclass
class AnalysedSeries:
    series_instance_uid: str
    series: Series
    result: SeriesResult
    results: DicomResults
    stored: bool
    timing_s: dict[str, float] = field(default_factory=dict)


def connect(url: str, headers: dict[str, str] | None = None, timeout_s: float = 30.0) -> Any:
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=url.rstrip("/"), headers=headers, timeout=timeout_s)
    # dicomweb-client retries every failed request (connection errors included) up to
    # 5 times with exponential back-off: 30 s of sleeping before an unreachable PACS is
    # reported. One attempt; the caller decides whether to try again.
    client.set_http_retry_params(retry=False)
    return client


def _value(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


def _call(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a dicomweb-client call; HTTP and connection failures become PacsError."""
    import requests

    try:
        return fn(*args, **kwargs)
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 502
        if status == 404:
            raise NotFound(f"the PACS has no such {what}") from exc
        raise PacsError(502, "pacs_error", f"the PACS answered {status} to {what}") from exc
    except requests.Timeout as exc:
        raise PacsError(504, "pacs_timeout", f"the PACS did not answer in time ({what})") from exc
    except requests.RequestException as exc:
        raise PacsError(
            502, "pacs_unreachable", f"could not reach the PACS ({type(exc).__name__})"
        ) from exc


def image_series(client: Any, study_uid: str) -> list[dict[str, Any]]:
    """QIDO-RS: the study's image series, braincam's own result series left out."""
    found = _call(
        "study",
        client.search_for_series,
        study_instance_uid=study_uid,
        fields=["SeriesDescription", "NumberOfSeriesRelatedInstances"],
    )
    if not found:
        raise NotFound(f"the PACS has no series in study {study_uid}")
    return [
        item
        for item in found
        if str(_value(item, _MODALITY) or "") not in _NOT_IMAGE_MODALITIES
        and not str(_value(item, _DESCRIPTION) or "").startswith(RESULT_DESCRIPTION_PREFIX)
    ]


def fetch_series(
    client: Any, study_uid: str, series_uid: str, limits: SeriesLimits, n_instances: int | None
) -> list[Any]:
    """WADO-RS, streamed: refused as soon as it passes the instance or pixel bounds."""
    if n_instances is not None and n_instances > limits.max_zip_entries:
        raise PayloadTooLarge(
            f"series {series_uid} holds {n_instances} instances, "
            f"over the {limits.max_zip_entries} limit"
        )
    datasets, pixels = [], 0
    stream = _call("series", client.iter_series, study_uid, series_uid)
    while True:
        ds = _call("series", next, stream, None)
        if ds is None:
            break
        datasets.append(ds)
        frames = max(int(ds.get("NumberOfFrames", 1) or 1), 1)
        pixels += int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * frames
        if len(datasets) > limits.max_zip_entries or pixels > limits.max_total_pixels:
            raise PayloadTooLarge(
                f"series {series_uid} passes the series limits ({limits.max_zip_entries} "
                f"instances, {limits.max_total_pixels / 1e6:.4g} MP) while being fetched"
            )
    if not datasets:
        raise NotFound(f"the PACS returned no instances for series {series_uid}")
    return datasets


def analyse_study(
    client: Any,
    model: OnnxModel,
    study_uid: str,
    series_uids: Sequence[str] = (),
    *,
    limits: SeriesLimits | None = None,
    store: bool = True,
    method: str = "gradcam",
    ood_policy: Literal["warn", "reject"] = "warn",
) -> list[AnalysedSeries]:
    """Analyse the given series of a study (default: each image series in it) and, with
    `store`, write each one's SR and Secondary Capture back to the PACS: only once
    every series is analysed, so a refused series (`ood_policy="reject"`) or any other
    failure leaves the PACS untouched."""
    limits = limits or SeriesLimits()
    study_uid = check_uid(study_uid, "the study UID")
    listed = {str(_value(item, _SERIES_UID)): item for item in image_series(client, study_uid)}
    wanted = [check_uid(uid, "a series UID") for uid in series_uids] or list(listed)
    if not wanted:
        raise NotFound(f"study {study_uid} holds no image series to analyse")
    out = []
    for series_uid in wanted:
        if series_uid not in listed:
            raise NotFound(f"study {study_uid} has no image series {series_uid}")
        count = _value(listed[series_uid], _N_INSTANCES)
        t0 = time.perf_counter()
        datasets = fetch_series(
            client, study_uid, series_uid, limits, int(count) if count is not None else None
        )
        t1 = time.perf_counter()
        series = series_from_datasets(datasets, limits)
        try:
            result = analyse(
                model, series, explain_deciding=True, method=method, ood_policy=ood_policy
            )
        except OutOfDistribution as exc:
            raise OutOfDistribution(
                f"series {series_uid}: {exc.detail}; nothing was stored in the PACS"
            ) from exc
        overlay = result.overlays[result.deciding_slice]
        results = build_results(series, result, model.spec, overlay)
        t2 = time.perf_counter()
        timing = {"fetch": t1 - t0, "analyse": t2 - t1, "store": 0.0}
        out.append(AnalysedSeries(series_uid, series, result, results, False, timing))
    for analysed in out if store else ():
        t0 = time.perf_counter()
        _call("store", client.store_instances, analysed.results.datasets, study_uid)
        analysed.stored = True
        analysed.timing_s["store"] = time.perf_counter() - t0
    return out


def summary(analysed: AnalysedSeries) -> dict[str, Any]:
    """The JSON-ready outcome of one series (the CLI prints it, the route returns it)."""
    result, series, gate = analysed.result, analysed.series, analysed.result.gate
    deciding = series.slices[result.deciding_slice]
    return {
        "series_instance_uid": analysed.series_instance_uid,
        "label": result.decision.label,
        "confidence": result.decision.confidence,
        "probabilities": result.decision.probabilities,
        "in_distribution": None if gate is None else gate.in_distribution,
        "flagged_slices": None if gate is None else gate.flagged,
        "ood_score": None if gate is None else gate.deciding.ood_score,
        "ood_threshold": None if gate is None else gate.deciding.ood_threshold,
        "warnings": [{"code": w.code, "detail": w.text} for w in result_warnings(result)],
        "n_slices": len(series.slices),
        "skipped": series.skipped,
        "deciding_slice": result.deciding_slice,
        "deciding_sop_instance_uid": deciding.sop_instance_uid,
        "stored": analysed.stored,
        "sr": _ref(analysed.results.sr),
        "secondary_capture": _ref(analysed.results.secondary_capture),
        "timing_ms": {k: round(v * 1000.0, 3) for k, v in analysed.timing_s.items()},
    }


def _ref(ds: Any) -> dict[str, str]:
    return {
        "series_instance_uid": str(ds.SeriesInstanceUID),
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "sop_class_uid": str(ds.SOPClassUID),
    }
