// dmr web page: plain JavaScript against the server's own public routes.
"use strict";

const $ = (sel) => document.querySelector(sel);
const KEY_STORAGE = "dmr.apiKey";

// ------------------------------------------------------------------ helpers

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = localStorage.getItem(KEY_STORAGE);
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const response = await fetch(path, opts);
  if (!response.ok) throw new Error(await errorText(response));
  return response;
}

async function errorText(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body.error) return body.error.message || JSON.stringify(body.error);
  } catch (_) { /* not JSON: show it as it is */ }
  if (response.status === 401) return "401 Unauthorized: paste the server's API key above";
  return `${response.status} ${text || response.statusText}`;
}

function showError(error) {
  const box = $("#error");
  box.textContent = String(error && error.message ? error.message : error);
  box.hidden = false;
}

function clearError() { $("#error").hidden = true; }

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text == null || text === "" ? "—" : String(text);
  if (cls) td.className = cls;
  return td;
}

function emptyRow(tbody, columns, text) {
  const tr = document.createElement("tr");
  const td = cell(text, "empty");
  td.colSpan = columns;
  tr.appendChild(td);
  tbody.replaceChildren(tr);
}

function formatBytes(n) {
  if (typeof n !== "number" || !isFinite(n)) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

// Reads a response body as lines while it arrives (NDJSON progress, SSE).
async function* lines(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let nl;
    while ((nl = buffer.indexOf("\n")) >= 0) {
      yield buffer.slice(0, nl).replace(/\r$/, "");
      buffer = buffer.slice(nl + 1);
    }
  }
  buffer += decoder.decode();
  if (buffer) yield buffer;
}

// ------------------------------------------------------------------ models

let models = [];

function modelName(model) { return model.tags && model.tags.length ? model.tags[0] : model.id; }
// Formats the diffusers engine serves (a DDUF archive or a diffusers directory).
function isImageModel(model) { return ["diffusers", "dduf"].includes((model.config || {}).format); }

async function loadModels() {
  const response = await api("/models");
  models = await response.json();
  const tbody = $("#models tbody");
  if (!models.length) {
    emptyRow(tbody, 7, "No models yet: pull one above.");
  } else {
    tbody.replaceChildren(...models.map((model) => {
      const config = model.config || {};
      const tr = document.createElement("tr");
      tr.dataset.model = modelName(model);
      tr.append(
        cell((model.tags && model.tags.length ? model.tags : ["<untagged>"]).join(", ")),
        cell((model.id || "").replace("sha256:", "").slice(0, 12)),
        cell(config.format),
        cell(config.quantization),
        cell(config.parameters),
        cell(config.size),
      );
      const actions = document.createElement("td");
      const del = document.createElement("button");
      del.className = "danger";
      del.textContent = "Delete";
      del.addEventListener("click", () => deleteModel(model));
      actions.appendChild(del);
      tr.appendChild(actions);
      return tr;
    }));
  }
  fillModelPickers();
}

function fillModelPickers() {
  const text = models.filter((m) => !isImageModel(m));
  const images = models.filter(isImageModel);
  $("#text-models").replaceChildren(...text.map((m) => new Option(modelName(m))));
  const chatModel = $("#chat-model");
  if (!chatModel.value && text.length) chatModel.value = modelName(text[0]);
  const picker = $("#image-model");
  const previous = picker.value;
  picker.replaceChildren(...images.map((m) => new Option(modelName(m))));
  if (previous) picker.value = previous;
  // Without an image model the form has nothing to offer: show the note alone.
  $("#image-form").hidden = !images.length;
  $("#image-note").textContent = images.length
    ? "" : "No image models (format diffusers) in the store.";
}

async function deleteModel(model) {
  const names = model.tags && model.tags.length ? model.tags.join(", ") : model.id;
  if (!confirm(`Delete ${names}?`)) return;
  try {
    clearError();
    // force: one click removes every tag of this model, as the row shows them all.
    await api(`/models/${encodeURIComponent(model.id)}?force=true`, { method: "DELETE" });
  } catch (error) { showError(error); }
  await refresh();
}

