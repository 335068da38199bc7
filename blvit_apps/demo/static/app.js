// blvit-demo's page: upload or pick an image, click points / drag a box, show the mask.
// Plain JavaScript, no build step. The server computes each image's embedding once; every
// prompt afterwards only runs SAM's prompt encoder and mask decoder: on the server, or, with
// "Decode in this browser", in this page through onnxruntime-web (as SAM's own web demo does).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  imageId: null, width: 0, height: 0, points: [], labels: [], box: null,
  maxUploadMB: 20, seq: 0, drag: null, inputSize: null, embeddingUrl: null,
};
// the in-browser decoder: the ONNX session (loaded once) and the current image's embedding
const browser = { session: null, loading: null, embedding: null, embeddingFor: null, threshold: 0.0 };
const SVG = "http://www.w3.org/2000/svg";

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function ms(value) {
  return `${value.toFixed(1)} ms`;
}

async function call(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (err) {
    throw new Error(`cannot reach the server (${err.message})`);
  }
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    body = null;
  }
  if (!response.ok) {
    const message = body && body.error ? body.error : `${response.status} ${response.statusText}`;
    throw new Error(message);
  }
  return body;
}

async function loadInfo() {
  try {
    const info = await call("/api/info");
    const m = info.model;
    const parts = [`model ${m.model}`, `${m.encoder || "encoder"}`, `${m.img_size} px input`];
    if (m.keep_ratio !== undefined && m.keep_ratio !== null) parts.push(`keep ratio ${m.keep_ratio}`);
    parts.push(m.checkpoint ? `checkpoint ${m.checkpoint}` : "no checkpoint");
    $("model").textContent = parts.join(" · ");
    if (info.random) {
      const warning = $("warning");
      warning.textContent = "Randomly initialised model: the masks are meaningless. " + (info.warning || "");
      warning.hidden = false;
    }
    state.maxUploadMB = info.max_upload_mb;
    browser.threshold = info.mask_threshold || 0.0;
    $("browser-decoder").disabled = !info.browser_decoder;
    if (!info.browser_decoder) {
      $("browser-decoder").parentElement.title = "onnxruntime-web is not installed on the server: blvit-demo --install-web-runtime";
    }
    for (const name of info.samples) {
      const option = document.createElement("option");
      option.value = option.textContent = name;
      $("sample").appendChild(option);
    }
  } catch (err) {
    showError(`could not read the model information: ${err.message}`);
  }
}

function setBusy(busy) {
  $("stage").dataset.state = busy ? "busy" : (state.imageId ? "ready" : "empty");
}

async function setImage(form, label) {
  showError("");
  setBusy(true);
  $("encoder-ms").textContent = `encoding ${label}…`;
  try {
    const result = await call("/api/image", { method: "POST", body: form });
    state.imageId = result.image_id;
    state.width = result.width;
    state.height = result.height;
    state.inputSize = result.input_size;
    state.embeddingUrl = result.embedding_url;
    clearPrompts();
    const image = $("image");
    await new Promise((resolve, reject) => {
      image.onload = resolve;
      image.onerror = () => reject(new Error("the browser could not show the image"));
      image.src = result.url;
    });
    $("prompts").setAttribute("viewBox", `0 0 ${state.width} ${state.height}`);
    $("image-size").textContent = `${state.width} × ${state.height}`;
    $("encoder-ms").textContent = result.cached
      ? `0 ms (cached; took ${ms(result.first_encoder_ms)} once)`
      : `${ms(result.encoder_ms)} (once per image)`;
    $("decoder-ms").textContent = "–";
  } catch (err) {
    showError(`image not accepted: ${err.message}`);
    $("encoder-ms").textContent = "–";
  } finally {
    setBusy(false);
  }
}

function uploadFile(file) {
  if (!file) return;
  if (file.size > state.maxUploadMB * 1024 * 1024) {
    showError(`${file.name}: ${(file.size / 1048576).toFixed(1)} MB is over the upload limit of ${state.maxUploadMB} MB`);
    return;
  }
  const form = new FormData();
  form.append("image", file, file.name);
  setImage(form, file.name);
}

function useSample() {
  const form = new FormData();
  form.append("sample", $("sample").value || "shapes");
  setImage(form, $("sample").value);
}

function clearPrompts() {
  state.points = [];
  state.labels = [];
  state.box = null;
  state.seq += 1; // drop answers still on the way
  $("mask").hidden = true;
  $("mask").removeAttribute("src");
  $("score").textContent = "–";
  drawPrompts();
}

