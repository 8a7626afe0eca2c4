// kbmesh web page: vanilla JS on the public REST contract (docs/gateway.md).
//
// Live progress: each upload's task is followed on GET /api/v1/tasks/{id}:sse.
// Without an API key the browser's EventSource does it. EventSource cannot
// send request headers, so with an API key set the same SSE route is read
// with fetch() and a streaming body reader instead (parsing the `data:`
// lines ourselves), which can send `Authorization: Bearer <key>`. Either way
// a dropped stream falls back to polling GET /api/v1/tasks/{id}.
"use strict";

const API = "/api/v1";
const KEY_STORAGE = "kbmesh.apiKey";
const KB_STORAGE = "kbmesh.knowledgeBase";
const TERMINAL = new Set(["SUCCEEDED", "FAILED", "CANCELLED"]);

const $ = (id) => document.getElementById(id);
const state = { kbs: [], kb: null, docs: [], refreshTimer: null, pollTimer: null };

// ---------------------------------------------------------------- helpers

function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

function authHeaders(extra) {
  const headers = Object.assign({}, extra || {});
  const key = apiKey();
  if (key) headers["Authorization"] = "Bearer " + key;
  return headers;
}

/** Suffix of a proto enum name: STATE_SUCCEEDED -> SUCCEEDED. */
function enumName(value, prefix) {
  if (value === undefined || value === null) return "";
  const s = String(value);
  return s.startsWith(prefix) ? s.slice(prefix.length) : s;
}

function humanBytes(n) {
  n = Number(n) || 0;
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(n < 10 ? 1 : 0)) + " " + units[i];
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// Plain words for the reasons people meet most (docs/errors.md has them all).
const REASONS = {
  KNOWLEDGE_BASE_EXISTS: "A knowledge base with this name already exists.",
  KNOWLEDGE_BASE_NOT_FOUND: "This knowledge base no longer exists.",
  DOCUMENT_NOT_FOUND: "This document no longer exists.",
  TASK_NOT_FOUND: "This task no longer exists.",
  UPLOAD_TOO_LARGE: "The file is larger than the server accepts.",
  EMPTY_FILE: "The file is empty.",
  INVALID_FILENAME: "The file name is not accepted (no paths or control characters, at most 255 characters).",
  RATE_LIMITED: "Too many uploads at once: wait a moment and try again.",
  TOO_MANY_UPLOADS: "The server is busy with other uploads: try again shortly.",
  QUEUE_FULL: "The processing queue is full: try again later.",
  DOCUMENT_ENCRYPTED: "The document is password-protected and cannot be read.",
  UNSUPPORTED_FORMAT: "This file format is not supported.",
  NOT_IMPLEMENTED: "This server does not support that yet.",
  UPSTREAM_UNAVAILABLE: "The service is unavailable right now. Try again in a moment.",
  MULTIPART_TRUNCATED: "The upload was cut off before the end. Try again.",
};

const STATUS_WORDS = {
  0: "Cannot reach the server. Check your connection.",
  400: "The request was not accepted.",
  401: "The API key is missing or wrong. Set it under “API key”.",
  403: "This API key is not allowed to do that.",
  404: "Not found.",
  409: "That conflicts with the current state.",
  413: "The file is too large.",
  429: "Too many requests: wait a moment and try again.",
  500: "The server hit an internal error.",
  501: "The server does not support this yet.",
  503: "The service is unavailable right now. Try again in a moment.",
  504: "The server took too long to answer.",
};

class ApiError extends Error {
  constructor(status, body) {
    const info = ((body && body.details) || []).find((d) => String(d["@type"] || "").endsWith("ErrorInfo"));
    const reason = info ? info.reason : "";
    const words = REASONS[reason] || (body && body.message) || STATUS_WORDS[status] || "Something went wrong.";
    super(words);
    this.status = status;
    this.reason = reason;
  }
}

