// clipsearch web UI: plain ES module, no build step, talks to the JSON API served next to it.
//
// One search is "current" at a time (text, similar-to-id or uploaded image). Every new search aborts the
// requests of the previous one and bumps a generation counter, so a late answer can never overwrite a newer one.

const DEFAULT_PAGE_SIZE = 40;
const MAX_PAGE_SIZE = 200;
const DEBOUNCE_MS = 250;
const READY_RETRY_MS = 5000;
const PRELOAD_MARGIN_PX = 800;
const SAFE_SEARCH_KEY = "clipsearch.safeSearch";
// "none" turns the relevance cut-off off (every hit shown in one list); anything else: cutoff=auto.
const CUTOFF_KEY = "clipsearch.cutoff";

const $ = (selector) => document.querySelector(selector);

const el = {
  form: $("#search-form"),
  search: $("#search"),
  pick: $("#pick-image"),
  file: $("#file-input"),
  minScore: $("#min-score"),
  minScoreValue: $("#min-score-value"),
  safe: $("#safe-search"),
  facets: $("#facets"),
  status: $("#status"),
  results: $("#results"),
  sentinel: $("#sentinel"),
  progress: $("#progress"),
  banner: $("#ready-banner"),
  indexInfo: $("#index-info"),
  chip: $("#query-chip"),
  chipImage: $("#query-chip-image"),
  chipLabel: $("#query-chip-label"),
  chipClear: $("#query-chip-clear"),
  dropzone: $("#dropzone"),
  viewer: $("#viewer"),
  viewerImage: $("#viewer-image"),
  viewerTitle: $("#viewer-title"),
  viewerPath: $("#viewer-path"),
  viewerScore: $("#viewer-score"),
  viewerDims: $("#viewer-dims"),
  viewerRank: $("#viewer-rank"),
  viewerTags: $("#viewer-tags"),
  viewerFlags: $("#viewer-flags"),
  viewerOriginal: $("#viewer-original"),
  viewerPrev: $("#viewer-prev"),
  viewerNext: $("#viewer-next"),
  viewerClose: $("#viewer-close"),
  moreLikeThis: $("#more-like-this"),
};

/**
 * What is being searched: words (text), an indexed image (similar, "more like this"), both at once (the words
 * refine the image), or an uploaded file. mode is derived: "idle" | "text" | "similar" | "mix" | "image".
 */
const query = {
  mode: "idle",
  text: "",
  similar: null,
  similarLabel: "",
  file: null,
  minScore: 0,
  pageSize: DEFAULT_PAGE_SIZE,
  tags: [], // tag filters: hits carry every one of them
  safe: true, // safe search: hide images with a safe-search flag
};

function setQuery(changes) {
  Object.assign(query, changes);
  const hasText = query.text.trim() !== "";
  if (query.file) query.mode = "image";
  else if (query.similar !== null) query.mode = hasText ? "mix" : "similar";
  else query.mode = hasText ? "text" : "idle";
  document.title = { idle: "clipsearch", image: "Image search · clipsearch" }[query.mode] ?? `${describeQuery(false)} · clipsearch`;
}

/** The results of the current search. */
const results = {
  generation: 0,
  controller: null,
  hits: [],
  ids: new Set(),
  total: 0,
  hasMore: false,
  loading: false,
  error: null,
  errorStatus: 0,
  tookMs: null,
  model: null,
  facets: [], // [{label, count}] over all the hits of the current search
  relevantTotal: null, // hits that passed the relevance cut-off (null: no cut-off asked for)
  firstWeaker: -1, // index of the first hit below the cut-off, where the divider goes (-1: none yet)
  showWeaker: false, // the person asked to see the less relevant hits of this search
};

/** The API's relevance cut-off: "auto" unless the browser stores "none" (clipsearch.cutoff in localStorage). */
function cutoffMode() {
  try {
    return localStorage.getItem(CUTOFF_KEY) === "none" ? "none" : "auto";
  } catch {
    return "auto"; // storage blocked: the default
  }
}

/** The less relevant hits are loaded up to the divider but stay folded until asked for. */
const weakerFolded = () => results.firstWeaker >= 0 && !results.showWeaker;
const shownCount = () => (weakerFolded() ? results.firstWeaker : results.hits.length);

let activeIndex = 0; // the result that holds the grid's tab stop
let viewerIndex = -1;
let typingTimer = 0;
let readyTimer = 0;
const uploads = new Map(); // history key -> File, so back/forward can return to an image search
let uploadCounter = 0;

// ---------------------------------------------------------------------------------------------------------
// API

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

