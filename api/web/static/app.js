// The page: sign-in, the live list of runtimes every view shares, and the routes
// (#/ the runtimes, #/runtimes/ID one runtime, #/environments and #/environments/NAME, #/nodes, #/apps).

import { ApiError, follow, get, onUnauthorized, token } from "./api.js";
import { clear, h } from "./dom.js";
import { environmentsView, environmentView } from "./environments.js";
import { appsView } from "./apps.js";
import { nodesView } from "./nodes.js";
import { runtimeView } from "./runtime.js";
import { runtimesView } from "./runtimes.js";

const view = document.getElementById("view");
const nav = document.getElementById("nav");
const live = document.getElementById("live");
const signOutButton = document.getElementById("sign-out");

// The caller's runtimes, kept current by GET /runtimes/events; views listen to it.
export const store = {
  runtimes: new Map(),
  loaded: false,
  listeners: new Set(),
  stop: null,
  on(callback) {
    this.listeners.add(callback);
    return () => this.listeners.delete(callback);
  },
  emit(change) {
    for (const callback of [...this.listeners]) callback(change);
  },
  start() {
    this.stop?.();
    this.stop = follow("/runtimes/events", {
      onOpen: () => {
        live.hidden = false;
        live.classList.remove("off");
      },
      onError: (err) => {
        live.classList.add("off");
        live.title = err.toString();
      },
      onEvent: ({ event, data }) => {
        if (event === "snapshot") {
          this.runtimes = new Map(data.map((rt) => [rt.id, rt]));
          this.loaded = true;
          this.emit({ kind: "snapshot" });
        } else if (event === "runtime") {
          this.runtimes.set(data.id, data);
          this.emit({ kind: "runtime", runtime: data });
        } else if (event === "removed") {
          this.runtimes.delete(data.id);
          this.emit({ kind: "removed", id: data.id });
        }
        return undefined;
      },
    });
  },
  close() {
    this.stop?.();
    this.stop = null;
    this.runtimes = new Map();
    this.loaded = false;
  },
};

let cleanup = null;

function route() {
  cleanup?.();
  cleanup = null;
  if (!token.get()) {
    showSignIn();
    return;
  }
  if (!store.stop) {
    nav.hidden = false;
    signOutButton.hidden = false;
    store.start();
  }
  let hash = location.hash.replace(/^#\/?/, "");
  try {
    hash = decodeURIComponent(hash);
  } catch {
    // a hand-made address with a broken escape: take it as it is
  }
  const [section, ...rest] = hash.split("/");
  const id = rest.join("/");
  for (const link of nav.querySelectorAll("a")) {
    const current = ["environments", "nodes", "apps"].includes(section) ? section : "runtimes";
    link.classList.toggle("current", link.dataset.nav === current);
  }
  if (section === "runtimes" && id) cleanup = runtimeView(view, id, store);
  else if (section === "environments" && id) cleanup = environmentView(view, id);
  else if (section === "environments") cleanup = environmentsView(view);
  else if (section === "nodes") cleanup = nodesView(view, store);
  else if (section === "apps") cleanup = appsView(view);
  else cleanup = runtimesView(view, store);
  document.title = `envctl — ${["environments", "nodes", "apps"].includes(section) ? section : "runtimes"}`;
}

function showSignIn(message = "") {
  nav.hidden = true;
  live.hidden = true;
  signOutButton.hidden = true;
  const input = h("input", {
    id: "token",
    type: "password",
    autocomplete: "off",
    spellcheck: "false",
    placeholder: "API token",
    required: true,
  });
  const error = h("p", { class: "error", role: "alert" }, message);
  const form = h(
    "form",
    {
      class: "card sign-in",
      onsubmit: async (event) => {
        event.preventDefault();
        const value = input.value.trim();
        error.textContent = "";
        try {
          await get("/runtimes", { bearer: value });
        } catch (err) {
          error.textContent = err instanceof ApiError ? err.toString() : String(err);
          return;
        }
        token.set(value);
        signedIn();
      },
    },
    h("h1", {}, "Sign in"),
    h(
      "p",
      {},
      "Paste an envctl API token. The admin's is in the data directory's admin-token file; ",
      "the page keeps it in this browser until you sign out.",
    ),
    h("label", { for: "token" }, "Token"),
    input,
    h("button", { type: "submit", id: "sign-in" }, "Sign in"),
    error,
  );
  clear(view, form);
  input.focus();
}

function signedIn() {
  store.close();
  route();
}

function signOut(message = "") {
  token.forget();
  store.close();
  cleanup?.();
  cleanup = null;
  showSignIn(message);
}

signOutButton.addEventListener("click", () => signOut());
onUnauthorized((err) => signOut(`Signed out: ${err.toString()}`));
window.addEventListener("hashchange", route);

if (token.get()) signedIn();
else showSignIn();