function drawPrompts(dragBox) {
  const svg = $("prompts");
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const scale = Math.max(state.width, state.height) / 100;
  const box = dragBox || state.box;
  if (box) {
    const rect = document.createElementNS(SVG, "rect");
    rect.setAttribute("x", box[0]);
    rect.setAttribute("y", box[1]);
    rect.setAttribute("width", box[2] - box[0]);
    rect.setAttribute("height", box[3] - box[1]);
    rect.setAttribute("fill", "none");
    rect.setAttribute("stroke", "yellow");
    rect.setAttribute("stroke-width", 0.4 * scale);
    svg.appendChild(rect);
  }
  state.points.forEach(([x, y], i) => {
    const circle = document.createElementNS(SVG, "circle");
    circle.setAttribute("cx", x);
    circle.setAttribute("cy", y);
    circle.setAttribute("r", 1.0 * scale);
    circle.setAttribute("fill", state.labels[i] ? "lime" : "red");
    circle.setAttribute("stroke", "white");
    circle.setAttribute("stroke-width", 0.3 * scale);
    circle.setAttribute("class", state.labels[i] ? "point positive" : "point negative");
    svg.appendChild(circle);
  });
  $("prompt-count").textContent = String(state.points.length + (state.box ? 1 : 0));
}

function imageXY(event) {
  const rect = $("image").getBoundingClientRect();
  return [
    (event.clientX - rect.left) * (state.width / rect.width),
    (event.clientY - rect.top) * (state.height / rect.height),
  ];
}

function loadScript(src) {
  return new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = src;
    script.onload = resolve;
    script.onerror = () => reject(new Error(`could not load ${src}`));
    document.head.appendChild(script);
  });
}