function describeDetail(detail, status) {
  if (typeof detail === "string" && detail) return detail;
  if (Array.isArray(detail)) {
    // FastAPI's default validation error: [{loc, msg}, ...]
    return detail.map((d) => (d && d.msg ? `${(d.loc || []).slice(1).join(".") || "request"}: ${d.msg}` : String(d))).join("; ");
  }
  return `The server answered ${status}. Try again in a moment.`;
}

async function apiFetch(url, init = {}) {
  let response;
  try {
    response = await fetch(url, { headers: { Accept: "application/json" }, ...init });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "Cannot reach the clipsearch server. Is it running?");
  }
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    if (err.name === "AbortError") throw err;
  }
  if (!response.ok) throw new ApiError(response.status, describeDetail(body && body.detail, response.status));
  return body;
}

function pageParams(offset) {
  const params = new URLSearchParams({ k: String(query.pageSize), offset: String(offset) });
  if (query.minScore > 0) params.set("min_score", query.minScore.toFixed(2));
  for (const tag of query.tags) params.append("tag", tag);
  if (query.safe) params.set("safe", "true");
  if (offset > 0) params.set("facets", "0"); // counted over all the hits: the first page has them
  if (cutoffMode() === "auto") params.set("cutoff", "auto");
  return params;
}

const TERM = /(-?)"([^"]*)"(:-?\d+(?:\.\d+)?)?|(\S+)/g;
const WEIGHTED = /:-?\d+(?:\.\d+)?$/;

/**
 * The API's query arithmetic from what was typed: plain words form one phrase; a word with a leading "-"
 * (negative) or a trailing ":weight" is a term of its own, and so is a "quoted phrase" (-"red car", "dog":2).
 * 'beach at dusk -people' -> ['beach at dusk', '-people'].
 */
export function queryTerms(text) {
  const phrase = [];
  const terms = [];
  for (const [, minus, quoted, weight, word] of text.matchAll(TERM)) {
    if (word === undefined) {
      if (quoted.trim()) terms.push(`${minus}${quoted.trim()}${weight ?? ""}`);
    } else if ((word.length > 1 && word.startsWith("-")) || WEIGHTED.test(word)) {
      terms.push(word);
    } else {
      phrase.push(word);
    }
  }
  return phrase.length ? [phrase.join(" "), ...terms] : terms;
}

function requestPage(offset, signal) {
  const params = pageParams(offset);
  if (query.mode === "text" || query.mode === "mix") {
    for (const term of queryTerms(query.text)) params.append("q", term);
    if (query.mode === "mix") params.set("image_id", String(query.similar));
    return apiFetch(`search?${params}`, { signal });
  }
  if (query.mode === "similar") {
    return apiFetch(`similar/${encodeURIComponent(query.similar)}?${params}`, { signal });
  }
  const form = new FormData();
  form.append("file", query.file, query.file.name || "image");
  return apiFetch(`search/image?${params}`, { method: "POST", body: form, signal });
}

// ---------------------------------------------------------------------------------------------------------
// Searching and paging

function startSearch() {
  if (results.controller) results.controller.abort();
  results.generation += 1;
  results.hits = [];
  results.ids = new Set();
  results.total = 0;
  results.hasMore = false;
  results.error = null;
  results.tookMs = null;
  results.relevantTotal = null;
  results.firstWeaker = -1;
  results.showWeaker = false;
  activeIndex = 0;
  renderChip();
  if (query.mode === "idle") {
    results.loading = false;
    setBusy(false);
    el.results.replaceChildren();
    results.facets = [];
    renderFacets();
    renderStatus();
    return;
  }
  loadPage(results.generation, 0);
}

async function loadPage(generation, offset) {
  const controller = new AbortController();
  results.controller = controller;
  results.loading = true;
  setBusy(true);
  if (offset === 0) renderStatus();
  try {
    const data = await requestPage(offset, controller.signal);
    if (generation !== results.generation) return;
    results.error = null;
    results.total = Number.isFinite(data.total) ? data.total : offset + data.hits.length;
    results.tookMs = data.took_ms;
    results.model = data.model || results.model;
    results.relevantTotal = Number.isInteger(data.relevant_total) && data.cutoff != null ? data.relevant_total : null;
    if (offset === 0) {
      el.results.replaceChildren();
      results.facets = Array.isArray(data.facets) ? data.facets : [];
      renderFacets();
    }
    const fresh = data.hits.filter((hit) => !results.ids.has(hit.id));
    appendHits(fresh);
    results.hasMore = data.hits.length === query.pageSize && offset + data.hits.length < results.total;
  } catch (err) {
    if (err.name === "AbortError" || generation !== results.generation) return;
    results.error = err.message;
    results.errorStatus = err.status;
    results.hasMore = false;
    if (offset === 0) {
      el.results.replaceChildren();
      results.facets = [];
      renderFacets();
    }
    if (err.status === 503) checkReady();
  } finally {
    if (generation === results.generation) {
      results.loading = false;
      results.controller = null;
      setBusy(false);
      renderStatus();
      // Not requestAnimationFrame: it never fires while the tab is hidden or not being painted.
      setTimeout(maybeLoadMore, 0);
    }
  }
}

