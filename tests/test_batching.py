"""Micro-batching: the batcher on its own, then the service with batching on.

The service tests compare every batched answer with the unbatched path on the
same real model, and read the batch-size histogram of /metrics to prove that
concurrent callers really shared one ONNX Runtime run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import pytest
from clients import ready_client
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from braincam.inference import Classified, OnnxModel
from service.batching import BatchMetrics, MicroBatcher
from service.core.config import Settings
from service.metrics import Metrics

CPU = "CPUExecutionProvider"
Arrays = tuple[np.ndarray, ...]


# --- the batcher alone ------------------------------------------------------------------


class Recorder:
    """A batch function (row sums times two) that records the batch sizes it saw."""

    def __init__(self, fail_on: float | None = None) -> None:
        self.sizes: list[int] = []
        self.fail_on = fail_on

    def __call__(self, x: np.ndarray) -> Arrays:
        self.sizes.append(int(x.shape[0]))
        if self.fail_on is not None and np.any(x == self.fail_on):
            raise RuntimeError("simulated ONNX Runtime failure")
        return (x.sum(axis=(1, 2)) * 2.0, x[:, ::-1].copy())


async def _inline(fn: Callable[[], Arrays]) -> Arrays:
    await asyncio.sleep(0)
    return fn()


def _batcher(fn: Recorder, max_size: int = 8, max_wait_s: float = 0.05) -> MicroBatcher:
    return MicroBatcher("test", fn, _inline, BatchMetrics(Metrics()), max_size, max_wait_s)


def _rows(seed: int, n: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, 4), dtype=np.float32)


def test_callers_arriving_together_share_one_run_and_get_their_own_rows() -> None:
    fn = Recorder()
    batcher = _batcher(fn, max_size=8, max_wait_s=5.0)  # dispatched because it fills up

    async def main() -> list[Arrays]:
        return await asyncio.gather(*(batcher.submit(_rows(i)) for i in range(8)))

    results = asyncio.run(main())
    assert fn.sizes == [8]
    for i, (sums, flipped) in enumerate(results):
        x = _rows(i)
        assert sums.shape == (1,) and flipped.shape == (1, 3, 4)
        np.testing.assert_array_equal(sums, x.sum(axis=(1, 2)) * 2.0)
        np.testing.assert_array_equal(flipped, x[:, ::-1])


def test_max_size_splits_and_multi_row_callers_stay_whole() -> None:
    fn = Recorder()
    batcher = _batcher(fn, max_size=4, max_wait_s=5.0)
    sizes = [2, 1, 2, 3, 1, 1]  # 9 rows: no caller may be split across batches

    async def main() -> list[Arrays]:
        return await asyncio.gather(*(batcher.submit(_rows(i, n)) for i, n in enumerate(sizes)))

    async def bounded() -> list[Arrays]:
        return await asyncio.wait_for(main(), timeout=20)

    results = asyncio.run(bounded())
    assert sum(fn.sizes) == sum(sizes) and max(fn.sizes) <= 4
    for i, n in enumerate(sizes):
        np.testing.assert_array_equal(results[i][0], _rows(i, n).sum(axis=(1, 2)) * 2.0)


def test_a_lone_request_waits_at_most_max_wait() -> None:
    fn = Recorder()
    batcher = _batcher(fn, max_size=64, max_wait_s=0.02)

    async def main() -> float:
        loop = asyncio.get_running_loop()
        t = loop.time()
        await batcher.submit(_rows(0))
        return loop.time() - t

    elapsed = asyncio.run(main())
    assert fn.sizes == [1]
    assert 0.015 <= elapsed < 1.0


def test_requests_queued_during_a_run_form_the_next_batch() -> None:
    """max_wait 0: no waiting when idle, but callers arriving while a batch runs
    are batched together as soon as it finishes."""
    fn = Recorder()

    async def slow(call: Callable[[], Arrays]) -> Arrays:
        await asyncio.sleep(0.05)
        return call()

    batcher = MicroBatcher("test", fn, slow, BatchMetrics(Metrics()), 16, 0.0)

    async def main() -> None:
        first = asyncio.create_task(batcher.submit(_rows(0)))
        await asyncio.sleep(0.01)  # the first batch (of 1) is running now
        await asyncio.gather(first, *(batcher.submit(_rows(i)) for i in range(1, 6)))

    asyncio.run(main())
    assert fn.sizes == [1, 5]


def test_a_failed_run_fails_only_its_own_callers() -> None:
    fn = Recorder(fail_on=-1.0)
    metrics = Metrics()
    batcher = MicroBatcher("test", fn, _inline, BatchMetrics(metrics), 3, 5.0)
    poison = np.full((1, 3, 4), -1.0, dtype=np.float32)

    async def main() -> list[Arrays | BaseException]:
        # The first three fill one batch (with the poison row); the next three another.
        inputs = [_rows(0), poison, _rows(1), _rows(2), _rows(3), _rows(4)]
        return await asyncio.gather(*(batcher.submit(x) for x in inputs), return_exceptions=True)

    results = asyncio.run(main())
    assert fn.sizes == [3, 3]
    for failed in results[:3]:
        assert isinstance(failed, Exception)
        assert getattr(failed, "status_code", None) == 500
        assert getattr(failed, "code", None) == "inference_failed"
        assert "simulated" not in str(failed)  # internals stay in the log
    for i, ok in zip(range(2, 5), results[3:], strict=True):
        assert isinstance(ok, tuple)
        np.testing.assert_array_equal(ok[0], _rows(i).sum(axis=(1, 2)) * 2.0)
    failures = {
        s.labels["graph"]: s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
        if s.name == "braincam_batch_failures_total"
    }
    assert failures == {"test": 1.0}


def test_a_caller_cancelled_while_queued_is_dropped_from_its_batch() -> None:
    fn = Recorder()
    batcher = _batcher(fn, max_size=8, max_wait_s=0.05)

    async def main() -> Arrays:
        gone = asyncio.create_task(batcher.submit(_rows(0)))
        kept = asyncio.create_task(batcher.submit(_rows(1)))
        await asyncio.sleep(0)
        gone.cancel()
        return await kept

    result = asyncio.run(main())
    assert fn.sizes == [1]
    np.testing.assert_array_equal(result[0], _rows(1).sum(axis=(1, 2)) * 2.0)


# --- the service with batching on ----------------------------------------------------------

N_CONCURRENT = 6


def _client(model_dir: Path, **settings: object) -> AbstractContextManager[TestClient]:
    return ready_client(Settings(model_dir=model_dir, providers=CPU, **settings))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def batched(tiny_model_dir: Path) -> Iterator[TestClient]:
    # A long wait and max size = the number of concurrent requests: they can only
    # be answered if they ran as one batch, or after the (test-failing) wait.
    with _client(
        tiny_model_dir,
        batching=True,
        batch_max_size=N_CONCURRENT,
        batch_max_wait_ms=1000,
        max_concurrency=N_CONCURRENT,
    ) as client:
        yield client


@pytest.fixture(scope="module")
def unbatched(tiny_model_dir: Path) -> Iterator[TestClient]:
    with _client(tiny_model_dir) as client:
        yield client


@pytest.fixture(scope="module")
def uploads(demo_data: Path) -> list[bytes]:
    paths = sorted((demo_data / "Testing").glob("*/*.png"))[:: 4][:N_CONCURRENT]
    assert len(paths) == N_CONCURRENT
    return [p.read_bytes() for p in paths]


def _batch_histogram(client: TestClient) -> tuple[float, float, dict[str, float]]:
    """(runs, rows, cumulative bucket counts) of the classifier's batch sizes."""
    count = total = 0.0
    buckets: dict[str, float] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.labels.get("graph") != "classifier":
                continue
            if s.name == "braincam_batch_size_count":
                count = s.value
            elif s.name == "braincam_batch_size_sum":
                total = s.value
            elif s.name == "braincam_batch_size_bucket":
                buckets[s.labels["le"]] = s.value
    return count, total, buckets


