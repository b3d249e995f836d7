// "Find copies": upload a picture to POST /lookup and show the verdict with its evidence (verdict badges,
// cosine, hash distances, inliers, and the matched region drawn over both images). A panel of its own: it
// shares nothing with the search UI in app.js but the page.

const $ = (selector) => document.querySelector(selector);

const ui = {
  open: $("#find-copies"),
  dialog: $("#copies"),
  close: $("#copies-close"),
  drop: $("#copies-drop"),
  file: $("#copies-file"),
  status: $("#copies-status"),
  matches: $("#copies-matches"),
};

const VERDICT_TEXT = {
  exact: "Exact copy",
  near_duplicate: "Edited copy",
  similar: "Similar, not a copy",
  different: "No copy found",
};

let controller = null;
let queryUrl = null;

function badge(verdict) {
  const span = document.createElement("span");
  span.className = "verdict-badge";
  span.dataset.verdict = verdict;
  span.dataset.testid = "verdict-badge";
  span.textContent = VERDICT_TEXT[verdict] || verdict;
  return span;
}

function setStatus(state, ...content) {
  ui.status.dataset.state = state;
  ui.status.replaceChildren(...content);
}

/** A figure holding an image with the matched region ([x0, y0, x1, y1] in pixels of a width x height image). */
function boxedImage(src, alt, box, width, height, caption) {
  const figure = document.createElement("figure");
  figure.className = "boxed";
  const frameHolder = document.createElement("div");
  frameHolder.className = "boxed-image";
  const img = document.createElement("img");
  img.src = src;
  img.alt = alt;
  frameHolder.append(img);
  figure.append(frameHolder);
  const place = (w, h) => {
    if (!box || !w || !h) return;
    const frame = document.createElement("div");
    frame.className = "match-box";
    frame.dataset.testid = "match-box";
    const [x0, y0, x1, y1] = box;
    const pct = (v, total) => `${Math.max(0, Math.min(100, (v / total) * 100)).toFixed(2)}%`;
    frame.style.left = pct(x0, w);
    frame.style.top = pct(y0, h);
    frame.style.width = pct(x1 - x0, w);
    frame.style.height = pct(y1 - y0, h);
    frameHolder.append(frame);
  };
  if (width && height) {
    place(width, height);
  } else {
    img.addEventListener("load", () => place(img.naturalWidth, img.naturalHeight), { once: true });
  }
  const text = document.createElement("figcaption");
  text.textContent = caption;
  figure.append(text);
  return figure;
}

function fmt(value, digits = 3) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function renderMatch(match) {
  const item = document.createElement("li");
  item.className = "copy-match";
  item.dataset.id = String(match.id);
  const e = match.evidence;
  item.append(
    boxedImage(queryUrl, "Your picture", e.query_box, null, null, "Your picture"),
    boxedImage(match.thumbnail_url, match.path, e.candidate_box, match.width, match.height, match.path),
  );
  const facts = document.createElement("div");
  facts.className = "copy-facts";
  const numbers = document.createElement("p");
  numbers.dataset.testid = "copy-evidence";
  const phash = Math.min(e.phash_distance, e.phash_distance_mirrored);
  const dhash = Math.min(e.dhash_distance, e.dhash_distance_mirrored);
  numbers.textContent =
    `cosine ${fmt(e.cosine)} · pHash ${phash} bits · dHash ${dhash} bits · ` +
    `${e.inliers} inliers of ${e.matches} matches (${e.model}) · agreement ${fmt(e.agreement, 2)}` +
    (e.mirrored ? " · mirrored" : "");
  const reason = document.createElement("p");
  reason.textContent = match.reason;
  facts.append(badge(match.verdict), numbers, reason);
  item.append(facts);
  return item;
}

async function lookup(file) {
  if (!file) return;
  controller?.abort();
  controller = new AbortController();
  if (queryUrl) URL.revokeObjectURL(queryUrl);
  queryUrl = URL.createObjectURL(file);
  ui.matches.replaceChildren();
  setStatus("loading", document.createTextNode(`Looking for copies of ${file.name}…`));
  const body = new FormData();
  body.append("file", file, file.name);
  try {
    const response = await fetch("lookup?min_verdict=near_duplicate&limit=20", {
      method: "POST",
      body,
      signal: controller.signal,
    });
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) {
      setStatus("error", document.createTextNode(answer.detail || `Look-up failed (HTTP ${response.status})`));
      return;
    }
    const summary = document.createElement("span");
    summary.textContent = ` ${answer.matches.length} match(es), ${answer.candidates} checked in ${Math.round(answer.took_ms)} ms`;
    setStatus("done", badge(answer.verdict), summary);
    ui.matches.replaceChildren(...answer.matches.map(renderMatch));
  } catch (error) {
    if (error.name !== "AbortError") setStatus("error", document.createTextNode(`Look-up failed: ${error.message}`));
  }
}

ui.open?.addEventListener("click", () => ui.dialog.showModal());
ui.close?.addEventListener("click", () => ui.dialog.close());
ui.file?.addEventListener("change", () => lookup(ui.file.files[0]));
// Drops inside the panel are ours: the page's own drop handler (image search) must not see them.
for (const type of ["dragenter", "dragover", "dragleave", "drop"]) {
  ui.dialog?.addEventListener(type, (event) => {
    event.preventDefault();
    event.stopPropagation();
    ui.drop.classList.toggle("over", type === "dragenter" || type === "dragover");
    if (type === "drop") lookup(event.dataTransfer?.files?.[0]);
  });
}