function loadMore() {
  if (results.loading || !results.hasMore || query.mode === "idle" || weakerFolded()) return Promise.resolve();
  return loadPage(results.generation, results.hits.length);
}

/** Keep filling the page while the end of the grid is on (or near) the screen. */
function maybeLoadMore() {
  if (!results.hasMore || results.loading || weakerFolded()) return;
  if (el.sentinel.getBoundingClientRect().top < window.innerHeight + PRELOAD_MARGIN_PX) loadMore();
}

new IntersectionObserver(
  (entries) => {
    if (entries.some((entry) => entry.isIntersecting)) loadMore();
  },
  { rootMargin: `${PRELOAD_MARGIN_PX}px 0px` },
).observe(el.sentinel);

// ---------------------------------------------------------------------------------------------------------
// Rendering

const scoreText = (score) => (typeof score === "number" ? score.toFixed(3) : "–");
const fileName = (path) => String(path).split(/[\\/]/).pop() || String(path);

function appendHits(hits) {
  const fragment = document.createDocumentFragment();
  for (const hit of hits) {
    const index = results.hits.length;
    results.hits.push(hit);
    results.ids.add(hit.id);

    if (hit.relevant === false && results.firstWeaker < 0) {
      results.firstWeaker = index;
      fragment.append(weakerDivider());
    }
    const item = document.createElement("li");
    item.className = "result";
    if (results.firstWeaker >= 0) {
      item.classList.add("weaker");
      item.hidden = !results.showWeaker;
    }
    item.dataset.testid = "result";
    item.dataset.id = hit.id;
    item.dataset.index = index;
    item.dataset.score = hit.score;

    const button = document.createElement("button");
    button.type = "button";
    button.className = "tile";
    button.tabIndex = index === activeIndex ? 0 : -1;
    button.setAttribute("aria-label", `${fileName(hit.path)}, score ${scoreText(hit.score)}`);
    button.title = hit.path;

    const img = document.createElement("img");
    img.loading = "lazy";
    img.decoding = "async";
    img.alt = fileName(hit.path);
    img.src = hit.thumbnail_url;
    img.addEventListener("load", () => item.classList.add("loaded"), { once: true });
    img.addEventListener("error", () => item.classList.add("broken"), { once: true });

    const overlay = document.createElement("span");
    overlay.className = "tile-overlay";
    overlay.setAttribute("aria-hidden", "true");
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = scoreText(hit.score);
    const name = document.createElement("span");
    name.className = "tile-name";
    name.textContent = fileName(hit.path);
    overlay.append(name, score);

    button.append(img, overlay);
    item.append(button);
    fragment.append(item);
  }
  el.results.append(fragment);
}

const weakerCount = () =>
  results.relevantTotal === null ? results.hits.length - results.firstWeaker : results.total - results.relevantTotal;

/** Where the hits below the relevance cut-off begin: a button that unfolds them. */
function weakerDivider() {
  const divider = document.createElement("li");
  divider.className = "weaker-divider";
  divider.dataset.testid = "weaker-divider";
  const button = document.createElement("button");
  button.type = "button";
  button.className = "weaker-toggle";
  button.textContent = `Show less relevant (${weakerCount().toLocaleString()})`;
  button.title = "These scored well below the best matches of this search";
  button.setAttribute("aria-expanded", "false");
  button.addEventListener("click", showWeaker, { once: true });
  divider.append(button);
  return divider;
}

function showWeaker() {
  results.showWeaker = true;
  for (const item of el.results.querySelectorAll(".result.weaker")) item.hidden = false;
  const button = el.results.querySelector(".weaker-toggle");
  if (button) {
    button.textContent = "Less relevant";
    button.disabled = true;
    button.setAttribute("aria-expanded", "true");
  }
  renderStatus();
  setTimeout(maybeLoadMore, 0);
}