async function parseError(status, text) {
  let body = null;
  try { body = JSON.parse(text); } catch (_) { body = { message: text.trim().slice(0, 200) }; }
  return new ApiError(status, body);
}

async function api(method, path, body) {
  const init = { method, headers: authHeaders() };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(API + path, init);
  } catch (_) {
    throw new ApiError(0, null);
  }
  const text = await response.text();
  if (!response.ok) throw await parseError(response.status, text);
  return text ? JSON.parse(text) : {};
}

function notify(message) {
  $("notice-text").textContent = message;
  $("notice").hidden = false;
}

function errorWords(err) {
  return err instanceof ApiError ? err.message : String(err && err.message ? err.message : err);
}

// ---------------------------------------------------------------- API key

function showKeyState() {
  $("apikey-summary").textContent = apiKey() ? "API key ✓" : "API key";
  $("apikey").value = apiKey();
}

$("apikey-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const value = $("apikey").value.trim();
  if (value) localStorage.setItem(KEY_STORAGE, value);
  else localStorage.removeItem(KEY_STORAGE);
  showKeyState();
  $("apikey-form").closest("details").open = false;
  loadKnowledgeBases();
});

$("notice-close").addEventListener("click", () => { $("notice").hidden = true; });

// ---------------------------------------------------------------- knowledge bases

async function loadKnowledgeBases() {
  try {
    const answer = await api("GET", "/knowledge-bases?page_size=200");
    state.kbs = answer.knowledge_bases || [];
  } catch (err) {
    notify("Could not load knowledge bases: " + errorWords(err));
    state.kbs = [];
  }
  renderKnowledgeBases();
  const remembered = localStorage.getItem(KB_STORAGE);
  const kb = state.kbs.find((k) => k.id === (state.kb ? state.kb.id : remembered));
  if (kb) selectKnowledgeBase(kb);
  else showEmpty();
}

function renderKnowledgeBases() {
  const list = $("kb-list");
  list.replaceChildren();
  for (const kb of state.kbs) {
    const item = el(
      "li",
      { class: "kb-item" + (state.kb && state.kb.id === kb.id ? " active" : ""), dataset: { id: kb.id } },
      el("button", { type: "button", onclick: () => selectKnowledgeBase(kb) },
        el("span", { class: "kb-name" }, kb.name),
        el("span", { class: "muted small" }, `${Number(kb.document_count || 0)} docs`)),
    );
    list.append(item);
  }
  if (!state.kbs.length) list.append(el("li", { class: "muted small" }, "None yet."));
}

function showEmpty() {
  state.kb = null;
  $("empty").hidden = false;
  $("kb-view").hidden = true;
}

function selectKnowledgeBase(kb) {
  state.kb = kb;
  localStorage.setItem(KB_STORAGE, kb.id);
  $("empty").hidden = true;
  $("kb-view").hidden = false;
  $("kb-title").textContent = kb.name;
  $("kb-stats").textContent = kb.description || "";
  $("results").replaceChildren();
  renderKnowledgeBases();
  loadDocuments();
}

$("kb-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const name = $("kb-name").value.trim();
  if (!name) return;
  $("kb-create").disabled = true;
  try {
    const kb = await api("POST", "/knowledge-bases", { name });
    $("kb-name").value = "";
    state.kbs.unshift(kb);
    selectKnowledgeBase(kb);
  } catch (err) {
    notify("Could not create the knowledge base: " + errorWords(err));
  } finally {
    $("kb-create").disabled = false;
  }
});

// ---------------------------------------------------------------- documents