def _post_all(client: TestClient, files: list[bytes]) -> list[tuple[int, dict[str, object]]]:
    def one(data: bytes) -> tuple[int, dict[str, object]]:
        res = client.post("/predict", files={"file": ("x.png", data)})
        return res.status_code, res.json()

    with ThreadPoolExecutor(len(files)) as pool:
        return list(pool.map(one, files))


def test_concurrent_predicts_share_a_batch_and_match_the_unbatched_path(
    batched: TestClient, unbatched: TestClient, uploads: list[bytes]
) -> None:
    runs0, rows0, _ = _batch_histogram(batched)
    answers = _post_all(batched, uploads)
    runs, rows, buckets = _batch_histogram(batched)
    assert rows - rows0 == N_CONCURRENT
    assert runs - runs0 == 1, "the concurrent requests did not share one run"
    assert buckets["4.0"] < buckets["6.0"]  # a batch of more than 4 rows was observed

    for data, (status, body) in zip(uploads, answers, strict=True):
        assert status == 200, body
        reference = unbatched.post("/predict", files={"file": ("x.png", data)}).json()
        assert body["label"] == reference["label"]
        assert body["class_index"] == reference["class_index"]
        got, want = body["probabilities"], reference["probabilities"]
        assert isinstance(got, dict) and got.keys() == want.keys()
        np.testing.assert_allclose(list(got.values()), list(want.values()), atol=1e-5)
        assert body["input"] == reference["input"]