/** "for “red car”", "like photo_042.jpg": how the status line names the current search. */
function describeQuery(preposition = true) {
  const words = `“${query.text.trim()}”`;
  const image = query.similarLabel || `image #${query.similar}`;
  const [prefix, name] = {
    text: ["for ", words],
    similar: ["like ", image],
    mix: ["like ", `${image} + ${words}`],
    image: ["like ", query.file?.name || "the pasted image"],
  }[query.mode] ?? ["", ""];
  return preposition ? `${prefix}${name}` : name;
}

function setStatus(state, message, hint = "") {
  el.status.dataset.state = state;
  el.status.replaceChildren();
  if (state === "idle" || state === "empty" || state === "error") {
    const title = document.createElement("p");
    title.className = "status-title";
    title.textContent = message;
    el.status.append(title);
    if (hint) {
      const more = document.createElement("p");
      more.className = "status-hint";
      more.textContent = hint;
      el.status.append(more);
    }
    if (state === "empty" && query.minScore > 0) {
      const reset = document.createElement("button");
      reset.type = "button";
      reset.className = "button";
      reset.id = "reset-min-score";
      reset.textContent = "Reset minimum score";
      reset.addEventListener("click", () => setMinScore(0, { search: true }));
      el.status.append(reset);
    }
    if (state === "idle") el.status.append(examples());
  } else {
    el.status.textContent = message;
  }
}

function examples() {
  const list = document.createElement("div");
  list.className = "examples";
  for (const text of ["a dog on the beach", "city street at night", "food on a plate", "people playing sports"]) {
    const chip = document.createElement("button");
    chip.type = "button";
    chip.className = "example";
    chip.textContent = text;
    chip.addEventListener("click", () => {
      el.search.value = text;
      searchText(text, { push: true });
    });
    list.append(chip);
  }
  return list;
}

function renderStatus() {
  el.results.setAttribute("aria-busy", String(results.loading));
  if (query.mode === "idle") {
    setStatus(
      "idle",
      "Search your photos by describing them",
      "Type a few words, or drop, paste or pick an image to find similar ones.",
    );
    return;
  }
  if (results.error) {
    if (results.errorStatus === 503) setStatus("error", "Search is not ready yet", results.error);
    else setStatus("error", results.error, "Change the search and try again.");
    return;
  }
  if (results.loading && results.hits.length === 0) {
    setStatus("loading", `Searching ${describeQuery()}…`);
    return;
  }
  if (!results.loading && results.hits.length === 0) {
    const cutoff = query.minScore > 0 ? ` with a score of at least ${query.minScore.toFixed(2)}` : "";
    const what = query.mode === "text" ? `match “${query.text.trim()}”` : `are ${describeQuery()}`;
    let hint = "Try other words or another image.";
    if (query.tags.length) hint = "Remove a tag filter to see more.";
    else if (query.minScore > 0) hint = "Lower the minimum score to see weaker matches.";
    setStatus("empty", `No images ${what}${describeTags()}${cutoff}.`, hint);
    return;
  }
  const count = results.total === 1 ? "1 image" : `${results.total.toLocaleString()} images`;
  const took = typeof results.tookMs === "number" ? ` · ${Math.round(results.tookMs)} ms` : "";
  const weaker = results.firstWeaker >= 0 ? ` · ${weakerCount().toLocaleString()} less relevant` : "";
  setStatus(
    results.loading ? "loading" : "results",
    `${count} ${describeQuery()}${describeTags()}${weaker}${took}`,
  );
}

function setBusy(busy) {
  el.progress.classList.toggle("active", busy);
  document.body.classList.toggle("busy", busy);
}

function renderChip() {
  el.search.placeholder =
    query.similar !== null ? "Refine with words, e.g. “at night” or “-people”" : el.search.dataset.placeholder;
  if (query.similar !== null) {
    el.chipImage.src = `images/${encodeURIComponent(query.similar)}/thumbnail?size=256`;
    el.chipImage.alt = `Image #${query.similar}`;
    el.chipLabel.textContent = `Photos like ${query.similarLabel || `image #${query.similar}`}`;
    el.chipClear.setAttribute("aria-label", "Clear the “more like this” search");
    el.chip.hidden = false;
  } else if (query.mode === "image" && query.file) {
    if (el.chipImage.dataset.objectUrl) URL.revokeObjectURL(el.chipImage.dataset.objectUrl);
    const url = URL.createObjectURL(query.file);
    el.chipImage.dataset.objectUrl = url;
    el.chipImage.src = url;
    el.chipImage.alt = "The image you searched with";
    el.chipLabel.textContent = `Photos like ${query.file.name || "the pasted image"}`;
    el.chipClear.setAttribute("aria-label", "Clear the image search");
    el.chip.hidden = false;
  } else {
    el.chip.hidden = true;
    el.chipImage.removeAttribute("src");
  }
}

