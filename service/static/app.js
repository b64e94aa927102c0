// braincam web page: upload an image, call /explain, show the decision and its heatmap.
// Plain browser JavaScript, no build step and no third-party code (the page works offline).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  // Relative URLs: the page keeps working behind a reverse proxy that adds a path prefix.
  const api = (path) => new URL(path, document.baseURI);

  // What to tell a person for each error code of the API ({detail, code}).
  const MESSAGES = {
    payload_too_large: "The file is too large.",
    unsupported_media_type:
      "This file type is not supported: send PNG, JPEG, BMP, TIFF, DICOM or NIfTI (.nii, .nii.gz).",
    undecodable_image: "The file could not be decoded: it may be truncated or corrupt.",
    out_of_distribution: "The image is unlike the images the model was trained on, so it was not classified.",
    image_too_large: "The image has too many pixels for this service.",
    invalid_input: "The input was not accepted.",
    invalid_parameter: "A setting was not accepted.",
    validation_error: "The request was not valid.",
    bad_request: "The upload could not be read.",
    model_loading: "The model is still loading; trying again…",
    model_unavailable: "The model could not be loaded: see /health for the reason.",
    service_unavailable: "The service is unavailable.",
    too_many_requests: "The service is busy: try again in a moment.",
    request_timeout: "The request took too long: try again.",
    inference_failed: "The model failed on this image (details are in the service's log).",
    internal_error: "The service hit an internal error (details are in its log).",
    unauthorized: "This service needs an API key: enter it above the image.",
    network: "Could not reach the service.",
  };
  const DEBOUNCE_MS = 250;
  const KEY_STORAGE = "braincam.apiKey"; // sessionStorage: gone when the tab closes
  const MAX_LOADING_RETRIES = 120;
  // The healthy class, as braincam's datasets name it for both tasks. Its map has no
  // lesion to point at (README: "How good are the explanations?").
  const NO_TUMOUR = "notumor";
  // Burned into the downloads of an answer the out-of-distribution gate flagged, as
  // braincam burns it into every image of such an answer it writes or stores
  // (braincam/overlay.py `with_banner`): a saved image says it on its own.
  const OOD_BANNER = "UNLIKE TRAINING DATA";

  const state = {
    meta: null,
    file: null,
    slice: null, // null: the server's default (the middle slice)
    controller: null, // AbortController of the request in flight
    seq: 0, // only the newest request may touch the page
    urls: [], // object URLs of the shown images, revoked when replaced
  };

  // ---- small helpers -------------------------------------------------------------

  const pct = (p) => (p > 0 && p < 0.0005 ? "< 0.1 %" : `${(100 * p).toFixed(1)} %`);
  const mib = (bytes) => `${(bytes / 2 ** 20).toFixed(bytes % 2 ** 20 ? 1 : 0)} MiB`;

  function debounce(fn, ms) {
    let timer = 0;
    return () => {
      clearTimeout(timer);
      timer = setTimeout(fn, ms);
    };
  }

  function setStatus(text, kind) {
    const el = $("status");
    el.textContent = text;
    el.dataset.state = kind;
  }

  function fillSelect(select, values, selected) {
    for (const value of values) {
      const option = document.createElement("option");
      option.value = value;
      option.textContent = value;
      option.selected = value === selected;
      select.append(option);
    }
  }

  function base64ToBlob(b64, type) {
    const bin = atob(b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i += 1) bytes[i] = bin.charCodeAt(i);
    return new Blob([bytes], { type });
  }

  function objectUrl(blob, urls) {
    const url = URL.createObjectURL(blob);
    urls.push(url);
    return url;
  }

  function loadImage(url) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error("image did not load"));
      img.src = url;
    });
  }

  // The panel figure is Original | Heatmap | Overlay, titled above, each tile at the
  // upload's size: the first tile is the decoded image the model saw, also for DICOM
  // and NIfTI, which a browser cannot show itself.
  async function cropOriginal(panelsUrl, width, height) {
    const img = await loadImage(panelsUrl);
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    canvas.getContext("2d").drawImage(img, 0, img.naturalHeight - height, width, height, 0, 0, width, height);
    return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  }

  // The banner across the image's top rows, white on red, the image keeping its size.
  async function withBanner(url) {
    const img = await loadImage(url);
    const canvas = document.createElement("canvas");
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(img, 0, 0);
    const band = Math.min(Math.max(Math.round(canvas.height * 0.08), 10), 48, canvas.height);
    ctx.fillStyle = "rgb(176, 0, 32)";
    ctx.fillRect(0, 0, canvas.width, band);
    let size = Math.max(Math.round(band * 0.7), 1);
    ctx.font = `bold ${size}px sans-serif`;
    const width = ctx.measureText(OOD_BANNER).width;
    if (width > canvas.width - 4) {
      size = Math.max(Math.floor((size * (canvas.width - 4)) / width), 1);
      ctx.font = `bold ${size}px sans-serif`;
    }
    ctx.fillStyle = "#fff";
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText(OOD_BANNER, canvas.width / 2, band / 2);
    return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  }

  function safeName(text) {
    return text.replace(/\.(nii\.gz|[a-z0-9]+)$/i, "").replace(/[^A-Za-z0-9._-]+/g, "_").slice(0, 80) || "image";
  }

  // ---- API key (only when the service sets BRAINCAM_API_KEY) ----------------------

  function authHeaders() {
    const key = sessionStorage.getItem(KEY_STORAGE);
    return key ? { "X-API-Key": key } : {};
  }

  function askForKey() {
    $("key-form").hidden = false;
    $("api-key").focus();
  }

  function wireKeyForm() {
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
      $("api-key").value = "";
      setStatus("Checking the key…", "loading");
      loadMetadata();
    });
  }

  // ---- errors, spinner -----------------------------------------------------------

  function showError(code, detail) {
    let title = MESSAGES[code] || "The request failed.";
    if (code === "payload_too_large" && state.meta) {
      title = `The file is too large: the limit is ${mib(state.meta.limits.max_upload_bytes)}.`;
    }
    $("error-title").textContent = title;
    $("error-detail").textContent = detail ? `${detail} (${code})` : `(${code})`;
    $("error").dataset.code = code;
    $("error").hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    delete $("error").dataset.code;
  }

  function setBusy(busy, text) {
    $("spinner").hidden = !busy;
    if (text) $("spinner-text").textContent = text;
    $("results").setAttribute("aria-busy", String(busy));
  }

  function clearResult() {
    $("result").hidden = true;
    $("empty").hidden = false;
    for (const url of state.urls) URL.revokeObjectURL(url);
    state.urls = [];
  }

  // ---- metadata ------------------------------------------------------------------

  async function loadMetadata(attempt = 0) {
    let res;
    try {
      res = await fetch(api("metadata"), { headers: { Accept: "application/json", ...authHeaders() } });
    } catch {
      setStatus("Service unreachable", "error");
      showError("network", "GET /metadata failed");
      setTimeout(() => loadMetadata(attempt + 1), 3000);
      return;
    }
    const body = await res.json().catch(() => ({}));
    if (res.status === 503 && body.code === "model_loading" && attempt < MAX_LOADING_RETRIES) {
      setStatus("Loading the model…", "loading");
      setTimeout(() => loadMetadata(attempt + 1), 1000);
      return;
    }
    if (res.status === 401) {
      setStatus("API key required", "error");
      showError("unauthorized", body.detail);
      askForKey();
      return;
    }
    if (!res.ok) {
      setStatus("Model unavailable", "error");
      showError(body.code || `http_${res.status}`, body.detail);
      return;
    }
    clearError();
    $("key-form").hidden = true;
    if (state.meta) {
      // A key entered after /explain refused the old one: run the image again.
      setStatus("Ready", "ready");
      if (state.file) explain();
    } else {
      applyMetadata(body);
    }
  }

  function applyMetadata(meta) {
    state.meta = meta;
    const model = meta.model;
    $("model-name").textContent = `${model.name} v${model.version}`;
    $("model-labels").textContent = model.labels.join(", ");
    const active = meta.providers.active.map((p) => p.replace(/ExecutionProvider$/, ""));
    $("providers").textContent = `${active.join(", ")}${meta.gpu ? " (GPU)" : ""}`;
    $("providers").title = `requested: ${meta.providers.requested.join(", ")}`;
    if (meta.disclaimer) $("disclaimer").textContent = meta.disclaimer;
    // What the model's training data means for its answers (the demo model's: synthetic).
    $("model-notice").hidden = !model.notice;
    $("model-notice-text").textContent = model.notice || "";
    $("formats-hint").textContent =
      `PNG, JPEG, BMP, TIFF, DICOM or NIfTI (.nii, .nii.gz), up to ${mib(meta.limits.max_upload_bytes)}`;

    fillSelect($("target"), model.labels, null);
    fillSelect($("method"), meta.cam_methods, meta.defaults.method);
    // Other layers than the Grad-CAM graph's come from the model's attribution graph.
    const layers = meta.cam_layers || [];
    fillSelect($("layer"), layers, null);
    $("layer-field").hidden = layers.length < 2;
    layerChoice();
    fillSelect($("colormap"), meta.colormaps, meta.defaults.colormap);
    $("alpha").value = String(meta.defaults.alpha);
    $("alpha-value").textContent = Number(meta.defaults.alpha).toFixed(2);
    $("file").disabled = false;
    setStatus("Ready", "ready");
  }

  // ---- the request ---------------------------------------------------------------

  function formData() {
    const form = new FormData();
    form.append("file", state.file, state.file.name);
    if (state.slice !== null) form.append("slice", String(state.slice));
    if ($("target").value) form.append("target", $("target").value);
    form.append("method", $("method").value);
    if ($("layer").value && !$("layer").disabled) form.append("layer", $("layer").value);
    form.append("alpha", $("alpha").value);
    form.append("colormap", $("colormap").value);
    form.append("smooth", $("smooth").checked ? "true" : "false");
    // The page shows all three: the Original panel is cut from the panels figure.
    form.append("images", "overlay,heatmap,panels");
    return form;
  }

  async function explain(loadingRetries = 0) {
    if (!state.file) return;
    if (state.controller) state.controller.abort();
    const controller = new AbortController();
    state.controller = controller;
    const seq = ++state.seq;
    clearError();
    setBusy(true, "Running the model…");
    let res;
    let body;
    try {
      res = await fetch(api("explain"), {
        method: "POST",
        body: formData(),
        headers: authHeaders(),
        signal: controller.signal,
      });
      body = await res.json().catch(() => null);
    } catch (err) {
      if (err.name === "AbortError") return;
      if (seq === state.seq) {
        setBusy(false);
        clearResult();
        showError("network", String(err.message || err));
      }
      return;
    }
    if (seq !== state.seq) return; // a newer request owns the page
    if (!res.ok) {
      const code = (body && body.code) || `http_${res.status}`;
      if (code === "model_loading" && loadingRetries < MAX_LOADING_RETRIES) {
        setBusy(true, "The model is still loading…");
        const wait = 1000 * Number(res.headers.get("Retry-After") || 1);
        setTimeout(() => seq === state.seq && explain(loadingRetries + 1), wait);
        return;
      }
      setBusy(false);
      clearResult();
      showError(code, body && body.detail);
      if (res.status === 401) askForKey();
      return;
    }
    try {
      await render(body, seq);
    } catch (err) {
      if (seq !== state.seq) return;
      clearResult();
      showError("render", `the response could not be shown: ${err.message || err}`);
    }
    if (seq === state.seq) setBusy(false);
  }

  // ---- showing the result --------------------------------------------------------

  function renderProbabilities(probabilities, decided) {
    const list = $("probabilities");
    list.replaceChildren();
    for (const [label, p] of Object.entries(probabilities)) {
      const item = document.createElement("li");
      item.dataset.label = label;
      if (label === decided) item.className = "decided";
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = label;
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.setAttribute("aria-hidden", "true");
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.width = `${Math.max(0, Math.min(1, p)) * 100}%`;
      bar.append(fill);
      const value = document.createElement("span");
      value.className = "pct";
      value.textContent = pct(p);
      item.append(name, bar, value);
      list.append(item);
    }
  }

  function renderSlice(input) {
    const volume = input.n_slices !== null && input.n_slices > 1;
    $("slice-control").hidden = !volume;
    if (!volume) return;
    const slider = $("slice");
    slider.max = String(input.n_slices - 1);
    slider.value = String(input.slice);
    $("slice-value").textContent = `${input.slice + 1} / ${input.n_slices}`;
    state.slice = input.slice;
  }

  async function render(r, seq) {
    const urls = [];
    const overlayUrl = objectUrl(base64ToBlob(r.overlay_png, "image/png"), urls);
    const heatmapUrl = objectUrl(base64ToBlob(r.heatmap_png, "image/png"), urls);
    const panelsUrl = objectUrl(base64ToBlob(r.panels_png, "image/png"), urls);
    const originalUrl = objectUrl(await cropOriginal(panelsUrl, r.input.width, r.input.height), urls);
    // Above the answer: an input the out-of-distribution gate flagged (policy `warn`).
    const foreign = r.in_distribution === false;
    // What leaves the page of a flagged answer carries the banner; the page itself shows
    // the API's images under its warning.
    const overlayDownload = foreign ? objectUrl(await withBanner(overlayUrl), urls) : overlayUrl;
    const panelsDownload = foreign ? objectUrl(await withBanner(panelsUrl), urls) : panelsUrl;
    if (seq !== state.seq) {
      for (const url of urls) URL.revokeObjectURL(url);
      return;
    }
    for (const url of state.urls) URL.revokeObjectURL(url);
    state.urls = urls;

    $("ood-warning").hidden = !foreign;
    $("ood-detail").textContent = foreign
      ? `Out-of-distribution score ${r.ood_score.toPrecision(4)} is above the threshold ` +
        `${r.ood_threshold.toPrecision(4)} that 95 % of held-out training-like images stay under. ` +
        "The prediction below is shown but should not be trusted."
      : "";
    // The map's mass lies mostly in the background (`warnings`, code heat_outside_head).
    const outside = (r.warnings || []).find((w) => w.code === "heat_outside_head");
    $("head-warning").hidden = !outside;
    $("head-detail").textContent = outside
      ? `${outside.detail.charAt(0).toUpperCase()}${outside.detail.slice(1)}.`
      : "";
    $("result").classList.toggle("untrusted", foreign);
    $("label").textContent = r.label;
    $("confidence").textContent = pct(r.confidence);
    renderProbabilities(r.probabilities, r.label);
    const which = r.target.label === r.label ? "the predicted class" : "a class other than the prediction";
    const healthy = r.target.label === NO_TUMOUR
      ? " A \u201cnotumor\u201d map has no lesion to point at: that verdict rests on the absence" +
        " of lesion evidence. Explain a tumour class to see where the model looked for one."
      : "";
    $("explained").textContent =
      `Heatmap: ${r.method} for ${r.target.label} (${which}), layer ${r.layer}` +
      `${r.smooth ? ", smoothed with the mirrored image" : ""}.${healthy}`;
    $("explained").dataset.target = r.target.label;

    // Decoded before the spinner goes: the three panels appear together.
    const shown = [
      [$("panel-original"), originalUrl],
      [$("panel-heatmap"), heatmapUrl],
      [$("panel-overlay"), overlayUrl],
    ];
    for (const [img, url] of shown) img.src = url;
    await Promise.all(shown.map(([img]) => img.decode()));
    if (seq !== state.seq) return;

    const stem = `${safeName(state.file.name)}_${r.target.label}_${r.method}`;
    const flag = foreign ? "_UNLIKE-TRAINING-DATA" : "";
    $("download-overlay").href = overlayDownload;
    $("download-overlay").download = `${stem}${flag}_overlay.png`;
    $("download-panels").href = panelsDownload;
    $("download-panels").download = `${stem}${flag}_panels.png`;

    renderSlice(r.input);
    const input = r.input;
    const slice = input.n_slices ? `, slice ${input.slice + 1} of ${input.n_slices}` : "";
    $("details").textContent =
      `${input.format.toUpperCase()} ${input.width}×${input.height}, ${input.bit_depth}-bit${slice} · ` +
      `${r.timing_ms.total.toFixed(0)} ms on the server (inference ${r.timing_ms.inference.toFixed(1)} ms)` +
      `${r.gradcam_runs > 1 ? `, ${r.gradcam_runs} Grad-CAM runs` : ""}`;

    $("empty").hidden = true;
    $("result").hidden = false;
  }

  // ---- input ---------------------------------------------------------------------

  function takeFile(file) {
    if (!file || !state.meta) return;
    const size = file.size < 1024 ? `${file.size} bytes` : `${(file.size / 1024).toFixed(file.size < 10240 ? 1 : 0)} KiB`;
    $("file-name").textContent = `${file.name} (${size})`;
    $("file-name").hidden = false;
    // A new image starts from its own defaults: the middle slice, the predicted class.
    state.file = null;
    state.slice = null;
    $("target").value = "";
    $("slice-control").hidden = true;
    state.seq += 1; // drop any answer still on its way for the previous file
    if (state.controller) state.controller.abort();
    clearResult();
    if (file.size > state.meta.limits.max_upload_bytes) {
      // Refused here rather than after uploading it: the server would answer 413.
      setBusy(false);
      showError("payload_too_large", `${file.name} is ${mib(file.size)}`);
      return;
    }
    state.file = file;
    explain();
  }

  function wireDropzone() {
    const zone = $("dropzone");
    const input = $("file");
    input.addEventListener("change", () => {
      takeFile(input.files[0]);
      input.value = ""; // choosing the same file again re-runs it
    });
    // Dropping a file anywhere else must not navigate away from the page.
    for (const type of ["dragover", "drop"]) {
      window.addEventListener(type, (event) => event.preventDefault());
    }
    zone.addEventListener("dragenter", (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
    zone.addEventListener("dragover", (event) => {
      event.preventDefault();
      event.dataTransfer.dropEffect = input.disabled ? "none" : "copy";
    });
    zone.addEventListener("dragleave", (event) => {
      if (!zone.contains(event.relatedTarget)) zone.classList.remove("dragging");
    });
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("dragging");
      if (!input.disabled) takeFile(event.dataTransfer.files[0]);
    });
  }

  // Pixel-resolution methods and occlusion explain the input, not a layer.
  const NO_LAYER = ["smoothgrad", "integrated_gradients", "occlusion"];

  function layerChoice() {
    $("layer").disabled = NO_LAYER.includes($("method").value);
  }

  function wireControls() {
    const later = debounce(() => explain(), DEBOUNCE_MS);
    $("method").addEventListener("change", layerChoice);
    for (const id of ["target", "method", "layer", "colormap", "smooth"]) {
      $(id).addEventListener("change", () => explain());
    }
    $("alpha").addEventListener("input", () => {
      $("alpha-value").textContent = Number($("alpha").value).toFixed(2);
      later();
    });
    $("slice").addEventListener("input", () => {
      const slider = $("slice");
      state.slice = Number(slider.value);
      $("slice-value").textContent = `${state.slice + 1} / ${Number(slider.max) + 1}`;
      later();
    });
  }

  wireKeyForm();
  wireDropzone();
  wireControls();
  loadMetadata();
})();