async function loadDocuments() {
  if (!state.kb) return;
  const kbId = state.kb.id;
  try {
    const answer = await api("GET", `/knowledge-bases/${encodeURIComponent(kbId)}/documents?page_size=200`);
    if (!state.kb || state.kb.id !== kbId) return;
    state.docs = answer.documents || [];
  } catch (err) {
    notify("Could not load documents: " + errorWords(err));
    return;
  }
  renderDocuments();
  if (Number(state.kb.document_count || 0) !== state.docs.length) {
    state.kb.document_count = state.docs.length;
    renderKnowledgeBases();
  }
  // Keep the list fresh while something is still being processed.
  clearTimeout(state.pollTimer);
  if (state.docs.some((d) => !TERMINAL.has(enumName(d.state, "STATE_")))) {
    state.pollTimer = setTimeout(loadDocuments, 3000);
  }
}

function refreshSoon() {
  clearTimeout(state.refreshTimer);
  state.refreshTimer = setTimeout(loadDocuments, 300);
}

function docStateText(doc) {
  const s = enumName(doc.state, "STATE_");
  if (s === "RUNNING") {
    const stage = enumName(doc.stage, "STAGE_").toLowerCase();
    return `${stage || "running"} ${Math.round(Number(doc.progress || 0) * 100)}%`;
  }
  if (s === "FAILED" && doc.error && doc.error.message) return "failed: " + doc.error.message;
  return s.toLowerCase();
}

function renderDocuments() {
  const body = $("docs");
  body.replaceChildren();
  $("docs-empty").hidden = state.docs.length > 0;
  for (const doc of state.docs) {
    const s = enumName(doc.state, "STATE_");
    body.append(el(
      "tr",
      { class: "doc", dataset: { id: doc.id, filename: doc.filename, state: s } },
      el("td", { class: "doc-name" }, doc.filename, el("div", { class: "muted small" }, doc.content_type || "")),
      el("td", {}, humanBytes(doc.size_bytes)),
      el("td", {}, el("span", { class: "badge " + s.toLowerCase() }, docStateText(doc))),
      el("td", {}, String(doc.chunk_count || 0)),
      el("td", { class: "actions" },
        el("button", { type: "button", class: "link", title: "Process the stored file again", onclick: () => reindex(doc) }, "re-index"),
        el("button", { type: "button", class: "link danger", onclick: () => removeDocument(doc) }, "delete")),
    ));
  }
}

async function removeDocument(doc) {
  if (!confirm(`Delete “${doc.filename}” and its chunks?`)) return;
  try {
    await api("DELETE", `/knowledge-bases/${encodeURIComponent(doc.knowledge_base_id)}/documents/${encodeURIComponent(doc.id)}`);
  } catch (err) {
    notify(`Could not delete “${doc.filename}”: ` + errorWords(err));
  }
  loadDocuments();
}

async function reindex(doc) {
  try {
    const answer = await api(
      "POST",
      `/knowledge-bases/${encodeURIComponent(doc.knowledge_base_id)}/documents/${encodeURIComponent(doc.id)}:reindex`,
      {},
    );
    const row = addUploadRow({ name: doc.filename, size: Number(doc.size_bytes || 0) });
    row.setPhase("queued", "re-index queued", 0);
    if (answer.task_id) followTask(answer.task_id, row);
  } catch (err) {
    notify(`Could not re-index “${doc.filename}”: ` + errorWords(err));
  }
  loadDocuments();
}

$("docs-refresh").addEventListener("click", loadDocuments);

// ---------------------------------------------------------------- uploads

function addUploadRow(file) {
  const bar = el("div", { class: "bar-fill" });
  const status = el("span", { class: "upload-status muted small" }, "waiting");
  const row = el(
    "li",
    { class: "upload", dataset: { filename: file.name, state: "WAITING" } },
    el("div", { class: "upload-head" }, el("span", { class: "upload-name" }, file.name),
      el("span", { class: "muted small" }, humanBytes(file.size))),
    el("div", { class: "bar" }, bar),
    status,
  );
  $("uploads").prepend(row);
  return {
    node: row,
    setPhase(phase, text, fraction) {
      row.dataset.state = phase.toUpperCase();
      row.className = "upload " + phase.toLowerCase();
      status.textContent = text;
      if (fraction !== null && fraction !== undefined) bar.style.width = Math.round(fraction * 100) + "%";
    },
  };
}

