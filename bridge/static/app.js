// The search page of `dinobridge serve`: one query at a time against /api/search, its state in the URL.
// No framework and nothing fetched from elsewhere: the page works wherever the server does.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { q: "", minus: "", like: null, likeThumb: null, offset: 0, k: 24, file: null };
let results = [];
let viewing = -1;
let running = null; // the AbortController of the query in flight

function fromUrl() {
  const params = new URLSearchParams(location.search);
  state.q = params.get("q") || "";
  state.minus = params.get("minus") || "";
  state.like = params.get("like");
  state.offset = Math.max(0, parseInt(params.get("offset") || "0", 10) || 0);
  state.file = null; // an uploaded image is not in the URL: back and forward leave it behind
  $("q").value = state.q;
  $("minus").value = state.minus;
}

function toUrl() {
  const params = new URLSearchParams();
  if (state.q) params.set("q", state.q);
  if (state.minus) params.set("minus", state.minus);
  if (state.like) params.set("like", state.like);
  if (state.offset) params.set("offset", String(state.offset));
  const query = params.toString();
  return query ? `/?${query}` : "/";
}

function apiParams() {
  const params = new URLSearchParams();
  if (state.q) params.append("q", state.q);
  for (const word of state.minus.split(",")) if (word.trim()) params.append("minus", word.trim());
  if (state.like) params.set("like", state.like);
  params.set("k", String(state.k));
  params.set("offset", String(state.offset));
  return params;
}

function hasQuery() {
  return Boolean(state.q || state.like || state.file);
}

async function search({ push = true } = {}) {
  showChips();
  if (push && toUrl() !== location.pathname + location.search) history.pushState(null, "", toUrl());
  if (!hasQuery()) {
    render(null);
    return;
  }
  if (running) running.abort();
  running = new AbortController();
  const url = `/api/search?${apiParams()}`;
  let request = { signal: running.signal };
  if (state.file) {
    const form = new FormData();
    form.append("image", state.file, state.file.name || "query-image");
    request = { ...request, method: "POST", body: form };
  }
  document.body.classList.add("busy");
  const started = performance.now();
  try {
    const response = await fetch(url, request);
    const body = await response.json();
    if (!response.ok) throw new Error(body.detail || `${response.status} ${response.statusText}`);
    body.roundTrip = (performance.now() - started) / 1000;
    render(body);
  } catch (error) {
    if (error.name !== "AbortError") showError(error.message);
  } finally {
    document.body.classList.remove("busy");
  }
}

function render(body) {
  $("error").hidden = true;
  const grid = $("grid");
  grid.replaceChildren();
  results = body ? body.results : [];
  if (!body) {
    $("summary").textContent = "";
    $("pager").hidden = true;
    return;
  }
  results.forEach((hit, position) => grid.append(tile(hit, position)));
  const space = body.space === "image" ? "DINOv2 image space" : "text space";
  const shown = results.length ? `${body.offset + 1}–${body.offset + results.length}` : "no results";
  $("summary").textContent =
    `${shown} of ${body.searched.toLocaleString()} images searched in ${formatSeconds(body.seconds)} ` +
    `(${space}; ${formatSeconds(body.roundTrip)} with the round trip)`;
  $("pager").hidden = body.offset === 0 && !body.more;
  $("prev").disabled = body.offset === 0;
  $("next").disabled = !body.more;
  $("page").textContent = `page ${Math.floor(body.offset / state.k) + 1}`;
  $("where").disabled = !results.some((hit) => hit.heatmap);
}

function formatSeconds(seconds) {
  return seconds < 1 ? `${(seconds * 1000).toFixed(1)} ms` : `${seconds.toFixed(2)} s`;
}

function picture(hit) {
  return $("where").checked && hit.heatmap ? hit.heatmap : hit.thumbnail;
}

function tile(hit, position) {
  const item = document.createElement("li");
  item.className = "tile";
  const open = document.createElement("button");
  open.type = "button";
  open.className = "open";
  open.setAttribute("aria-label", `${hit.path}, score ${hit.score.toFixed(3)}: open larger`);
  const image = document.createElement("img");
  image.src = picture(hit);
  image.alt = hit.path;
  image.loading = "lazy";
  open.append(image);
  open.addEventListener("click", () => view(position));
  const caption = document.createElement("div");
  caption.className = "caption";
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score.toFixed(3);
  const path = document.createElement("span");
  path.className = "path";
  path.textContent = hit.path;
  path.title = hit.path;
  const like = document.createElement("button");
  like.type = "button";
  like.className = "like";
  like.textContent = "more like this";
  like.setAttribute("aria-label", `more like ${hit.path}`);
  like.addEventListener("click", () => moreLike(hit));
  caption.append(score, path, like);
  item.append(open, caption);
  return item;
}

