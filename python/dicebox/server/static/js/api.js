// Talking to the dicebox REST API: the API key (asked once, kept in this browser tab's
// sessionStorage, sent as a header, never in a URL), JSON calls with the server's error
// messages, file downloads, and job event streams read with fetch() so that they too carry
// the Authorization header (EventSource cannot send headers).

const KEY_ITEM = "dicebox.apiKey";

export function getKey() {
  return sessionStorage.getItem(KEY_ITEM);
}

export function setKey(key) {
  sessionStorage.setItem(KEY_ITEM, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_ITEM);
}

/** An error answer of the API: status, the server's message and its detail. */
export class ApiError extends Error {
  constructor(status, message, detail = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.detail = detail;
  }
}

let unauthorizedHandler = () => {};

/** fn(message) is called on every 401 answer (the key is missing or was refused). */
export function onUnauthorized(fn) {
  unauthorizedHandler = fn;
}

function authHeaders(extra = {}) {
  const key = getKey();
  return key ? {...extra, Authorization: `Bearer ${key}`} : {...extra};
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  let detail = null;
  try {
    const body = await response.json();
    if (body && typeof body.error === "string") {
      message = body.error;
      detail = body.detail ?? null;
    }
  } catch {
    // Not JSON (a proxy's page, say): the status line says enough.
  }
  if (response.status === 401) unauthorizedHandler(message);
  return new ApiError(response.status, message, detail);
}

function withQuery(path, query) {
  if (!query) return path;
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(query)) {
    if (value !== null && value !== undefined && value !== "") params.set(key, value);
  }
  const text = params.toString();
  return text ? `${path}${path.includes("?") ? "&" : "?"}${text}` : path;
}

/**
 * A call to the API. options: method, query (object), json (a body to send as JSON), body
 * (FormData or Blob), signal, raw (return the Response instead of its JSON).
 * Throws ApiError for an error answer.
 */
export async function api(path, {method = "GET", query, json, body, signal, raw = false} = {}) {
  const headers = authHeaders({Accept: "application/json"});
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  const response = await fetch(withQuery(path, query), {method, headers, body, signal, cache: "no-store"});
  if (!response.ok) throw await errorOf(response);
  if (raw) return response;
  if (response.status === 204) return null;
  return response.json();
}

/** Fetches path (with the key) and hands it to the browser as a download named filename. */
export async function download(path, filename, {query, signal} = {}) {
  const response = await api(path, {query, signal, raw: true});
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  const anchor = document.createElement("a");
  anchor.href = url;
  anchor.download = filename;
  anchor.hidden = true;
  document.body.append(anchor);
  anchor.click();
  anchor.remove();
  // The download has started by the time the click returns; the URL is no longer needed
  // soon after (revoking at once can cancel it in some browsers).
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
  return blob.size;
}

function parseData(text) {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

/**
 * Reads a Server-Sent Events stream (a job's events) until its "end" event, calling
 * onEvent({type, id, data}) for each. A dropped connection is resumed after the server's
 * retry delay from the last event id (Last-Event-ID), so no event is missed or repeated;
 * onConnect() and onDisconnect() say when the stream is up and when it dropped.
 * Returns when the stream ended or signal aborted; throws ApiError for 4xx answers.
 */
export async function followEvents(path, {onEvent, onConnect, onDisconnect, signal}) {
  let lastId = null;
  let retry = 2000;
  while (!signal.aborted) {
    let ended = false;
    try {
      const headers = authHeaders({Accept: "text/event-stream"});
      if (lastId !== null) headers["Last-Event-ID"] = lastId;
      const response = await fetch(path, {headers, signal, cache: "no-store"});
      if (!response.ok) throw await errorOf(response);
      onConnect?.();
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      let type = "";
      let id = null;
      let data = [];
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += value;
        const lines = buffer.split("\n");
        buffer = lines.pop();
        for (const rawLine of lines) {
          const line = rawLine.endsWith("\r") ? rawLine.slice(0, -1) : rawLine;
          if (line === "") {
            if (data.length) {
              if (id !== null) lastId = id;
              const event = {type: type || "message", id, data: parseData(data.join("\n"))};
              if (event.type === "end") ended = true;
              onEvent(event);
            }
            type = "";
            id = null;
            data = [];
            continue;
          }
          if (line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let value = colon < 0 ? "" : line.slice(colon + 1);
          if (value.startsWith(" ")) value = value.slice(1);
          if (field === "event") type = value;
          else if (field === "data") data.push(value);
          else if (field === "id") id = value;
          else if (field === "retry" && /^\d+$/.test(value)) retry = Number(value);
        }
      }
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof ApiError && error.status < 500) throw error;
      // A network error or a 5xx: try again below.
    }
    if (ended) return;
    onDisconnect?.();
    await new Promise((resolve) => {
      const timer = setTimeout(resolve, retry);
      signal.addEventListener("abort", () => {
        clearTimeout(timer);
        resolve();
      }, {once: true});
    });
  }
}