// At most this many uploads send bytes at once; the others wait their turn.
const PARALLEL_UPLOADS = 3;
const uploadQueue = [];
let uploadsActive = 0;

function pumpUploads() {
  while (uploadsActive < PARALLEL_UPLOADS && uploadQueue.length) {
    const next = uploadQueue.shift();
    uploadsActive++;
    uploadFile(next.kbId, next.file, next.row, () => { uploadsActive--; pumpUploads(); });
  }
}

function uploadFile(kbId, file, row, finished) {
  // The declared size is checked against the bytes received, and lets the
  // Task Manager stream a file of up to one part into S3 while it arrives.
  const url = `${API}/knowledge-bases/${encodeURIComponent(kbId)}/documents:upload` +
    `?filename=${encodeURIComponent(file.name)}&declared_size_bytes=${file.size}`;
  const xhr = new XMLHttpRequest();
  xhr.open("POST", url);
  for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v);
  // The raw body is the file; its type becomes the document's content type.
  xhr.setRequestHeader("Content-Type", file.type || "application/octet-stream");
  xhr.upload.onprogress = (ev) => {
    const total = ev.lengthComputable ? ev.total : file.size;
    row.setPhase("uploading", `uploading ${humanBytes(ev.loaded)} of ${humanBytes(total)}`, total ? ev.loaded / total : 0);
  };
  xhr.upload.onload = () => row.setPhase("stored", "storing…", 1);
  xhr.onloadend = finished;
  xhr.onerror = () => row.setPhase("failed", "upload failed: " + STATUS_WORDS[0], null);
  xhr.onload = async () => {
    if (xhr.status < 200 || xhr.status >= 300) {
      const err = await parseError(xhr.status, xhr.responseText || "");
      row.setPhase("failed", "upload failed: " + err.message, null);
      return;
    }
    const answer = JSON.parse(xhr.responseText);
    if (answer.duplicate) {
      row.setPhase("succeeded", "already in this knowledge base", 1);
      refreshSoon();
      return;
    }
    row.setPhase("queued", "uploaded, waiting for a worker", 0);
    refreshSoon();
    followTask(answer.task_id, row);
  };
  row.setPhase("uploading", "starting upload", 0);
  xhr.send(file);
}

function showTask(task, row) {
  const s = enumName(task.state, "STATE_");
  const progress = Number(task.progress || 0);
  if (s === "PENDING") row.setPhase("queued", "waiting for a worker", 0);
  else if (s === "RUNNING") {
    const stage = enumName(task.stage, "STAGE_").toLowerCase() || "starting";
    const extra = task.message ? ` — ${task.message}` : "";
    row.setPhase("running", `${stage} ${Math.round(progress * 100)}%${extra}`, progress);
  } else if (s === "SUCCEEDED") {
    const chunks = task.result ? Number(task.result.chunk_count || 0) : 0;
    row.setPhase("succeeded", `ready: ${chunks} chunk${chunks === 1 ? "" : "s"} searchable`, 1);
  } else if (s === "FAILED") {
    const why = task.error && task.error.message ? task.error.message : "processing failed";
    row.setPhase("failed", "failed: " + why, null);
  } else if (s === "CANCELLED") row.setPhase("cancelled", "cancelled", null);
  return TERMINAL.has(s);
}

/** Follows a task live (SSE) and updates its row; polls if the stream drops. */
function followTask(taskId, row) {
  let done = false;
  const onEvent = (event) => {
    if (enumName(event.type, "TYPE_") === "ERROR") return false; // resumed by polling
    if (event.task && showTask(event.task, row)) done = true;
    refreshSoon();
    return done || event.last === true;
  };
  const fallback = () => { if (!done) pollTask(taskId, row); };
  const path = `${API}/tasks/${encodeURIComponent(taskId)}:sse`;
  if (!apiKey() && "EventSource" in window) {
    const source = new EventSource(path);
    source.onmessage = (msg) => {
      let event;
      try { event = JSON.parse(msg.data); } catch (_) { return; }
      if (onEvent(event)) { source.close(); if (!done) fallback(); }
    };
    // EventSource would reconnect and replay a snapshot forever; poll instead.
    source.onerror = () => { source.close(); fallback(); };
  } else {
    fetchSse(path, onEvent).then(fallback, fallback);
  }
}

