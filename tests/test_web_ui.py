"""The web page at `/`.

Without a browser: the app serves the page and its assets, self-contained (no
external URL, a strict Content-Security-Policy) and shipped as package data.

In a browser: Debian's headless Chromium, driven by Playwright (never a browser
download), against a live uvicorn on 127.0.0.1 serving the tiny test model. These
tests skip when no Chromium is installed, unless BRAINCAM_REQUIRE_BROWSER=1 (set
by .ci/run, which installs it) turns the skip into a failure.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from braincam import DISCLAIMER
from braincam.overlay import banner_height
from service.api.routes.ui import STATIC_DIR
from service.core.config import Settings
from service.local_server import serve
from service.main import create_app

ROOT = Path(__file__).resolve().parents[1]
UPLOAD_LIMIT_MB = 1  # the live server's limit: oversized test files stay small


# ---------------------------------------------------------------- without a browser


@pytest.fixture(scope="module")
def client(tiny_model_dir: Path) -> Iterator[TestClient]:
    settings = Settings(model_dir=tiny_model_dir, providers=["CPUExecutionProvider"])
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_page_and_assets_are_served(client: TestClient) -> None:
    res = client.get("/")
    assert res.status_code == 200
    assert res.headers["content-type"].startswith("text/html")
    csp = res.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "connect-src 'self'" in csp
    html = res.text
    assert 'src="static/app.js"' in html and 'href="static/style.css"' in html
    assert DISCLAIMER.split(".")[0] in " ".join(html.split())
    assert client.head("/").status_code == 200

    js = client.get("/static/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert js.headers["cache-control"] == "no-cache" and js.headers["etag"]
    for served in (res, js):  # from RequestMiddleware, like every response
        assert served.headers["x-content-type-options"] == "nosniff"
    css = client.get("/static/style.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    # Revalidation is a cheap 304.
    again = client.get("/static/app.js", headers={"if-none-match": js.headers["etag"]})
    assert again.status_code == 304

    missing = client.get("/static/nope.js")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    assert "/" not in client.get("/openapi.json").json()["paths"]


def test_page_is_self_contained() -> None:
    """Offline: no file of the page names another host, and every element the
    script looks up exists in the page."""
    files = sorted(p for p in STATIC_DIR.iterdir() if p.is_file())
    assert {p.name for p in files} >= {"index.html", "app.js", "style.css"}
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), path.name
        assert "@import" not in text, path.name
    html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    ids = set(re.findall(r'\bid="([^"]+)"', html))
    used = set(re.findall(r'\$\("([^"]+)"\)', (STATIC_DIR / "app.js").read_text(encoding="utf-8")))
    assert used and used <= ids, sorted(used - ids)


def test_static_files_are_package_data() -> None:
    """A non-editable install (the Docker images) must carry the page too."""
    from setuptools.config.pyprojecttoml import read_configuration

    with warnings.catch_warnings():  # "[tool.setuptools] is still beta"
        warnings.simplefilter("ignore")
        config = read_configuration(ROOT / "pyproject.toml")
    patterns = config["tool"]["setuptools"]["package-data"]["service"]
    for path in STATIC_DIR.rglob("*"):
        if path.is_file():
            rel = path.relative_to(STATIC_DIR.parent).as_posix()
            assert any(
                fnmatch(rel, pattern) and rel.count("/") == pattern.count("/")
                for pattern in patterns
            ), rel


# ---------------------------------------------------------------- in a browser

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")


def _find_chromium() -> str | None:
    override = os.environ.get("BRAINCAM_CHROMIUM")
    for name in (override,) if override else CHROMIUM_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _unavailable(reason: str) -> None:
    if os.environ.get("BRAINCAM_REQUIRE_BROWSER") == "1":
        pytest.fail(f"BRAINCAM_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    executable = _find_chromium()
    if executable is None:
        _unavailable(
            "no Chromium found (looked for /usr/bin/chromium, chromium, chromium-browser, "
            "google-chrome; BRAINCAM_CHROMIUM overrides): "
            "`apt-get install chromium` to run the browser tests"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (the `test` extra has it)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def _live_server(model_dir: Path, log: Path, **settings: str) -> Iterator[str]:
    """`python -m service` on 127.0.0.1 with only these settings; its URL once ready."""
    env = {f"BRAINCAM_{k.upper()}": v for k, v in settings.items()}
    with serve(model_dir, env, log, inherit_settings=False) as live:
        yield live.url
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("web_ui_server") / "server.log"
    with _live_server(tiny_model_dir, log, max_upload_mb=str(UPLOAD_LIMIT_MB)) as url:
        yield url


class Page:
    """One browser page on the live server, with the page's own waits."""

    def __init__(
        self,
        browser: Any,
        url: str,
        width: int = 1280,
        height: int = 900,
        before_load: Callable[[Any], None] | None = None,
        ready: bool = True,
    ) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        if before_load is not None:
            before_load(self.page)
        self.problems: list[str] = []
        # Uncaught exceptions, CSP violations, anything but the API's own error statuses.
        self.page.on("pageerror", lambda exc: self.problems.append(f"pageerror: {exc}"))
        self.page.on(
            "console",
            lambda msg: (
                msg.type == "error"
                and "Failed to load resource" not in msg.text
                and self.problems.append(f"console: {msg.text}")
            ),
        )
        self.page.goto(url)
        if ready:
            self.page.wait_for_selector("#status[data-state=ready]", timeout=30_000)

    def close(self) -> None:
        self.context.close()
        assert not self.problems, self.problems

    def idle(self) -> None:
        self.page.wait_for_function(
            "() => document.getElementById('results').getAttribute('aria-busy') === 'false'",
            timeout=30_000,
        )

    def explain_after(self, action: Any) -> dict[str, Any]:
        """Run `action`, wait for the /explain it causes and for the page to show the
        answer; the answer's JSON (what the service did with the page's request)."""
        with self.page.expect_response(
            lambda r: r.url.endswith("/explain") and r.request.method == "POST", timeout=30_000
        ) as response:
            action()
        self.idle()
        return dict(response.value.json())

    def upload(self, path: Path) -> dict[str, Any]:
        return self.explain_after(lambda: self.page.set_input_files("#file", str(path)))

    def pixels(self, element_id: str) -> np.ndarray:
        """The decoded RGB pixels of an <img> on the page."""
        width, height, data = self.page.evaluate(
            """(id) => {
                const img = document.getElementById(id);
                const canvas = document.createElement('canvas');
                canvas.width = img.naturalWidth;
                canvas.height = img.naturalHeight;
                const ctx = canvas.getContext('2d');
                ctx.drawImage(img, 0, 0);
                const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
                return [canvas.width, canvas.height, Array.from(data)];
            }""",
            element_id,
        )
        return np.asarray(data, dtype=np.uint8).reshape(height, width, 4)[..., :3]

    def download(self, selector: str) -> tuple[str, bytes]:
        """Click a download link as a person would: the file name and its bytes."""
        with self.page.expect_download() as info:
            self.page.click(selector)
        download = info.value
        return str(download.suggested_filename), Path(download.path()).read_bytes()

    def text(self, selector: str) -> str:
        return str(self.page.inner_text(selector)).strip()

    def visible(self, selector: str) -> bool:
        return bool(self.page.is_visible(selector))