function moreLike(hit) {
  // "More like this" alone searches DINOv2's own image space; the text box is cleared for it.
  closeViewer();
  Object.assign(state, { q: "", minus: "", like: hit.id, likeThumb: hit.thumbnail, offset: 0, file: null });
  $("q").value = "";
  $("minus").value = "";
  search();
}

function showChips() {
  const image = $("query-image");
  image.hidden = !state.file;
  if (state.file) {
    const preview = image.querySelector("img");
    if (preview.src) URL.revokeObjectURL(preview.src);
    preview.src = URL.createObjectURL(state.file);
    image.querySelector(".chip-text").textContent = state.file.name || "query image";
  }
  const like = $("query-like");
  like.hidden = !state.like;
  if (state.like) like.querySelector("img").src = state.likeThumb || `/api/images/${state.like}/thumbnail`;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function view(position) {
  if (position < 0 || position >= results.length) return;
  viewing = position;
  const hit = results[position];
  const where = $("where").checked && hit.heatmap;
  $("viewer-image").src = where ? hit.heatmap : hit.original;
  $("viewer-image").alt = hit.path;
  $("viewer-path").textContent = hit.path;
  $("viewer-score").textContent = `score ${hit.score.toFixed(3)}`;
  $("viewer-original").href = hit.original;
  $("viewer-prev").disabled = position === 0;
  $("viewer-next").disabled = position === results.length - 1;
  if (!$("viewer").open) $("viewer").showModal();
}

function closeViewer() {
  if ($("viewer").open) $("viewer").close();
}

function useFile(file) {
  if (!file || !file.type.startsWith("image/")) {
    showError(`'${file ? file.name : "that"}' is not an image; pick a JPEG, PNG, WebP, GIF, BMP or TIFF file`);
    return;
  }
  state.file = file;
  state.offset = 0;
  search();
}

function start() {
  fromUrl();
  if (new URLSearchParams(location.search).has("token")) history.replaceState(null, "", toUrl());
  $("search").addEventListener("submit", (event) => {
    event.preventDefault();
    Object.assign(state, { q: $("q").value.trim(), minus: $("minus").value.trim(), offset: 0 });
    search();
  });
  $("file").addEventListener("change", () => useFile($("file").files[0]));
  $("clear-image").addEventListener("click", () => {
    state.file = null;
    $("file").value = "";
    search();
  });
  $("clear-like").addEventListener("click", () => {
    state.like = null;
    search();
  });
  $("prev").addEventListener("click", () => {
    state.offset = Math.max(0, state.offset - state.k);
    search();
  });
  $("next").addEventListener("click", () => {
    state.offset += state.k;
    search();
  });
  $("where").addEventListener("change", () => {
    document.querySelectorAll("#grid img").forEach((image, position) => {
      image.src = picture(results[position]);
    });
    if ($("viewer").open) view(viewing);
  });
  $("viewer-prev").addEventListener("click", () => view(viewing - 1));
  $("viewer-next").addEventListener("click", () => view(viewing + 1));
  $("viewer-close").addEventListener("click", closeViewer);
  $("viewer-like").addEventListener("click", () => moreLike(results[viewing]));
  $("viewer").addEventListener("keydown", (event) => {
    if (event.key === "ArrowLeft") view(viewing - 1);
    if (event.key === "ArrowRight") view(viewing + 1);
  });
  document.addEventListener("keydown", (event) => {
    const typing = ["INPUT", "TEXTAREA"].includes(document.activeElement.tagName);
    if (event.key === "/" && !typing && !$("viewer").open) {
      event.preventDefault();
      $("q").focus();
    }
  });
  window.addEventListener("popstate", () => {
    fromUrl();
    search({ push: false });
  });
  // Drag and drop anywhere on the page.
  let depth = 0;
  document.addEventListener("dragenter", (event) => {
    event.preventDefault();
    depth += 1;
    $("drop").hidden = false;
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) $("drop").hidden = true;
  });
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    depth = 0;
    $("drop").hidden = true;
    useFile(event.dataTransfer.files[0]);
  });
  search({ push: false });
}

start();