/** SSE over fetch(): can send the Authorization header EventSource cannot. */
async function fetchSse(path, onEvent) {
  const response = await fetch(path, { headers: authHeaders({ Accept: "text/event-stream" }) });
  if (!response.ok || !response.body) throw await parseError(response.status, await response.text());
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (onEvent(JSON.parse(data))) { reader.cancel(); return; }
    }
  }
}

async function pollTask(taskId, row) {
  for (let delay = 1000; ; delay = Math.min(delay * 1.5, 5000)) {
    try {
      const task = await api("GET", `/tasks/${encodeURIComponent(taskId)}`);
      if (showTask(task, row)) { refreshSoon(); return; }
    } catch (err) {
      if (err.status === 404) { row.setPhase("failed", errorWords(err), null); return; }
    }
    await new Promise((resolve) => setTimeout(resolve, delay));
  }
}

function uploadAll(files) {
  if (!state.kb) { notify("Pick or create a knowledge base first."); return; }
  for (const file of files) {
    const row = addUploadRow(file);
    row.setPhase("waiting", "waiting to upload", 0);
    uploadQueue.push({ kbId: state.kb.id, file, row });
  }
  pumpUploads();
}

const drop = $("dropzone");
["dragenter", "dragover"].forEach((type) => drop.addEventListener(type, (ev) => {
  ev.preventDefault();
  drop.classList.add("over");
}));
["dragleave", "drop"].forEach((type) => drop.addEventListener(type, () => drop.classList.remove("over")));
drop.addEventListener("drop", (ev) => {
  ev.preventDefault();
  uploadAll(Array.from(ev.dataTransfer.files || []));
});
drop.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") $("file-input").click(); });
$("file-input").addEventListener("change", (ev) => {
  uploadAll(Array.from(ev.target.files || []));
  ev.target.value = "";
});

// ---------------------------------------------------------------- search

function positionText(position) {
  if (!position) return "";
  const parts = [];
  if (position.page_number) parts.push(`page ${position.page_number}`);
  if (position.sheet) parts.push(`sheet ${position.sheet}`);
  if (position.heading) parts.push(position.heading);
  parts.push(`chunk ${Number(position.chunk_index || 0) + 1}`);
  return parts.join(" · ");
}

$("search-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if (!state.kb) return;
  const query = $("search-query").value.trim();
  if (!query) return;
  const list = $("results");
  list.replaceChildren(el("li", { class: "muted" }, "Searching…"));
  try {
    const answer = await api("POST", `/knowledge-bases/${encodeURIComponent(state.kb.id)}:search`, {
      query, top_k: 10, mode: $("search-mode").value,
    });
    const results = answer.results || [];
    list.replaceChildren();
    if (!results.length) list.append(el("li", { class: "muted" }, "Nothing matches. Documents still processing are not searchable yet."));
    for (const r of results) {
      list.append(el(
        "li",
        { class: "result", dataset: { filename: r.filename || "", documentId: r.document_id } },
        el("div", { class: "result-head" },
          el("span", { class: "result-source" }, r.filename || r.document_id),
          el("span", { class: "muted small" }, positionText(r.position)),
          el("span", { class: "score" }, Number(r.score || 0).toFixed(3))),
        el("p", { class: "result-text" }, r.text),
      ));
    }
  } catch (err) {
    list.replaceChildren();
    notify("Search failed: " + errorWords(err));
  }
});

// ---------------------------------------------------------------- start

showKeyState();
loadKnowledgeBases();