def test_a_bad_upload_fails_alone(
    tiny_model_dir: Path, uploads: list[bytes], unbatched: TestClient
) -> None:
    bad = [b"not an image at all", b"\x89PNG\r\n\x1a\n" + bytes(40)]  # 415, 422
    good = uploads[: N_CONCURRENT - len(bad)]
    with _client(
        tiny_model_dir,
        batching=True,
        batch_max_size=len(good),
        batch_max_wait_ms=1000,
        max_concurrency=N_CONCURRENT,
    ) as client:
        answers = _post_all(client, [*bad, *good])
        runs, rows, _ = _batch_histogram(client)
    assert answers[0][0] == 415 and answers[0][1]["code"] == "unsupported_media_type"
    assert answers[1][0] == 422 and answers[1][1]["code"] == "undecodable_image"
    assert (runs, rows) == (1, len(good))  # the good ones still made one full batch
    for data, (status, body) in zip(good, answers[len(bad) :], strict=True):
        assert status == 200, body
        want = unbatched.post("/predict", files={"file": ("x.png", data)}).json()
        assert body["label"] == want["label"]


def test_an_inference_failure_is_a_json_error_for_that_batch_only(
    tiny_model_dir: Path, uploads: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    with _client(
        tiny_model_dir,
        batching=True,
        batch_max_size=2,
        batch_max_wait_ms=1000,
        max_concurrency=4,
    ) as client:
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        model: OnnxModel = runtime.model
        real = model.classify  # the batcher's one classifier run (probabilities, score)
        calls = 0

        def fails_once(batch: np.ndarray) -> Classified:
            nonlocal calls
            calls += 1
            if calls == 1:
                # What ORT raises on a broken run, e.g. an allocation failure.
                raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION")
            return real(batch)

        monkeypatch.setattr(model, "classify", fails_once)
        failed = _post_all(client, uploads[:2])
        assert [status for status, _ in failed] == [500, 500]
        for _, body in failed:
            assert body == {
                "detail": "inference failed; the error is logged",
                "code": "inference_failed",
            }
        after = _post_all(client, uploads[2:4])
        assert [status for status, _ in after] == [200, 200]
        assert "ONNXRuntimeError" not in str(failed)


def test_batching_is_off_by_default_on_the_cpu(
    unbatched: TestClient, uploads: list[bytes]
) -> None:
    assert Settings().batching == "auto"
    assert unbatched.app.state.runtime.batchers is None  # type: ignore[attr-defined]
    info = unbatched.get("/metadata").json()["batching"]
    assert info["setting"] == "auto" and info["active"] is False
    assert CPU in info["reason"] and info["max_size"] == Settings().batch_max_size
    assert unbatched.post("/predict", files={"file": ("x.png", uploads[0])}).status_code == 200
    assert "braincam_batch_size" not in unbatched.get("/metrics").text


def test_batch_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRAINCAM_BATCHING", "true")
    monkeypatch.setenv("BRAINCAM_BATCH_MAX_SIZE", "32")
    monkeypatch.setenv("BRAINCAM_BATCH_MAX_WAIT_MS", "0.5")
    settings = Settings()
    assert (settings.batching, settings.batch_max_size, settings.batch_max_wait_ms) == (
        "on",
        32,
        0.5,
    )
    monkeypatch.setenv("BRAINCAM_BATCH_MAX_SIZE", "0")
    with pytest.raises(ValueError):
        Settings()


@pytest.mark.parametrize(
    ("setting", "gpu", "active"),
    [("auto", True, True), ("auto", False, False), ("on", False, True), ("off", True, False),
     (" AUTO ", True, True), ("1", False, True), ("false", True, False)],
)
def test_auto_batches_on_a_gpu_only(setting: str, gpu: bool, active: bool) -> None:
    from types import SimpleNamespace

    from service.runtime import batching_decision

    providers = ["CUDAExecutionProvider", CPU] if gpu else [CPU]
    model = SimpleNamespace(providers=SimpleNamespace(gpu=gpu, active=providers))
    on, reason = batching_decision(Settings(batching=setting), model)  # type: ignore[arg-type]
    assert on is active
    assert "BRAINCAM_BATCHING=" in reason
    assert ("GPU" in reason) == (on and setting.strip().lower() == "auto")
    with pytest.raises(ValueError):
        Settings(batching="sometimes")


def test_oip_classifier_calls_join_the_predict_batches(
    batched: TestClient, unbatched: TestClient, uploads: list[bytes], tiny_model_dir: Path
) -> None:
    from braincam.decoding import decode_image
    from braincam.preprocessing import preprocess

    model = OnnxModel(tiny_model_dir, providers=[CPU])
    name = model.spec.name
    tensors = [preprocess(decode_image(d).pixels, model.spec.preprocessing) for d in uploads]
    half = N_CONCURRENT // 2
    two_rows = np.stack(tensors[:2])  # one OIP call of 2 rows

    def infer(x: np.ndarray) -> tuple[int, dict[str, object]]:
        body = {"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                            "data": x.ravel().tolist()}]}
        res = batched.post(f"/v2/models/{name}/infer", json=body)
        return res.status_code, res.json()

    def predict(data: bytes) -> tuple[int, dict[str, object]]:
        res = batched.post("/predict", files={"file": ("x.png", data)})
        return res.status_code, res.json()

    runs0, rows0, _ = _batch_histogram(batched)
    with ThreadPoolExecutor(N_CONCURRENT) as pool:
        oip = pool.submit(infer, two_rows)
        singles = [pool.submit(infer, t[None]) for t in tensors[2:half + 1]]
        predicts = [pool.submit(predict, d) for d in uploads[half + 1:]]
        results = [oip.result(), *(f.result() for f in singles), *(f.result() for f in predicts)]
    runs, rows, _ = _batch_histogram(batched)
    assert all(status == 200 for status, _ in results), results
    assert rows - rows0 == N_CONCURRENT  # 2 + singles + predicts rows
    assert runs - runs0 == 1, "OIP and /predict calls did not share one run"

    _, body = oip.result()
    outputs = {o["name"]: o for o in body["outputs"]}  # type: ignore[attr-defined]
    output = outputs["probabilities"]  # (models with an OOD detector add ood_score)
    assert output["shape"] == [2, len(model.labels)]
    np.testing.assert_allclose(
        np.array(output["data"]).reshape(2, -1), model.predict(two_rows), atol=1e-5
    )
    # The Grad-CAM graph is not batched: it still answers through the batched service.
    gc = {"inputs": [
        {"name": "image", "shape": [1, *tensors[0].shape], "datatype": "FP32",
         "data": tensors[0].ravel().tolist()},
        {"name": "target", "shape": [1], "datatype": "INT64", "data": [-1]},
    ]}
    res = batched.post(f"/v2/models/{name}-gradcam/infer", json=gc)
    assert res.status_code == 200, res.text
    assert _batch_histogram(batched)[0] == runs
    bad = batched.post(f"/v2/models/{name}/infer", json={"inputs": []})
    assert bad.status_code == 400 and bad.json()["code"]


def test_series_slices_join_the_batches(
    batched: TestClient, unbatched: TestClient, demo_data: Path
) -> None:
    from dicom_series import demo_slices, mr_series

    series = mr_series(demo_slices(demo_data, ["glioma", "notumor", "pituitary"] * 3))
    files = [("files", (name, data, "application/dicom")) for name, data in series.files]
    runs0, rows0, _ = _batch_histogram(batched)
    got = batched.post("/predict/series", files=files)
    runs, rows, _ = _batch_histogram(batched)
    assert got.status_code == 200, got.text
    assert rows - rows0 == 9  # every slice went through the batcher
    # The batcher's thread, not the request pool, runs the batch: a series that waits
    # in a pool thread cannot starve it (this service has as many threads as slots).
    assert runs - runs0 >= 1
    want = unbatched.post("/predict/series", files=files).json()
    body = got.json()
    assert body["label"] == want["label"]
    for a, b in zip(body["slices"], want["slices"], strict=True):
        assert a["class_index"] == b["class_index"]
        np.testing.assert_allclose(
            list(a["probabilities"].values()), list(b["probabilities"].values()), atol=1e-5
        )