// Pulls `reference`, showing the NDJSON progress lines; throws on an error line.
async function pull(reference) {
  const box = $("#pull-progress"), bar = $("#pull-bar"), message = $("#pull-message");
  box.hidden = false;
  layerProgress.clear();
  bar.removeAttribute("value");
  message.textContent = `Pulling ${reference}…`;
  try {
    const response = await api("/models/create", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Accept": "application/json" },
      body: JSON.stringify({ from: reference }),
    });
    for await (const line of lines(response)) {
      if (!line.trim()) continue;
      const event = JSON.parse(line);
      if (event.type === "error") throw new Error(event.message);
      const layer = event.layer || {};
      if (event.total) {
        bar.max = event.total;
        bar.value = Math.min(layer.current != null ? progressSoFar(event) : 0, event.total);
      }
      message.textContent = event.message || "";
      if (event.type === "success") { bar.max = 1; bar.value = 1; }
    }
  } finally {
    await loadModels().catch(showError);
  }
}

// Bytes done over every layer: DMR's lines carry one layer's progress at a time.
const layerProgress = new Map();
function progressSoFar(event) {
  layerProgress.set(event.layer.id, event.layer.current || 0);
  let sum = 0;
  for (const v of layerProgress.values()) sum += v;
  return sum;
}

// ------------------------------------------------------------------ runners

async function loadRunners() {
  const response = await api("/engines/ps");
  const runners = await response.json();
  const tbody = $("#runners tbody");
  if (!runners.length) {
    emptyRow(tbody, 7, "No runner loaded: a chat message loads its model.");
    return;
  }
  tbody.replaceChildren(...runners.map((r) => {
    const tr = document.createElement("tr");
    const state = r.loading ? "loading" : r.in_use ? "busy" : "idle";
    const last = r.last_used ? new Date(r.last_used).toLocaleTimeString() : "";
    tr.append(cell(r.model_name), cell(r.backend_name), cell(r.mode), cell(formatBytes(r.memory)),
      cell(r.keep_alive), cell(state), cell(last));
    return tr;
  }));
}

// ------------------------------------------------------------------ batches

async function loadBatches() {
  const response = await api("/v1/batches?limit=20");
  if (response.status === 404) return;  // a server without the Batch API
  const batches = (await response.json()).data;
  const tbody = $("#batches tbody");
  if (!batches.length) {
    emptyRow(tbody, 6, "No batch yet: dmr batch create FILE, or the OpenAI SDK's batches.create.");
    return;
  }
  tbody.replaceChildren(...batches.map((b) => {
    const tr = document.createElement("tr");
    const counts = b.request_counts || { total: 0, completed: 0, failed: 0 };
    const done = counts.completed + counts.failed;
    const bar = document.createElement("progress");
    bar.max = counts.total || 1;
    bar.value = done;
    const progress = cell(` ${done}/${counts.total}`);
    progress.prepend(bar);
    const created = new Date(b.created_at * 1000).toLocaleTimeString();
    tr.append(cell(b.id), cell(b.status), cell(b.endpoint), progress, cell(String(counts.failed)),
      cell(created));
    return tr;
  }));
}

// ------------------------------------------------------------------ chat

let history = [];       // the conversation sent with each request (OpenAI messages)
let controller = null;  // aborts the answer being streamed

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : role === "assistant" ? $("#chat-model").value : "Error";
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.append(who, body);
  $("#chat-log").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return body;
}

// An image file as a data: URL, for an OpenAI `image_url` part.
function dataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

