// The imgsearch web page: plain JavaScript over the gateway's HTTP/JSON API (/v1/...), no framework, no CDN.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { photo: null, lastAdded: null };

function token() {
  return $("token").value.trim();
}

function k() {
  const n = parseInt($("k").value, 10);
  return Number.isFinite(n) ? n : 12;
}

async function api(method, path, body) {
  const headers = {};
  if (token()) headers["Authorization"] = "Bearer " + token();
  let payload = body;
  if (body !== undefined && !(body instanceof FormData)) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const res = await fetch(path, { method, headers, body: payload });
  const doc = await res.json().catch(() => ({ error: { code: "UNKNOWN", message: res.statusText } }));
  if (!res.ok) {
    const err = new Error(doc.error ? doc.error.message : res.statusText);
    err.code = doc.error ? doc.error.code : String(res.status);
    throw err;
  }
  return doc;
}

function showError(err) {
  const box = $("error");
  if (!err) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  box.hidden = false;
  box.innerHTML = "";
  const code = document.createElement("code");
  code.textContent = err.code || "ERROR";
  box.append(code, " " + err.message);
}

// Shown when an image has no thumbnail (added with thumbnails off): a tile drawn from the id.
function placeholder(id) {
  let h = 0;
  for (const ch of id) h = (h * 31 + ch.codePointAt(0)) % 360;
  const letter = (id.match(/[A-Za-z0-9]/) || ["?"])[0].toUpperCase();
  const svg =
    `<svg xmlns="http://www.w3.org/2000/svg" width="160" height="160" viewBox="0 0 160 160">` +
    `<rect width="160" height="160" fill="hsl(${h},45%,78%)"/>` +
    `<text x="80" y="100" font-size="64" text-anchor="middle" font-family="sans-serif" ` +
    `fill="hsl(${h},40%,30%)">${letter}</text></svg>`;
  return "data:image/svg+xml;charset=utf-8," + encodeURIComponent(svg);
}

function renderResults(title, result) {
  $("results-title").hidden = false;
  $("results-title").textContent = title;
  const meta = [`${result.hits.length} results`, `space ${result.space}`];
  if (result.head) meta.push(`head ${result.head}`);
  if (result.partial) meta.push(`partial: shards ${result.failed_shards.join(", ")} did not answer`);
  $("meta").textContent = meta.join(" · ");
  const list = $("results");
  list.innerHTML = "";
  for (const hit of result.hits) {
    const li = document.createElement("li");
    li.tabIndex = 0;
    li.dataset.id = hit.id;
    li.title = hit.source_name ? `${hit.id} (${hit.source_name}): show similar images` : `${hit.id}: show similar`;
    const img = document.createElement("img");
    img.className = "thumb";
    img.alt = hit.id;
    img.loading = "lazy";
    // The small JPEG the index keeps with each record; the placeholder when there is none.
    img.addEventListener("error", () => (img.src = placeholder(hit.id)), { once: true });
    img.src = "/v1/thumbnails/" + hit.id.split("/").map(encodeURIComponent).join("/");
    const cap = document.createElement("div");
    cap.className = "caption";
    const id = document.createElement("span");
    id.className = "id";
    id.textContent = hit.id;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    cap.append(id, score);
    li.append(img, cap);
    li.addEventListener("click", () => similar(hit.id));
    li.addEventListener("keydown", (e) => {
      if (e.key === "Enter") similar(hit.id);
    });
    list.append(li);
  }
}

function renderTags(result) {
  $("head").textContent = result.head ? `(${result.head}, ${result.vocabulary_size} in vocabulary)` : "";
  const list = $("tags");
  list.innerHTML = "";
  for (const t of result.tags) {
    const li = document.createElement("li");
    li.dataset.tag = t.tag;
    li.append(t.tag);
    if (!t.seen) {
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = "unseen";
      li.append(badge);
    }
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = t.score.toFixed(2);
    li.append(score);
    if (state.lastAdded && t.tag === state.lastAdded) li.classList.add("fresh");
    list.append(li);
  }
}

async function busy(fn) {
  document.body.setAttribute("aria-busy", "true");
  showError(null);
  try {
    await fn();
  } catch (err) {
    showError(err);
  } finally {
    document.body.removeAttribute("aria-busy");
  }
}

function searchText(q) {
  return busy(async () => {
    const r = await api("GET", `/v1/search/text?q=${encodeURIComponent(q)}&k=${k()}`);
    renderResults(`Images matching “${q}”`, r);
  });
}

function similar(id) {
  return busy(async () => {
    const r = await api("GET", `/v1/search/similar?id=${encodeURIComponent(id)}&k=${k()}`);
    renderResults(`Images similar to ${id}`, r);
    window.scrollTo({ top: $("results-title").offsetTop - 10, behavior: "smooth" });
  });
}

async function tagPhoto() {
  const form = new FormData();
  form.append("image", state.photo, state.photo.name || "photo");
  form.append("k", "10");
  renderTags(await api("POST", "/v1/tag", form));
}

function usePhoto(file) {
  if (!file) return;
  state.photo = file;
  state.lastAdded = null;
  $("photo").hidden = false;
  $("preview").src = URL.createObjectURL(file);
  return busy(async () => {
    const form = new FormData();
    form.append("image", file, file.name || "photo");
    form.append("k", String(k()));
    const [search] = await Promise.all([api("POST", "/v1/search/image", form), tagPhoto()]);
    renderResults(`Images similar to ${file.name || "your photo"}`, search);
  });
}

function addTag(name) {
  return busy(async () => {
    const r = await api("POST", "/v1/tags", { tags: [name] });
    const out = r.results[0];
    if (!out.ok && out.code !== "ALREADY_EXISTS") {
      const err = new Error(out.error);
      err.code = out.code;
      throw err;
    }
    state.lastAdded = name.trim().toLowerCase().replace(/\s+/g, " ");
    $("new-tag").value = "";
    if (state.photo) await tagPhoto();
  });
}

$("text-form").addEventListener("submit", (e) => {
  e.preventDefault();
  searchText($("query").value);
});
$("tag-form").addEventListener("submit", (e) => {
  e.preventDefault();
  if ($("new-tag").value.trim()) addTag($("new-tag").value);
});
$("file").addEventListener("change", (e) => usePhoto(e.target.files[0]));
const drop = $("drop");
for (const ev of ["dragenter", "dragover"]) {
  drop.addEventListener(ev, (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
}
for (const ev of ["dragleave", "drop"]) {
  drop.addEventListener(ev, (e) => {
    e.preventDefault();
    drop.classList.remove("over");
  });
}
drop.addEventListener("drop", (e) => usePhoto(e.dataTransfer.files[0]));
drop.addEventListener("keydown", (e) => {
  if (e.key === "Enter" || e.key === " ") $("file").click();
});
$("token").value = localStorage.getItem("imgsearch-token") || "";
$("token").addEventListener("change", () => localStorage.setItem("imgsearch-token", token()));
const initial = new URLSearchParams(location.search).get("q");
if (initial) {
  $("query").value = initial;
  searchText(initial);
}