// ---------------------------------------------------------------------------------------------------------
// URL state: ?q=...&min_score=... or ?similar=ID&min_score=... (and an optional page size, &k=...)

function urlFor() {
  const params = new URLSearchParams();
  if (!query.file && query.text.trim()) params.set("q", query.text.trim());
  if (!query.file && query.similar !== null) params.set("similar", String(query.similar));
  if (query.minScore > 0) params.set("min_score", query.minScore.toFixed(2));
  if (query.pageSize !== DEFAULT_PAGE_SIZE) params.set("k", String(query.pageSize));
  for (const tag of query.tags) params.append("tag", tag);
  if (!query.safe) params.set("safe", "off"); // on is the default: not written
  const search = params.toString();
  return `${location.pathname}${search ? `?${search}` : ""}`;
}

function historyState(extra = {}) {
  return { mode: query.mode, similarLabel: query.similarLabel, ...extra };
}

function updateUrl({ push = false, typing = false, upload = null } = {}) {
  const url = urlFor();
  const state = historyState({ typing, upload });
  const current = history.state || {};
  // A burst of typing edits one history entry; anything else (and the first keystroke) makes a new one.
  const replace = !push || (typing && current.typing);
  if (replace) history.replaceState(state, "", url);
  else if (url !== `${location.pathname}${location.search}` || upload) history.pushState(state, "", url);
  else history.replaceState(state, "", url);
}

function readUrl() {
  const params = new URLSearchParams(location.search);
  const minScore = Number.parseFloat(params.get("min_score") || "0");
  setMinScore(Number.isFinite(minScore) ? minScore : 0);
  const pageSize = Number.parseInt(params.get("k") || "", 10);
  query.pageSize = pageSize >= 1 && pageSize <= MAX_PAGE_SIZE ? pageSize : DEFAULT_PAGE_SIZE;
  query.tags = [...new Set(params.getAll("tag").map((tag) => tag.trim()).filter(Boolean))];
  setSafe(params.has("safe") ? !["off", "0", "false", "no"].includes(params.get("safe").toLowerCase()) : storedSafe());
  const similar = params.get("similar") ?? "";
  const upload = history.state?.upload;
  setQuery({
    text: params.getAll("q").join(" ").trim(),
    similar: /^\d+$/.test(similar) ? Number(similar) : null,
    similarLabel: history.state?.similarLabel || "",
    file: upload && uploads.has(upload) ? uploads.get(upload) : null,
  });
  el.search.value = query.text;
}

window.addEventListener("popstate", () => {
  if (el.viewer.open) el.viewer.close();
  readUrl();
  startSearch();
});

// ---------------------------------------------------------------------------------------------------------
// Entering searches

/** Words typed: alone, or refining the "more like this" image when one is shown (an upload is dropped). */
function searchText(text, { push = false, typing = false } = {}) {
  clearTimeout(typingTimer);
  setQuery({ text, file: null });
  updateUrl({ push, typing });
  startSearch();
}

function searchSimilar(id, label = "") {
  setQuery({ similar: id, similarLabel: label, text: "", file: null });
  el.search.value = "";
  updateUrl({ push: true });
  startSearch();
  window.scrollTo({ top: 0 });
  el.results.focus({ preventScroll: true });
}

// The server sniffs the content and answers 415 with a clear message for non-images, so any file is sent.
function searchImage(file) {
  if (!file) return;
  const key = `upload-${++uploadCounter}`;
  uploads.set(key, file);
  setQuery({ file, text: "", similar: null, similarLabel: "" });
  el.search.value = "";
  updateUrl({ push: true, upload: key });
  startSearch();
  window.scrollTo({ top: 0 });
}

/** The chip's "×": forget the image, keep the words (if any). */
function clearImage() {
  setQuery({ similar: null, similarLabel: "", file: null, text: el.search.value });
  updateUrl({ push: true });
  startSearch();
  el.search.focus();
}

function setMinScore(value, { search = false } = {}) {
  const clamped = Math.min(1, Math.max(0, Math.round(value * 100) / 100));
  query.minScore = clamped;
  el.minScore.value = String(clamped);
  el.minScoreValue.textContent = clamped > 0 ? clamped.toFixed(2) : "off";
  el.minScore.setAttribute("aria-valuetext", clamped > 0 ? `at least ${clamped.toFixed(2)}` : "off");
  if (search) {
    updateUrl();
    startSearch();
  }
}