@pytest.fixture
def page(chromium: Any, server: str) -> Iterator[Page]:
    opened = Page(chromium, server)
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def glioma_image(demo_data: Path) -> Path:
    return sorted((demo_data / "Testing" / "glioma").glob("*.png"))[0]


def _api_explain(server: str, image: Path, **fields: str) -> dict[str, Any]:
    res = httpx.post(
        f"{server}/explain",
        files={"file": (image.name, image.read_bytes())},
        data={"images": "all", **fields},  # what the page asks for
        timeout=60,
    )
    assert res.status_code == 200, res.text
    return dict(res.json())


def test_upload_shows_prediction_and_three_panels(
    page: Page, server: str, glioma_image: Path, tiny_model_dir: Path
) -> None:
    spec = json.loads((tiny_model_dir / "model.json").read_text())
    assert page.text("#model-name") == f"{spec['name']} v{spec['version']}"
    assert page.text("#providers") == "CPU"
    assert page.text("#disclaimer") == DISCLAIMER
    assert not page.visible("#model-notice")  # the tiny model's model.json has no notice
    assert page.visible("#empty") and not page.visible("#result")

    answer = page.upload(glioma_image)
    # The page's defaults are the API's: the decided class, gradcam, 0.4, jet, no smoothing.
    assert (answer["method"], answer["alpha"], answer["colormap"], answer["smooth"]) == (
        "gradcam",
        0.4,
        "jet",
        False,
    )
    assert answer["target"]["label"] == answer["label"]
    api = _api_explain(server, glioma_image)
    assert not page.visible("#error") and not page.visible("#spinner")
    assert page.text("#label") == api["label"]
    assert page.text("#confidence") == f"{100 * api['confidence']:.1f} %"
    rows = page.page.locator("#probabilities li")
    assert rows.count() == len(spec["labels"])
    for i, label in enumerate(spec["labels"]):
        row = rows.nth(i)
        assert row.get_attribute("data-label") == label
        p = api["probabilities"][label]
        shown = row.locator(".pct").inner_text()
        assert shown == ("< 0.1 %" if 0 < p < 0.0005 else f"{100 * p:.1f} %")
    assert (
        page.page.locator("#probabilities li.decided").get_attribute("data-label") == api["label"]
    )

    # The three panels: the image as decoded, and the API's heatmap and overlay.
    gray = cv2.imread(str(glioma_image), cv2.IMREAD_GRAYSCALE)
    original = page.pixels("panel-original")
    assert original.shape == (*gray.shape, 3)
    assert np.array_equal(original, np.repeat(gray[..., None], 3, axis=2))
    for element, key in (("panel-heatmap", "heatmap_png"), ("panel-overlay", "overlay_png")):
        expected = cv2.imdecode(np.frombuffer(base64.b64decode(api[key]), np.uint8), 1)
        assert np.array_equal(page.pixels(element), expected[..., ::-1]), element
        assert page.page.is_visible(f"#{element}")
    # The download button hands over the API's overlay PNG byte for byte.
    name, overlay = page.download("#download-overlay")
    assert overlay == base64.b64decode(api["overlay_png"])
    assert name == f"{glioma_image.stem}_{api['label']}_gradcam_overlay.png"
    assert "PNG 64×64, 8-bit" in page.text("#details")


