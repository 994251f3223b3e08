// Building the page: elements from plain data (text is always set as text, never parsed as
// HTML), and the formatting of numbers, times and statuses shared by every view.

const SVG_NS = "http://www.w3.org/2000/svg";

function append(parent, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    parent.append(child instanceof Node ? child : String(child));
  }
}

function assign(el, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2).toLowerCase(), value);
    } else if (key === "dataset") {
      Object.assign(el.dataset, value);
    } else if (key === "value" && "value" in el) {
      el.value = value;
    } else if (value === true) {
      el.setAttribute(key, "");
    } else {
      el.setAttribute(key, String(value));
    }
  }
}

/** An HTML element: h("a", {href: "#/jobs", class: "link"}, "Jobs"). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  assign(el, attrs);
  append(el, children);
  return el;
}

/** An SVG element (same calling convention as h). */
export function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  assign(el, attrs);
  append(el, children);
  return el;
}

/** Replaces the children of el. */
export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export function card(title, ...children) {
  return h("section", {class: "card"}, title ? h("h2", {}, title) : null, ...children);
}

export function errorBox(error) {
  return h("div", {class: "error", role: "alert"}, error && error.message ? error.message : String(error));
}

export function notice(text) {
  return h("p", {class: "muted"}, text);
}

/** A definition list of [label, value] pairs, value a node or text. */
export function facts(pairs) {
  return h("dl", {class: "facts"}, pairs.filter(Boolean).map(([label, value]) =>
    h("div", {}, h("dt", {}, label), h("dd", {}, value ?? "—"))));
}

/** A table; a column whose first cell is numeric (class "num") gets a right-aligned header. */
export function table(headers, rows, attrs = {}) {
  const first = rows[0];
  const numeric = (index) => Boolean(first?.children[index]?.classList.contains("num"));
  return h("div", {class: "table-wrap"},
    h("table", attrs,
      h("thead", {}, h("tr", {}, headers.map((name, index) => h("th", {class: numeric(index) ? "num" : null}, name)))),
      h("tbody", {}, rows)));
}

export function percent(value, digits = 1) {
  if (value === null || value === undefined || Number.isNaN(value)) return "—";
  return `${(value * 100).toFixed(digits)}%`;
}

export function number(value, digits = 3) {
  if (value === null || value === undefined || Number.isNaN(value)) return "—";
  if (Number.isInteger(value)) return value.toLocaleString("en-US");
  return value.toFixed(digits);
}

export function bytes(value) {
  if (value === null || value === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB"];
  let size = value;
  let unit = 0;
  while (size >= 1024 && unit < units.length - 1) {
    size /= 1024;
    unit += 1;
  }
  return `${unit ? size.toFixed(1) : size} ${units[unit]}`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "—";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

/** Seconds between two ISO times (the second defaults to now). */
export function between(start, end) {
  if (!start) return null;
  const stop = end ? Date.parse(end) : Date.now();
  return Math.max(0, (stop - Date.parse(start)) / 1000);
}

/** A <time> showing how long ago, the local date and time on hover. */
export function when(iso) {
  if (!iso) return "—";
  const date = new Date(iso);
  const seconds = (Date.now() - date.getTime()) / 1000;
  let text;
  if (seconds < 45) text = "just now";
  else if (seconds < 3600) text = `${Math.round(seconds / 60)} min ago`;
  else if (seconds < 86400) text = `${Math.round(seconds / 3600)} h ago`;
  else text = date.toLocaleDateString();
  return h("time", {datetime: iso, title: date.toLocaleString()}, text);
}

export function shortId(id) {
  return id ? id.slice(0, 8) : "—";
}

export function statusBadge(status) {
  return h("span", {class: `badge status-${status}`, dataset: {status}}, status);
}

export function progressBar(value) {
  const bar = h("progress", {max: "1", value: String(value ?? 0)});
  bar.title = percent(value ?? 0, 0);
  return bar;
}

export function link(href, text, attrs = {}) {
  return h("a", {href, ...attrs}, text);
}

/** Draws an image (a PNG/JPEG Blob or File) onto a new canvas; null if it cannot be read. */
export async function imageCanvas(blob, className = "thumb") {
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob);
  } catch {
    return null;
  }
  const canvas = h("canvas", {class: className, width: bitmap.width, height: bitmap.height});
  canvas.getContext("2d").drawImage(bitmap, 0, 0);
  bitmap.close();
  return canvas;
}

/** Runs tasks (functions returning promises) at most `limit` at a time. */
export async function inBatches(tasks, limit) {
  let next = 0;
  async function worker() {
    while (next < tasks.length) {
      const index = next++;
      await tasks[index]();
    }
  }
  await Promise.all(Array.from({length: Math.min(limit, tasks.length)}, worker));
}

/** Resolves after ms, or at once when signal aborts. */
export function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    }, {once: true});
  });
}
