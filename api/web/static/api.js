// The REST API and its event streams. The token lives in this browser's local storage and
// travels only in the Authorization header, never in an address.

const TOKEN_KEY = "envctl.token";

export const token = {
  get: () => localStorage.getItem(TOKEN_KEY),
  set: (value) => localStorage.setItem(TOKEN_KEY, value),
  forget: () => localStorage.removeItem(TOKEN_KEY),
};

// An error as the API gave it: its code, message and details, and the HTTP status.
export class ApiError extends Error {
  constructor(status, code, message, details = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }

  toString() {
    return `${this.code}: ${this.message}`;
  }
}

const listeners = { unauthorized: new Set() };

export function onUnauthorized(callback) {
  listeners.unauthorized.add(callback);
}

async function errorOf(resp) {
  let body = null;
  try {
    body = await resp.json();
  } catch {
    body = null;
  }
  const e = body && body.error;
  if (e && typeof e === "object") return new ApiError(resp.status, e.code, e.message, e.details || {});
  return new ApiError(resp.status, `http_${resp.status}`, resp.statusText || "the server answered with an error");
}

function headers(extra = {}, bearer = token.get()) {
  return bearer ? { Authorization: `Bearer ${bearer}`, ...extra } : { ...extra };
}

export async function api(method, path, body = undefined, { bearer, signal } = {}) {
  const init = { method, headers: headers({ Accept: "application/json" }, bearer ?? token.get()), signal };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (exc) {
    if (exc.name === "AbortError") throw exc;
    throw new ApiError(0, "unreachable", "the envctl server does not answer; is `envctl serve` running?");
  }
  if (!resp.ok) {
    const err = await errorOf(resp);
    if (resp.status === 401 && bearer === undefined) listeners.unauthorized.forEach((cb) => cb(err));
    throw err;
  }
  if (resp.status === 204) return null;
  const type = resp.headers.get("content-type") || "";
  return type.includes("json") ? resp.json() : resp.blob();
}

export const get = (path, opts) => api("GET", path, undefined, opts);
export const post = (path, body, opts) => api("POST", path, body, opts);
export const patch = (path, body, opts) => api("PATCH", path, body, opts);
export const del = (path, opts) => api("DELETE", path, undefined, opts);

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Follow a server-sent event stream through fetch (EventSource cannot send the token as a
// header). onEvent({event, data, id}) returning "stop" ends it; a dropped connection is
// resumed with Last-Event-ID, soon (a browser cuts streams when the machine's network
// changes). Returns a function that stops following.
export function follow(path, { onEvent, onOpen, onError, onEnd } = {}) {
  const control = new AbortController();
  let stopped = false;
  let lastId = null;
  let retry = 500; // the server's "retry:" overrides it; consecutive failures back off to 10 s
  let failures = 0;

  const stop = () => {
    stopped = true;
    control.abort();
  };

  function dispatch(block) {
    let event = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
      else if (field === "id") lastId = value;
      else if (field === "retry" && /^\d+$/.test(value)) retry = Number(value);
    }
    if (!data.length) return false;
    return onEvent({ event, data: JSON.parse(data.join("\n")), id: lastId }) === "stop";
  }

  (async () => {
    while (!stopped) {
      try {
        const extra = { Accept: "text/event-stream" };
        if (lastId !== null) extra["Last-Event-ID"] = lastId;
        const resp = await fetch(path, { headers: headers(extra), signal: control.signal, cache: "no-store" });
        if (!resp.ok) {
          const err = await errorOf(resp);
          onError?.(err);
          if (resp.status === 401) listeners.unauthorized.forEach((cb) => cb(err));
          if (resp.status < 500) return; // asking again would get the same answer
        } else {
          onOpen?.();
          failures = 0;
          const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
          let buffer = "";
          for (;;) {
            const { value, done } = await reader.read();
            if (done) break;
            buffer += value.replace(/\r\n?/g, "\n");
            let end;
            while ((end = buffer.indexOf("\n\n")) >= 0) {
              const block = buffer.slice(0, end);
              buffer = buffer.slice(end + 2);
              if (dispatch(block)) {
                stop();
                onEnd?.();
                return;
              }
            }
          }
        }
      } catch (exc) {
        if (stopped || exc.name === "AbortError") return;
        onError?.(new ApiError(0, "stream_interrupted", "lost the connection to the server; reconnecting"));
      }
      if (!stopped) await sleep(Math.min(retry * 2 ** failures, 10000));
      failures += 1;
    }
  })();
  return stop;
}