def test_changing_target_and_controls_reexplains(page: Page, glioma_image: Path) -> None:
    page.upload(glioma_image)
    predicted = page.text("#label")
    before = page.pixels("panel-overlay")
    original = page.pixels("panel-original")
    other = next(
        label
        for label in page.page.eval_on_selector_all("#target option", "o => o.map(x => x.value)")
        if label and label != predicted
    )

    answer = page.explain_after(lambda: page.page.select_option("#target", other))
    assert answer["target"]["label"] == other
    assert page.page.get_attribute("#explained", "data-target") == other
    assert page.text("#label") == predicted  # the decision stays, the explanation changes
    after = page.pixels("panel-overlay")
    assert after.shape == before.shape and not np.array_equal(after, before)
    assert np.array_equal(page.pixels("panel-original"), original)

    # Method and colormap re-request with the new values; the target is kept.
    answer = page.explain_after(lambda: page.page.select_option("#method", "gradcam++"))
    assert answer["method"] == "gradcam++" and answer["target"]["label"] == other
    heat_jet = page.pixels("panel-heatmap")
    answer = page.explain_after(lambda: page.page.select_option("#colormap", "viridis"))
    assert answer["colormap"] == "viridis"
    assert not np.array_equal(page.pixels("panel-heatmap"), heat_jet)

    # Opacity from the keyboard: one step right on the slider.
    page.page.focus("#alpha")
    answer = page.explain_after(lambda: page.page.keyboard.press("ArrowRight"))
    assert answer["alpha"] == 0.45 and page.text("#alpha-value") == "0.45"
    assert not np.array_equal(page.pixels("panel-overlay"), after)

    # A "notumor" map has nothing to point at, and the caption says so; tumour maps don't.
    assert "no lesion to point at" not in page.text("#explained")
    page.explain_after(lambda: page.page.select_option("#target", "notumor"))
    assert "no lesion to point at" in page.text("#explained")