el.form.addEventListener("submit", (event) => {
  event.preventDefault();
  searchText(el.search.value, { push: true });
});

el.search.addEventListener("input", () => {
  clearTimeout(typingTimer);
  typingTimer = setTimeout(() => searchText(el.search.value, { push: true, typing: true }), DEBOUNCE_MS);
});

let sliderTimer = 0;
el.minScore.addEventListener("input", () => {
  setMinScore(Number.parseFloat(el.minScore.value));
  clearTimeout(sliderTimer);
  sliderTimer = setTimeout(() => {
    updateUrl();
    startSearch();
  }, DEBOUNCE_MS);
});

el.chipClear.addEventListener("click", clearImage);

// ---------------------------------------------------------------------------------------------------------
// Tag facets and safe search

/** " tagged “dog”, “beach”" for the status line; empty without tag filters. */
function describeTags() {
  return query.tags.length ? ` tagged ${query.tags.map((tag) => `“${tag}”`).join(", ")}` : "";
}

/** Chips for the most frequent tags among the hits (and the active filters); a click toggles the filter. */
function renderFacets() {
  const counts = new Map(results.facets.map((facet) => [facet.label, facet.count]));
  for (const tag of query.tags) if (!counts.has(tag)) counts.set(tag, 0);
  el.facets.replaceChildren();
  el.facets.hidden = query.mode === "idle" || counts.size === 0;
  for (const [label, count] of counts) {
    const active = query.tags.includes(label);
    const chip = document.createElement("button");
    chip.type = "button";
    chip.className = "facet";
    chip.dataset.tag = label;
    chip.setAttribute("aria-pressed", String(active));
    chip.title = active ? `Show images without the tag “${label}” too` : `Only images tagged “${label}”`;
    const name = document.createElement("span");
    name.className = "facet-label";
    name.textContent = label;
    const number = document.createElement("span");
    number.className = "facet-count";
    number.textContent = count.toLocaleString();
    chip.append(name, number);
    chip.addEventListener("click", () => toggleTag(label));
    el.facets.append(chip);
  }
}

function toggleTag(label, on = !query.tags.includes(label)) {
  query.tags = on ? [...new Set([...query.tags, label])] : query.tags.filter((tag) => tag !== label);
  updateUrl({ push: true });
  startSearch();
}

function storedSafe() {
  try {
    return localStorage.getItem(SAFE_SEARCH_KEY) !== "off";
  } catch {
    return true; // storage blocked: the default
  }
}

function setSafe(on, { remember = false } = {}) {
  query.safe = on;
  el.safe.checked = on;
  if (!remember) return;
  try {
    localStorage.setItem(SAFE_SEARCH_KEY, on ? "on" : "off");
  } catch {
    // storage blocked: the choice lasts as long as the URL carries it
  }
}

el.safe.addEventListener("change", () => {
  setSafe(el.safe.checked, { remember: true });
  updateUrl({ push: true });
  startSearch();
});

// ---------------------------------------------------------------------------------------------------------
// Images from the picker, drag and drop, and the clipboard

el.pick.addEventListener("click", () => el.file.click());
el.file.addEventListener("change", () => {
  const [file] = el.file.files;
  searchImage(file);
  el.file.value = "";
});

const carriesFiles = (event) => Array.from(event.dataTransfer?.types || []).includes("Files");
let dragDepth = 0;

document.addEventListener("dragenter", (event) => {
  if (!carriesFiles(event)) return;
  event.preventDefault();
  dragDepth += 1;
  el.dropzone.hidden = false;
});
document.addEventListener("dragover", (event) => {
  if (!carriesFiles(event)) return;
  event.preventDefault();
  event.dataTransfer.dropEffect = "copy";
});
document.addEventListener("dragleave", (event) => {
  if (!carriesFiles(event)) return;
  dragDepth = Math.max(0, dragDepth - 1);
  if (dragDepth === 0) el.dropzone.hidden = true;
});
document.addEventListener("drop", (event) => {
  dragDepth = 0;
  el.dropzone.hidden = true;
  const files = Array.from(event.dataTransfer?.files || []);
  if (!files.length) return;
  event.preventDefault();
  searchImage(files.find((f) => f.type.startsWith("image/")) || files[0]);
});