async function sendChat(text, image) {
  const model = $("#chat-model").value.trim();
  if (!model) throw new Error("Choose a model first");
  if (!models.some((m) => (m.tags || []).includes(model) || (m.tags || []).includes(`${model}:latest`)
      || (m.tags || []).includes(`ai/${model}`) || (m.tags || []).includes(`ai/${model}:latest`))) {
    await pull(model);  // a pullable model: the inference routes never pull implicitly
  }
  // With an image the message is OpenAI content parts; the image goes with this turn
  // and stays in the history, as a vision model needs it for follow-up questions.
  const userContent = image
    ? [{ type: "text", text }, { type: "image_url", image_url: { url: await dataUrl(image) } }]
    : text;
  history.push({ role: "user", content: userContent });
  addMessage("user", image ? `${text}\n[image: ${image.name}]` : text);
  const answer = addMessage("assistant", "");
  answer.parentElement.classList.add("streaming");
  answer.dataset.chunks = "0";
  controller = new AbortController();
  let content = "";
  try {
    const response = await api("/engines/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Accept": "text/event-stream" },
      body: JSON.stringify(chatBody(model)),
      signal: controller.signal,
    });
    for await (const line of lines(response)) {
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
      const delta = ((chunk.choices || [])[0] || {}).delta || {};
      if (delta.content) {
        content += delta.content;
        answer.textContent = content;
        answer.dataset.chunks = String(Number(answer.dataset.chunks) + 1);
        answer.scrollIntoView({ block: "end" });
      }
    }
  } catch (error) {
    if (error.name !== "AbortError") {
      answer.parentElement.classList.add("error");
      answer.textContent = content + (content ? "\n" : "") + String(error.message || error);
    }
  } finally {
    controller = null;
    answer.parentElement.classList.remove("streaming");
    answer.parentElement.classList.add("done");
  }
  // Keep what was answered (even a stopped answer) so the next turn has the context.
  if (content) history.push({ role: "assistant", content });
  else history.pop();
}

function chatBody(model) {
  const body = { model, messages: history, stream: true };
  const maxTokens = parseInt($("#chat-max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  return body;
}

// ------------------------------------------------------------------ images

async function generateImage(model, prompt, size, steps) {
  const request = { model, prompt, size, n: 1, response_format: "b64_json" };
  if (steps > 0) request.steps = steps;  // blank: the model's own default
  const response = await api("/engines/v1/images/generations", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(request),
  });
  const body = await response.json();
  for (const item of body.data || []) {
    const img = document.createElement("img");
    img.alt = prompt;
    img.title = prompt;
    img.src = item.b64_json ? `data:image/png;base64,${item.b64_json}` : item.url;
    $("#images").prepend(img);
  }
}

// ------------------------------------------------------------------ wiring

async function refresh() {
  try {
    await Promise.all([loadModels(), loadRunners(), loadBatches(), loadVersion()]);
  } catch (error) { showError(error); }
}

async function loadVersion() {
  const response = await api("/version");
  $("#version").textContent = `v${(await response.json()).version}`;
}

function busy(button, on) { button.disabled = on; }

function wire() {
  $("#api-key").value = localStorage.getItem(KEY_STORAGE) || "";
  $("#key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("#api-key").value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key); else localStorage.removeItem(KEY_STORAGE);
    clearError();
    refresh();
  });

  $("#pull-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const button = e.submitter || $("#pull-form button");
    busy(button, true);
    clearError();
    try { await pull($("#pull-ref").value.trim()); } catch (error) { showError(error); }
    busy(button, false);
  });

  const input = $("#chat-input");
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("#chat-form").requestSubmit(); }
  });
  $("#chat-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = input.value.trim();
    if (!text || controller) return;
    input.value = "";
    const picker = $("#chat-image");
    const image = picker.files && picker.files[0];
    picker.value = "";
    busy($("#chat-send"), true);
    $("#chat-stop").hidden = false;
    clearError();
    try { await sendChat(text, image); } catch (error) { showError(error); }
    busy($("#chat-send"), false);
    $("#chat-stop").hidden = true;
    loadRunners().catch(showError);
  });
  $("#chat-stop").addEventListener("click", () => controller && controller.abort());
  $("#chat-new").addEventListener("click", () => {
    if (controller) controller.abort();
    history = [];
    $("#chat-log").replaceChildren();
  });

  $("#image-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    busy($("#image-generate"), true);
    clearError();
    try {
      await generateImage($("#image-model").value, $("#image-prompt").value,
        $("#image-size").value, parseInt($("#image-steps").value, 10));
    } catch (error) { showError(error); }
    busy($("#image-generate"), false);
  });

  refresh();
  // Runners come and go (keep-alive expiry, other clients): keep the table current.
  setInterval(() => loadRunners().catch(() => {}), 3000);
  setInterval(() => loadBatches().catch(() => {}), 3000);
}

wire();