def test_api_errors_are_shown(page: Page, glioma_image: Path, tmp_path: Path) -> None:
    page.upload(glioma_image)
    assert page.visible("#result")

    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    answer = page.upload(text)
    assert answer["code"] == "unsupported_media_type"
    assert page.text("#error-detail") == f"{answer['detail']} ({answer['code']})"
    assert page.visible("#error") and page.page.get_attribute("#error", "role") == "alert"
    assert page.page.get_attribute("#error", "data-code") == "unsupported_media_type"
    assert "not supported" in page.text("#error-title")
    assert not page.visible("#result") and not page.visible("#spinner")

    broken = tmp_path / "broken.png"
    broken.write_bytes(glioma_image.read_bytes()[:200])
    assert page.upload(broken)["code"] == "undecodable_image"
    assert page.page.get_attribute("#error", "data-code") == "undecodable_image"
    assert "could not be decoded" in page.text("#error-title")

    # A good image clears the error.
    page.upload(glioma_image)
    assert not page.visible("#error") and page.visible("#result")

    # Too large: refused in the page before uploading, with the server's limit.
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(UPLOAD_LIMIT_MB * 2**20))
    page.page.set_input_files("#file", str(big))
    page.page.wait_for_selector("#error[data-code=payload_too_large]")
    assert (
        page.text("#error-title") == f"The file is too large: the limit is {UPLOAD_LIMIT_MB} MiB."
    )
    assert not page.visible("#result")


def test_server_side_413_is_shown(chromium: Any, server: str, tmp_path: Path) -> None:
    """A page that believes the limit is higher (say, the service was restarted with a
    lower one) uploads, and shows the API's 413."""

    def raise_limit(route: Any) -> None:
        response = route.fetch()
        meta = response.json()
        meta["limits"]["max_upload_bytes"] *= 100
        route.fulfill(response=response, json=meta)

    opened = Page(chromium, server, before_load=lambda page: page.route("**/metadata", raise_limit))
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(2 * UPLOAD_LIMIT_MB * 2**20))
    with opened.page.expect_response(lambda r: r.url.endswith("/explain")) as response:
        opened.page.set_input_files("#file", str(big))
    assert response.value.status == 413
    opened.idle()
    assert opened.page.get_attribute("#error", "data-code") == "payload_too_large"
    assert opened.text("#error-title").startswith("The file is too large")
    assert "exceeds the 1 MiB limit" in opened.text("#error-detail")
    opened.close()


def test_volume_slice_slider(page: Page, demo_data: Path, tmp_path: Path) -> None:
    import nibabel as nib

    images = sorted((demo_data / "Testing").glob("*/*.png"))[:5]
    volume = np.stack([cv2.imread(str(p), cv2.IMREAD_GRAYSCALE).T for p in images], axis=2)
    path = tmp_path / "volume.nii.gz"
    path.write_bytes(gzip.compress(nib.Nifti1Image(volume.astype(np.int16), np.eye(4)).to_bytes()))

    answer = page.upload(path)
    assert answer["input"]["slice"] == 2 and answer["input"]["n_slices"] == 5  # the middle one
    assert page.visible("#slice-control")
    slider = page.page.locator("#slice")
    assert slider.get_attribute("max") == "4" and slider.input_value() == "2"
    assert page.text("#slice-value") == "3 / 5"
    assert "NIFTI 64×64, 16-bit, slice 3 of 5" in page.text("#details")
    middle = page.pixels("panel-original")

    slider.focus()
    answer = page.explain_after(lambda: page.page.keyboard.press("ArrowRight"))
    assert answer["input"]["slice"] == 3
    assert "slice 4 of 5" in page.text("#details") and page.text("#slice-value") == "4 / 5"
    assert not np.array_equal(page.pixels("panel-original"), middle)

    # A 2-D image afterwards hides the slider and sends no slice (the API refuses one).
    answer = page.upload(images[0])
    assert answer["input"]["slice"] is None and not page.visible("#slice-control")