document.addEventListener("paste", (event) => {
  const items = Array.from(event.clipboardData?.items || []);
  const image = items.find((item) => item.kind === "file" && item.type.startsWith("image/"));
  if (!image) return; // plain text pastes into the search box as usual
  event.preventDefault();
  const file = image.getAsFile();
  if (file) searchImage(file.name ? file : new File([file], "pasted image", { type: image.type }));
});

// ---------------------------------------------------------------------------------------------------------
// Keyboard navigation in the grid

const tiles = () => el.results.querySelectorAll(".result:not([hidden]) .tile");

function columnCount() {
  const columns = getComputedStyle(el.results).gridTemplateColumns.split(" ").filter(Boolean).length;
  return Math.max(1, columns);
}

async function focusResult(index) {
  if (index >= results.hits.length && results.hasMore) await loadMore();
  const all = tiles();
  if (!all.length) return;
  const target = Math.max(0, Math.min(index, all.length - 1));
  all[activeIndex]?.setAttribute("tabindex", "-1");
  activeIndex = target;
  all[target].setAttribute("tabindex", "0");
  all[target].focus();
  all[target].scrollIntoView({ block: "nearest" });
}

el.results.addEventListener("keydown", (event) => {
  const item = event.target.closest(".result");
  if (!item || event.altKey || event.ctrlKey || event.metaKey) return;
  const index = Number(item.dataset.index);
  const cols = columnCount();
  const moves = {
    ArrowRight: index + 1,
    ArrowLeft: index - 1,
    ArrowDown: index + cols,
    ArrowUp: index - cols,
    Home: 0,
    End: shownCount() - 1,
  };
  if (!(event.key in moves)) return;
  event.preventDefault();
  const next = moves[event.key];
  if (next < 0) {
    el.search.focus();
    return;
  }
  focusResult(next);
});

el.results.addEventListener("click", (event) => {
  const item = event.target.closest(".result");
  if (!item) return;
  const index = Number(item.dataset.index);
  tiles()[activeIndex]?.setAttribute("tabindex", "-1");
  activeIndex = index;
  tiles()[index]?.setAttribute("tabindex", "0");
  openViewer(index);
});

el.results.addEventListener("focusin", (event) => {
  const item = event.target.closest(".result");
  if (item) activeIndex = Number(item.dataset.index);
});

el.search.addEventListener("keydown", (event) => {
  if (event.key === "ArrowDown" && shownCount()) {
    event.preventDefault();
    focusResult(0);
  } else if (event.key === "Escape" && el.search.value) {
    event.preventDefault();
    el.search.value = "";
    searchText("", { push: true });
  } else if (event.key === "Backspace" && !el.search.value && query.similar !== null) {
    clearImage(); // like removing a tag in front of the cursor
  }
});

const isTyping = (target) =>
  target instanceof HTMLElement &&
  (target.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName));

document.addEventListener("keydown", (event) => {
  if (event.key === "/" && !isTyping(event.target) && !el.viewer.open && !event.ctrlKey && !event.metaKey) {
    event.preventDefault();
    el.search.focus();
    el.search.select();
  }
});

// ---------------------------------------------------------------------------------------------------------
// Large view

function showInViewer(index) {
  const hit = results.hits[index];
  if (!hit) return;
  viewerIndex = index;
  const name = fileName(hit.path);
  el.viewerImage.alt = name;
  // Show the cached thumbnail at once, then swap in the original when it has arrived.
  el.viewerImage.src = hit.thumbnail_url;
  el.viewer.classList.add("loading");
  const original = new Image();
  original.decoding = "async";
  original.onload = () => {
    if (viewerIndex !== index) return;
    el.viewerImage.src = hit.image_url;
    el.viewer.classList.remove("loading");
  };
  original.onerror = () => {
    if (viewerIndex === index) el.viewer.classList.remove("loading");
  };
  original.src = hit.image_url;

  el.viewer.dataset.id = hit.id;
  el.viewerTitle.textContent = name;
  el.viewerPath.textContent = hit.path;
  el.viewerPath.title = hit.path;
  el.viewerScore.textContent = scoreText(hit.score);
  el.viewerDims.textContent = hit.width && hit.height ? `${hit.width} × ${hit.height} px` : "unknown";
  el.viewerRank.textContent = `${index + 1} of ${results.total.toLocaleString()}`;
  el.viewerOriginal.href = hit.image_url;
  showLabels(hit.id);
  el.viewerPrev.disabled = index === 0;
  el.viewerNext.disabled = index >= results.hits.length - 1 && !results.hasMore;
}