async function fetchBytes(url, what) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${what}: ${response.status} ${response.statusText}`);
  return response;
}

// Load onnxruntime-web and the decoder once, and the current image's embedding once per image.
async function browserDecoderReady() {
  if (!browser.loading) {
    browser.loading = (async () => {
      await loadScript("/vendor/onnxruntime-web/ort.wasm.min.js");
      ort.env.wasm.wasmPaths = "/vendor/onnxruntime-web/";
      ort.env.wasm.numThreads = 1; // threads need cross-origin isolation headers
      const model = await fetchBytes("/api/decoder.onnx", "the decoder");
      browser.session = await ort.InferenceSession.create(new Uint8Array(await model.arrayBuffer()),
                                                          { executionProviders: ["wasm"] });
    })();
    browser.loading.catch(() => { browser.loading = null; });
  }
  await browser.loading;
  if (state.imageId && browser.embeddingFor !== state.imageId) {
    const imageId = state.imageId;
    const response = await fetchBytes(state.embeddingUrl, "the image embedding");
    const shape = response.headers.get("X-Embedding-Shape").split(",").map(Number);
    const data = new Float32Array(await response.arrayBuffer());
    browser.embedding = new ort.Tensor("float32", data, shape);
    browser.embeddingFor = imageId;
  }
}

// SAM's ONNX decoder inputs, as segment-anything's web demo and blvit_deploy build them: prompts
// in the resized frame, a box as two corner points (labels 2, 3), else one padding point (-1).
async function decodeInBrowser(multimask) {
  await browserDecoderReady();
  const [inputH, inputW] = state.inputSize;
  const sx = inputW / state.width, sy = inputH / state.height;
  const coords = [], labels = [];
  state.points.forEach(([x, y], i) => { coords.push(x * sx, y * sy); labels.push(state.labels[i]); });
  if (state.box) {
    const [x0, y0, x1, y1] = state.box;
    coords.push(x0 * sx, y0 * sy, x1 * sx, y1 * sy);
    labels.push(2, 3);
  } else {
    coords.push(0, 0);
    labels.push(-1);
  }
  const n = labels.length;
  const [, , gh, gw] = browser.embedding.dims;
  const feeds = {
    image_embeddings: browser.embedding,
    point_coords: new ort.Tensor("float32", Float32Array.from(coords), [1, n, 2]),
    point_labels: new ort.Tensor("float32", Float32Array.from(labels), [1, n]),
    mask_input: new ort.Tensor("float32", new Float32Array(16 * gh * gw), [1, 1, 4 * gh, 4 * gw]),
    has_mask_input: new ort.Tensor("float32", new Float32Array([0]), [1]),
    orig_im_size: new ort.Tensor("float32", new Float32Array([state.height, state.width]), [2]),
  };
  const start = performance.now();
  const out = await browser.session.run(feeds);
  const elapsed = performance.now() - start;
  const scores = out.iou_predictions.data; // the single-mask output, then SAM's three
  // the server's rule (blvit_apps.demo.core.predict): the best of the three for a lone point or
  // with "best of three", else the single-mask output
  let pick = 0;
  if (multimask || (!state.box && state.points.length === 1)) {
    pick = 1;
    for (let k = 2; k < 4; k++) if (scores[k] > scores[pick]) pick = k;
  }
  const [, , h, w] = out.masks.dims;
  const logits = out.masks.data.subarray(pick * h * w, (pick + 1) * h * w);
  const canvas = document.createElement("canvas");
  canvas.width = w;
  canvas.height = h;
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(w, h);
  let area = 0;
  for (let i = 0; i < w * h; i++) {
    if (logits[i] > browser.threshold) {
      pixels.data.set([30, 144, 255, 128], 4 * i); // the server's mask colour (core.mask_png)
      area += 1;
    }
  }
  context.putImageData(pixels, 0, 0);
  return { mask: canvas.toDataURL("image/png"), score: scores[pick], area, decoder_ms: elapsed, where: "browser" };
}

async function decodeOnServer(multimask) {
  const result = await call("/api/predict", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        image_id: state.imageId, points: state.points, labels: state.labels, box: state.box,
        multimask,
      }),
    });
  $("encoder-ms").textContent = `0 ms (cached; took ${ms(result.cached_encoder_ms)} once)`;
  return Object.assign(result, { where: "server" });
}

async function runPrompt() {
  if (!state.imageId || (!state.points.length && !state.box)) return;
  const seq = ++state.seq;
  showError("");
  setBusy(true);
  try {
    const multimask = $("multimask").checked;
    const result = $("browser-decoder").checked ? await decodeInBrowser(multimask) : await decodeOnServer(multimask);
    if (seq !== state.seq) return; // a newer prompt was sent meanwhile
    const mask = $("mask");
    mask.src = result.mask;
    mask.hidden = false;
    $("decoder-ms").textContent = ms(result.decoder_ms);
    $("decoder-where").textContent = result.where === "browser" ? "(in this browser)" : "(on the server)";
    $("stage").dataset.decodedIn = result.where;
    $("score").textContent = result.score.toFixed(3);
    $("stage").dataset.maskArea = String(result.area);
  } catch (err) {
    if (seq === state.seq) showError(`prompt not accepted: ${err.message}`);
  } finally {
    if (seq === state.seq) setBusy(false);
  }
}

function onPointerDown(event) {
  if (!state.imageId) return;
  event.preventDefault();
  const [x, y] = imageXY(event);
  state.drag = { x, y, clientX: event.clientX, clientY: event.clientY, button: event.button, shift: event.shiftKey };
}

function dragBox(event) {
  const [x, y] = imageXY(event);
  const d = state.drag;
  const clampX = (v) => Math.min(Math.max(v, 0), state.width);
  const clampY = (v) => Math.min(Math.max(v, 0), state.height);
  return [clampX(Math.min(d.x, x)), clampY(Math.min(d.y, y)), clampX(Math.max(d.x, x)), clampY(Math.max(d.y, y))];
}

function isDrag(event) {
  const d = state.drag;
  return d && Math.hypot(event.clientX - d.clientX, event.clientY - d.clientY) > 5;
}

function onPointerMove(event) {
  if (state.drag && isDrag(event)) drawPrompts(dragBox(event));
}

function onPointerUp(event) {
  const d = state.drag;
  if (!d) return;
  if (isDrag(event)) {
    state.box = dragBox(event);
  } else {
    state.points.push([d.x, d.y]);
    state.labels.push(d.button === 2 || d.shift ? 0 : 1);
  }
  state.drag = null;
  drawPrompts();
  runPrompt();
}

function init() {
  const stage = $("stage");
  stage.addEventListener("mousedown", onPointerDown);
  window.addEventListener("mousemove", onPointerMove);
  window.addEventListener("mouseup", onPointerUp);
  stage.addEventListener("contextmenu", (event) => event.preventDefault());
  $("file").addEventListener("change", (event) => uploadFile(event.target.files[0]));
  $("use-sample").addEventListener("click", useSample);
  $("clear").addEventListener("click", clearPrompts);
  $("multimask").addEventListener("change", runPrompt);
  $("browser-decoder").addEventListener("change", async (event) => {
    $("stage").dataset.browserDecoder = "off";
    if (!event.target.checked) return;
    $("stage").dataset.browserDecoder = "loading";
    try {
      await browserDecoderReady();
      $("stage").dataset.browserDecoder = "ready";
      runPrompt();
    } catch (err) {
      event.target.checked = false;
      $("stage").dataset.browserDecoder = "off";
      showError(`the in-browser decoder could not start: ${err.message}`);
    }
  });
  loadInfo().then(useSample);
}

init();