def test_drop_a_file(page: Page, glioma_image: Path) -> None:
    data = base64.b64encode(glioma_image.read_bytes()).decode()
    transfer = page.page.evaluate_handle(
        """(b64) => {
            const bin = atob(b64);
            const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
            return transfer;
        }""",
        data,
    )
    page.explain_after(
        lambda: page.page.dispatch_event("#dropzone", "drop", {"dataTransfer": transfer})
    )
    assert page.visible("#result") and page.text("#file-name").startswith("dropped.png")


@pytest.mark.parametrize(("width", "height"), [(1280, 800), (768, 1024), (1024, 768)])
def test_keyboard_and_layout(
    chromium: Any, server: str, glioma_image: Path, width: int, height: int
) -> None:
    """Every control is reachable with Tab in reading order, each has a label, and a
    laptop or tablet shows the whole result without sideways scrolling."""
    opened = Page(chromium, server, width, height)
    page = opened.page
    order = []
    for _ in range(6):
        page.keyboard.press("Tab")
        order.append(page.evaluate("() => document.activeElement.id"))
    assert order == ["file", "target", "method", "alpha", "colormap", "smooth"]
    for control in order:
        assert page.locator(f"label[for={control}]").count() == 1, control

    opened.upload(glioma_image)
    assert page.evaluate("() => document.documentElement.scrollWidth") <= width
    boxes = [page.locator(f"#panel-{n}").bounding_box() for n in ("original", "heatmap", "overlay")]
    for box in boxes:
        assert box is not None and box["width"] >= 150 and box["x"] + box["width"] <= width
    assert len({round(box["y"]) for box in boxes if box}) == 1  # side by side
    opened.close()


def test_the_models_notice_is_shown(chromium: Any, tmp_path: Path) -> None:
    """The shipped demo model says on the page that it never saw a real scan."""
    shipped = Path(__file__).resolve().parents[1] / "models" / "demo"
    notice = json.loads((shipped / "model.json").read_text())["notice"]
    with _live_server(shipped, tmp_path / "server.log") as url:
        opened = Page(chromium, url)
        assert opened.visible("#model-notice")
        assert opened.text("#model-notice-text") == notice
        opened.close()


def test_api_key_is_asked_for(
    chromium: Any, tiny_model_dir: Path, glioma_image: Path, tmp_path: Path
) -> None:
    """With BRAINCAM_API_KEY set, the page (itself open) asks for the key, keeps it for
    the tab, and sends it as X-API-Key."""
    with _live_server(tiny_model_dir, tmp_path / "server.log", api_key="s3cret-key") as url:
        opened = Page(chromium, url, ready=False)
        page = opened.page
        page.wait_for_selector("#status[data-state=error]")
        assert opened.text("#status") == "API key required"
        assert opened.visible("#key-form") and page.is_disabled("#file")
        assert page.get_attribute("#error", "data-code") == "unauthorized"
        assert page.evaluate("() => document.activeElement.id") == "api-key"

        page.keyboard.type("wrong")
        page.keyboard.press("Enter")
        page.wait_for_selector("#status[data-state=error]")
        assert opened.visible("#key-form")

        page.fill("#api-key", "s3cret-key")
        page.click("#key-form button")
        page.wait_for_selector("#status[data-state=ready]")
        assert not opened.visible("#key-form") and not opened.visible("#error")
        answer = opened.upload(glioma_image)
        assert answer["label"] == opened.text("#label")
        opened.close()