/** The image's tags (each a button that filters by it) and safe-search flags, with their scores. */
async function showLabels(id) {
  el.viewerTags.replaceChildren();
  el.viewerFlags.replaceChildren();
  let body;
  try {
    body = await apiFetch(`images/${encodeURIComponent(id)}/tags`);
  } catch {
    return; // the labels are a detail: the large view works without them
  }
  if (el.viewer.dataset.id !== String(id)) return; // another image is shown by now
  for (const tag of body.tags || []) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "viewer-tag";
    button.title = `Only images tagged “${tag.label}”`;
    button.textContent = `${tag.label} `;
    const score = document.createElement("span");
    score.className = "label-score";
    score.textContent = tag.score.toFixed(2);
    button.append(score);
    button.addEventListener("click", () => {
      viewerIndex = -1;
      el.viewer.close();
      toggleTag(tag.label, true);
    });
    item.append(button);
    el.viewerTags.append(item);
  }
  for (const flag of body.flags || []) {
    const item = document.createElement("li");
    item.className = "viewer-flag";
    item.title = "Safe-search flag (zero-shot, approximate): hidden while safe search is on";
    item.textContent = `⚑ ${flag.label} `;
    const score = document.createElement("span");
    score.className = "label-score";
    score.textContent = flag.score.toFixed(2);
    item.append(score);
    el.viewerFlags.append(item);
  }
}

function openViewer(index) {
  if (!results.hits[index]) return;
  showInViewer(index);
  if (!el.viewer.open) el.viewer.showModal();
  el.moreLikeThis.focus();
}

async function stepViewer(delta) {
  const target = viewerIndex + delta;
  if (target < 0 || (weakerFolded() && target >= shownCount())) return;
  if (target >= results.hits.length) {
    if (!results.hasMore) return;
    await loadMore();
  }
  if (target < results.hits.length) showInViewer(target);
}

el.viewerPrev.addEventListener("click", () => stepViewer(-1));
el.viewerNext.addEventListener("click", () => stepViewer(1));
/** Close the large view and put the focus on the tile of the image last shown (not the one first opened). */
function closeViewer() {
  if (!el.viewer.open) return;
  const index = viewerIndex;
  el.viewer.close();
  if (index >= 0 && results.hits.length) focusResult(Math.min(index, results.hits.length - 1));
}

el.viewerClose.addEventListener("click", closeViewer);
el.moreLikeThis.addEventListener("click", () => {
  const hit = results.hits[viewerIndex];
  if (!hit) return;
  viewerIndex = -1;
  el.viewer.close();
  searchSimilar(hit.id, fileName(hit.path));
});

el.viewer.addEventListener("keydown", (event) => {
  if (event.key === "Escape") {
    event.preventDefault();
    closeViewer();
  } else if (event.key === "ArrowLeft") {
    event.preventDefault();
    stepViewer(-1);
  } else if (event.key === "ArrowRight") {
    event.preventDefault();
    stepViewer(1);
  }
});

// A click on the dark backdrop (the dialog element itself, outside its content) closes the view.
el.viewer.addEventListener("click", (event) => {
  if (event.target === el.viewer || event.target.classList.contains("viewer-stage")) closeViewer();
});

el.viewer.addEventListener("close", () => {
  el.viewerImage.removeAttribute("src");
  el.viewer.dataset.id = "";
  viewerIndex = -1;
});

// ---------------------------------------------------------------------------------------------------------
// Readiness

async function checkReady() {
  clearTimeout(readyTimer);
  let wasDown = !el.banner.hidden;
  try {
    const info = await apiFetch("readyz");
    el.banner.hidden = true;
    el.banner.textContent = "";
    document.body.dataset.ready = "true";
    const images = Number(info.index_count ?? info.images ?? 0);
    el.indexInfo.textContent = `${images.toLocaleString()} images indexed · model ${info.model ?? "unknown"}`;
    if (wasDown && query.mode !== "idle") startSearch();
  } catch (err) {
    document.body.dataset.ready = "false";
    const reason = err.status === 503 ? `Search is not ready yet: ${err.message}` : err.message;
    const stop = /[.!?]$/.test(reason) ? "" : ".";
    el.banner.textContent = `${reason}${stop} Checking again every ${READY_RETRY_MS / 1000} s…`;
    el.banner.hidden = false;
    wasDown = true;
    readyTimer = setTimeout(checkReady, READY_RETRY_MS);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Start

el.search.dataset.placeholder = el.search.placeholder;
history.replaceState(historyState({ typing: false }), "", location.href);
readUrl();
startSearch();
checkReady();
if (query.mode === "idle") el.search.focus();
