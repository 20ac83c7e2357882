// petvit's page: pick, drop or paste photos; each is sent on its own to POST /classify (so one bad file fails
// alone and results appear as they come), and shown with its top-k breeds and the attention heatmap.
//
// Every string from the server or the user (labels, error messages, file names) goes into the page through
// textContent or a property, never through innerHTML.
"use strict";

(() => {
  const MAX_PARALLEL = 4; // requests in flight at once; the server batches them anyway
  const MAX_RETRIES_429 = 3; // "queue full" is transient: wait for Retry-After, then try again
  const API_KEY_STORAGE = "petvit.apiKey";

  const $ = (selector, root = document) => root.querySelector(selector);
  const fileInput = $("#file-input");
  const dropZone = $("#drop-zone");
  const topKInput = $("#top-k");
  const clearButton = $("#clear-results");
  const resultsList = $("#results");
  const statusLine = $("#status");
  const modelStatus = $("#model-status");
  const template = $("#result-template");

  let cardSerial = 0;
  let pending = []; // jobs waiting for a free slot
  let running = 0;
  let counts = { done: 0, failed: 0, total: 0 };
  let generation = 0; // bumped by "Clear results": answers for cleared cards are dropped
  const objectUrls = new Set();

  // ---------- small DOM helpers (text only) ----------

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function percent(score) {
    return `${(Number(score) * 100).toFixed(1)}%`;
  }

  function plural(n, word) {
    return `${n} ${word}${n === 1 ? "" : "s"}`;
  }

  // ---------- model information ----------

  function accuracyOf(info) {
    const evaluation = info && typeof info.evaluation === "object" && info.evaluation ? info.evaluation : {};
    for (const key of ["top1", "top1_accuracy", "accuracy"]) {
      const value = evaluation[key];
      if (typeof value === "number" && Number.isFinite(value)) return value;
    }
    return null;
  }

  // "top-1 accuracy 91.2% (top-5 98.9%) on oxford-iiit-pet test, 3669 images", from what the artifact recorded.
  function describeEvaluation(info) {
    const accuracy = accuracyOf(info);
    if (accuracy === null) return "not evaluated";
    const evaluation = info.evaluation;
    let text = `top-1 accuracy ${percent(accuracy)}`;
    if (Number.isFinite(evaluation.top5)) text += ` (top-5 ${percent(evaluation.top5)})`;
    const on = [evaluation.dataset, evaluation.split].filter((v) => typeof v === "string" && v).join(" ");
    text += on ? ` on ${on}` : " on its evaluation set";
    if (Number.isInteger(evaluation.num_images)) text += `, ${evaluation.num_images} images`;
    return text;
  }

  function renderModelInfo(info) {
    const parts = [];
    const name = element("span", "model-name", info.name || "unnamed model");
    parts.push(name);
    if (info.variant) parts.push(element("span", "model-variant", `ViT ${info.variant}`));
    const trained = info.trained === true;
    const badge = element(
      "span",
      `badge ${trained ? "badge-trained" : "badge-untrained"}`,
      trained ? "trained" : "untrained: predictions are not meaningful",
    );
    badge.id = "model-trained";
    parts.push(badge);
    const accuracyText = element("span", "model-accuracy", describeEvaluation(info));
    accuracyText.id = "model-accuracy";
    parts.push(accuracyText);
    if (typeof info.sha256 === "string" && info.sha256) {
      const sha = element("code", "model-sha", `sha256 ${info.sha256.slice(0, 12)}`);
      sha.title = `artifact sha256 ${info.sha256}`;
      parts.push(sha);
    }
    const labels = Array.isArray(info.labels) ? info.labels.length : 0;
    if (labels > 0) {
      parts.push(element("span", "model-labels", `${labels} breeds`));
      topKInput.max = String(labels);
      if (Number(topKInput.value) > labels) topKInput.value = String(labels);
    }
    modelStatus.replaceChildren(...parts.flatMap((part, i) => (i ? [document.createTextNode(" · "), part] : [part])));
  }

  async function loadModelInfo(attempt = 0) {
    try {
      const response = await fetch("v1/model", { headers: apiHeaders() });
      const body = await readJson(response);
      if (!response.ok) throw new Error(errorMessage(response, body));
      renderModelInfo(body);
    } catch (err) {
      const retry = attempt < 20;
      modelStatus.textContent = `Model information unavailable: ${err.message}${retry ? " (retrying…)" : ""}`;
      if (retry) setTimeout(() => loadModelInfo(attempt + 1), Math.min(1000 * 2 ** attempt, 10000));
    }
  }

  // ---------- talking to the API ----------

  function apiHeaders() {
    const key = sessionStorage.getItem(API_KEY_STORAGE);
    return key ? { "X-API-Key": key } : {};
  }

  async function readJson(response) {
    try {
      return await response.json();
    } catch {
      return null;
    }
  }

  // The server's own words for what went wrong ({"error": {"code", "message"}}), or the status line.
  function errorMessage(response, body) {
    const error = body && typeof body === "object" ? body.error : null;
    if (error && typeof error.message === "string" && error.message) return error.message;
    if (body && typeof body.detail === "string") return body.detail;
    return `The server answered ${response.status} ${response.statusText || ""}`.trim();
  }

  // One entry per image, in upload order (ClassifyResponse.results in app/schemas.py).
  function entriesOf(body) {
    return body && typeof body === "object" && Array.isArray(body.results) ? body.results : [];
  }

  function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }

  async function classify(file, topK) {
    const url = `classify?top_k=${encodeURIComponent(topK)}&heatmap=true`;
    for (let attempt = 0; ; attempt++) {
      const form = new FormData();
      form.append("file", file, file.name || "pasted-image");
      const response = await fetch(url, { method: "POST", body: form, headers: apiHeaders() });
      const body = await readJson(response);
      if (response.status === 429 && attempt < MAX_RETRIES_429) {
        const wait = Number(response.headers.get("Retry-After"));
        await sleep(1000 * (Number.isFinite(wait) && wait > 0 ? Math.min(wait, 30) : 1));
        continue;
      }
      if (response.status === 401) showApiKeyField();
      if (!response.ok) throw new Error(errorMessage(response, body));
      const entry = entriesOf(body)[0];
      if (!entry || !Array.isArray(entry.predictions)) throw new Error("The server's answer has no predictions.");
      return entry;
    }
  }

  // Shown only when the server asks for a key (401): kept for this tab only.
  function showApiKeyField() {
    if ($("#api-key")) return;
    const label = element("label", "api-key", "API key ");
    label.htmlFor = "api-key";
    const input = element("input");
    input.id = "api-key";
    input.type = "password";
    input.autocomplete = "off";
    input.value = sessionStorage.getItem(API_KEY_STORAGE) || "";
    input.addEventListener("change", () => {
      sessionStorage.setItem(API_KEY_STORAGE, input.value.trim());
      loadModelInfo();
    });
    const hint = element("span", "hint", "This server needs an API key (sent as X-API-Key); try the photo again after entering it.");
    $(".options").append(label, input, hint);
  }

  // ---------- result cards ----------

  function createCard(file) {
    const id = `result-${++cardSerial}`;
    const item = template.content.firstElementChild.cloneNode(true);
    item.id = id;
    const title = $(".card-title", item);
    title.id = `${id}-title`;
    title.textContent = file.name || "pasted image";
    $(".card", item).setAttribute("aria-labelledby", title.id);

    const photo = $(".photo", item);
    photo.alt = `The photo ${file.name || "you pasted"}`;
    const url = URL.createObjectURL(file);
    objectUrls.add(url);
    photo.addEventListener(
      "error",
      () => {
        // Not something the browser can show (a TIFF, or not an image at all): say so instead of a broken icon.
        item.dataset.preview = "missing";
        $(".photo-frame", item).hidden = true;
        $(".photo-frame", item).before(element("p", "photo-missing", "No preview: the browser cannot display this file."));
        const overlay = $(".heatmap-overlay", item);
        if (overlay.getAttribute("src")) showHeatmapAlone(item, overlay.getAttribute("src")); // the answer came first
      },
      { once: true },
    );
    photo.src = url;

    const toggle = $(".heatmap-toggle", item);
    const opacity = $(".heatmap-opacity", item);
    const opacityValue = $(".heatmap-opacity-value", item);
    const overlay = $(".heatmap-overlay", item);
    toggle.id = `${id}-heatmap`;
    opacity.id = `${id}-opacity`;
    opacityValue.htmlFor = opacity.id;
    toggle.setAttribute("aria-describedby", title.id);
    opacity.setAttribute("aria-describedby", title.id);
    toggle.addEventListener("change", () => {
      overlay.hidden = !toggle.checked;
      opacity.disabled = !toggle.checked;
    });
    opacity.addEventListener("input", () => {
      overlay.style.opacity = String(Number(opacity.value) / 100);
      opacityValue.textContent = `${opacity.value}%`;
      opacity.setAttribute("aria-valuetext", `${opacity.value}%`);
    });
    overlay.style.opacity = String(Number(opacity.value) / 100);
    return item;
  }

  function renderPredictions(item, entry) {
    const list = $(".predictions", item);
    const rows = entry.predictions.map((prediction) => {
      const row = element("li", "prediction");
      row.dataset.label = String(prediction.label);
      row.dataset.score = String(prediction.score);
      row.dataset.index = String(prediction.index);
      const head = element("div", "prediction-head");
      head.append(
        element("span", "prediction-label", prediction.label),
        element("span", "prediction-species", prediction.species),
        element("span", "prediction-score", percent(prediction.score)),
      );
      const track = element("div", "bar-track");
      track.setAttribute("aria-hidden", "true");
      const bar = element("div", "bar");
      bar.style.width = `${Math.max(0, Math.min(1, Number(prediction.score))) * 100}%`;
      track.append(bar);
      row.append(head, track);
      return row;
    });
    list.replaceChildren(...rows);
    const unknown = entry.unknown === true; // null (the model has no open-set threshold) reads as "not unknown"
    const name = $(".card-title", item).textContent;
    list.setAttribute("aria-label", `${unknown ? "Dimmed guesses: " : ""}Top ${rows.length} breeds for ${name}`);
    list.classList.toggle("is-unknown", unknown);
    item.dataset.unknown = String(entry.unknown ?? "null");
    $(".unknown-notice", item).hidden = !unknown;
    list.hidden = false;
  }

  const BASE64 = /^[A-Za-z0-9+/]+={0,2}$/;

  // Nothing to lay the overlay over (the browser cannot show this file): the overlay alone, over a neutral grey,
  // still shows where the model looked and which part of the image it never saw. Toggle and slider would only
  // fade it into the grey, so they go; the legend stays.
  function showHeatmapAlone(item, src) {
    const frame = $(".photo-frame", item);
    const overlay = $(".heatmap-overlay", item);
    $(".photo", item).hidden = true;
    frame.classList.add("overlay-alone");
    overlay.src = src;
    overlay.alt = `Attention heatmap of ${$(".card-title", item).textContent}, without the photo`;
    overlay.style.opacity = "1";
    overlay.hidden = false;
    frame.hidden = false;
    $(".heatmap-controls", item).hidden = false;
    $(".toggle", item).hidden = true;
    $(".slider", item).hidden = true;
    $(".photo-missing", item).textContent = "No preview of this file in the browser; shown: the heatmap alone, over grey.";
  }

  // The server's PNG is a transparent overlay at the upload's own size: heat colours over the square crop the model
  // saw, a dark veil outside it, nothing of the photo. Laid over the photo, the slider scales its opacity (0% = the
  // plain photo) and the toggle hides it.
  function renderHeatmap(item, heatmap) {
    if (!heatmap || typeof heatmap.png !== "string" || !BASE64.test(heatmap.png)) return;
    const src = `data:image/png;base64,${heatmap.png}`;
    const name = $(".card-title", item).textContent;
    if (item.dataset.preview === "missing") {
      showHeatmapAlone(item, src);
      return;
    }
    const overlay = $(".heatmap-overlay", item);
    overlay.src = src;
    overlay.alt = `Attention heatmap over ${name}`;
    overlay.dataset.rows = String(heatmap.rows ?? heatmap.grid?.length ?? "");
    overlay.dataset.cols = String(heatmap.cols ?? heatmap.grid?.[0]?.length ?? "");
    overlay.hidden = !$(".heatmap-toggle", item).checked;
    $(".heatmap-controls", item).hidden = false;
  }

  // Timings (app/schemas.py Timings): where this image's time went on the server.
  const TIMING_NAMES = [
    ["preprocess_ms", "decode"],
    ["queue_ms", "queue"],
    ["inference_ms", "model"],
    ["heatmap_ms", "heatmap"],
  ];

  function renderTimings(item, entry) {
    const timings = entry.timings && typeof entry.timings === "object" ? entry.timings : {};
    const parts = TIMING_NAMES.filter(([key]) => Number.isFinite(timings[key])).map(
      ([key, name]) => `${name} ${timings[key].toFixed(1)} ms`,
    );
    if (Number.isFinite(timings.batch_size)) parts.push(`batch of ${timings.batch_size}`);
    const size = Number.isFinite(entry.width) && Number.isFinite(entry.height) ? `${entry.width} × ${entry.height} px. ` : "";
    if (!parts.length && !size) return;
    const line = $(".timings", item);
    line.textContent = `${size}Server: ${parts.join(" · ")}`;
    line.hidden = false;
  }

  function finish(item, ok) {
    item.classList.add(ok ? "is-done" : "is-failed");
    $(".card", item).setAttribute("aria-busy", "false");
    counts[ok ? "done" : "failed"]++;
    updateStatus();
  }

  function updateStatus() {
    const { done, failed, total } = counts;
    const waiting = total - done - failed;
    const parts = [];
    if (waiting) parts.push(`Classifying ${plural(waiting, "photo")}…`);
    if (done) parts.push(`${plural(done, "photo")} classified.`);
    if (failed) parts.push(`${failed} failed.`);
    statusLine.textContent = parts.length ? parts.join(" ") : "No photos yet.";
    clearButton.disabled = total === 0;
  }

  async function runJob({ item, file, topK, batch }) {
    try {
      const entry = await classify(file, topK);
      if (batch !== generation) return;
      $(".card-status", item).hidden = true;
      renderPredictions(item, entry);
      renderHeatmap(item, entry.heatmap);
      renderTimings(item, entry);
      finish(item, true);
    } catch (err) {
      if (batch !== generation) return;
      $(".card-status", item).hidden = true;
      const error = $(".error", item);
      error.textContent = err instanceof TypeError ? `Could not reach the server: ${err.message}` : err.message;
      error.hidden = false;
      finish(item, false);
    }
  }

  function pump() {
    while (running < MAX_PARALLEL && pending.length) {
      const job = pending.shift();
      running++;
      runJob(job).finally(() => {
        running--;
        pump();
      });
    }
  }

  function currentTopK() {
    const max = Number(topKInput.max) || 37;
    // An emptied field (or one the browser found invalid) reads "": that means the default, not Number("") = 0 -> 1.
    const raw = topKInput.value.trim();
    const value = raw === "" ? NaN : Math.round(Number(raw));
    const fallback = Math.min(Number(topKInput.defaultValue) || 5, max);
    const topK = Number.isFinite(value) ? Math.min(Math.max(value, 1), max) : fallback;
    topKInput.value = String(topK);
    return topK;
  }

  function addFiles(fileList) {
    const files = Array.from(fileList || []);
    if (!files.length) return;
    const topK = currentTopK();
    for (const file of files) {
      const item = createCard(file);
      resultsList.append(item);
      counts.total++;
      pending.push({ item, file, topK, batch: generation });
    }
    updateStatus();
    pump();
  }

  function clearResults() {
    generation++;
    pending = [];
    for (const url of objectUrls) URL.revokeObjectURL(url);
    objectUrls.clear();
    resultsList.replaceChildren();
    counts = { done: 0, failed: 0, total: 0 };
    updateStatus();
    fileInput.focus();
  }

  // ---------- wiring ----------

  fileInput.addEventListener("change", () => {
    addFiles(fileInput.files);
    fileInput.value = ""; // picking the same file again still fires "change"
  });
  clearButton.addEventListener("click", clearResults);

  // Drop anywhere on the page; the drop zone lights up while something is dragged over the window.
  let dragDepth = 0;
  const hasFiles = (event) => Array.from(event.dataTransfer?.types || []).includes("Files");
  document.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    dragDepth++;
    dropZone.classList.add("dragging");
  });
  document.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) dropZone.classList.remove("dragging");
  });
  document.addEventListener("dragover", (event) => {
    if (hasFiles(event)) event.preventDefault();
  });
  document.addEventListener("drop", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    dragDepth = 0;
    dropZone.classList.remove("dragging");
    addFiles(event.dataTransfer.files);
  });
  document.addEventListener("paste", (event) => {
    const files = event.clipboardData?.files;
    if (files && files.length) addFiles(files);
  });

  loadModelInfo();
})();