def test_out_of_distribution_warning(
    page: Page, server: str, glioma_image: Path, tmp_path: Path
) -> None:
    """A flagged image is answered (policy warn) under a warning; a scan that passes is not."""
    noise = tmp_path / "noise.png"
    cv2.imwrite(str(noise), np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    answer = page.upload(noise)
    assert answer["in_distribution"] is False
    assert page.visible("#ood-warning") and page.visible("#label")
    assert "unlike the images the model was trained on" in page.text("#ood-warning")
    assert f"{answer['ood_threshold']:.4g}"[:4] in page.text("#ood-detail")
    # The downloads of the flagged answer carry the banner; the page shows the API's image.
    shown = page.pixels("panel-overlay")
    band = banner_height(shown.shape[0])
    for selector in ("#download-overlay", "#download-panels"):
        name, data = page.download(selector)
        assert "UNLIKE-TRAINING-DATA" in name
        saved = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
        top = saved[:band].reshape(-1, 3).astype(int)
        assert (np.abs(top - (176, 0, 32)).max(axis=1) <= 2).mean() > 0.5, selector
        assert (top.min(axis=1) > 60).mean() > 0.02, selector  # the white text
        if selector == "#download-overlay":
            assert np.array_equal(saved[band:], shown[band:])
    answer = page.upload(glioma_image)
    assert page.visible("#ood-warning") == (answer["in_distribution"] is False)
    if answer["in_distribution"]:  # no banner: the API's overlay, byte for byte
        name, data = page.download("#download-overlay")
        assert "UNLIKE" not in name
        assert data == base64.b64decode(_api_explain(server, glioma_image)["overlay_png"])


def test_explanation_outside_the_head_warning(
    page: Page, glioma_image: Path, tmp_path: Path
) -> None:
    """A map lying mostly outside the head (the slice shrunk into a corner, explained as
    pituitary: the tiny model's maps of that class lie in the background) is shown under
    its warning; the same slice's glioma map on the head is not."""
    image = cv2.imread(str(glioma_image), cv2.IMREAD_GRAYSCALE)
    corner = np.zeros_like(image)
    k = round(image.shape[0] * 0.2)
    corner[:k, :k] = cv2.resize(image, (k, k), interpolation=cv2.INTER_AREA)
    path = tmp_path / "corner.png"
    cv2.imwrite(str(path), corner)
    page.upload(path)
    answer = page.explain_after(lambda: page.page.select_option("#target", "pituitary"))
    assert answer["heat_outside_head"] > 0.5
    assert "heat_outside_head" in [w["code"] for w in answer["warnings"]]
    assert page.visible("#head-warning") and page.visible("#label")
    assert "outside the head" in page.text("#head-warning")
    assert f"{answer['heat_outside_head']:.0%}" in page.text("#head-detail")

    page.upload(glioma_image)
    answer = page.explain_after(lambda: page.page.select_option("#target", "glioma"))
    assert answer["heat_outside_head"] <= 0.5
    assert not page.visible("#head-warning")


def test_a_layer_and_the_pixel_methods(page: Page, chromium: Any, glioma_image: Path,
                                       tmp_path: Path) -> None:
    """A model without attribution.onnx offers no layer choice; the shipped demo model
    (with one) does, and turns it off for the pixel methods."""
    page.upload(glioma_image)
    assert not page.visible("#layer-field")
    shipped = Path(__file__).resolve().parents[1] / "models" / "demo"
    with _live_server(shipped, tmp_path / "server.log") as url:
        demo = Page(chromium, url)
        demo.upload(glioma_image)
        assert demo.visible("#layer-field")
        answer = demo.explain_after(lambda: demo.page.select_option("#layer", "block3_relu"))
        assert answer["layer"] == "block3_relu" and answer["method"] == "gradcam"
        answer = demo.explain_after(lambda: demo.page.select_option("#method", "smoothgrad"))
        assert answer["method"] == "smoothgrad" and answer["layer"] == "image"
        assert demo.page.is_disabled("#layer")
        demo.close()
