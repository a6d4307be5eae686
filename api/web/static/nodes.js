// Nodes: the machines runtimes run on (GET /nodes): health, capacity, labels, runtimes.

import { get } from "./api.js";
import { bytes, clear, h } from "./dom.js";
import { errorText } from "./runtimes.js";

const REFRESH_MS = 5000;

function health(n) {
  const ok = n.health.state === "ready" && n.health.availability === "active";
  const text = `${n.health.state} / ${n.health.availability}`;
  return h(
    "span",
    { class: ok ? "badge" : "badge warn", title: n.health.message || text },
    n.health.message ? `${text} (${n.health.message})` : text,
  );
}

function capacity(n) {
  const generic = Object.entries(n.capacity.generic_resources || {}).map(([k, v]) => `${v} ${k}`);
  return [`${n.capacity.nano_cpus / 1e9} CPU`, bytes(n.capacity.memory), ...generic].join(", ");
}

function runtimesOn(n, store) {
  const links = n.runtimes.map((id) => {
    const rt = store.runtimes.get(id);
    return h("a", { href: `#/runtimes/${encodeURIComponent(id)}` }, rt ? rt.name : id);
  });
  const hidden = n.runtimes_total - n.runtimes.length;
  const parts = [];
  links.forEach((link, i) => parts.push(i ? ", " : "", link));
  if (hidden) parts.push(h("span", { class: "muted" }, ` +${hidden} not yours`));
  return parts.length ? parts : h("span", { class: "muted" }, "none");
}

export function nodesView(root, store) {
  const box = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  clear(root, h("section", { class: "card" }, h("h1", {}, "Nodes"), box));
  let live = true;
  let timer = null;
  const load = () =>
    get("/nodes")
      .then((nodes) => {
        if (!live) return;
        clear(
          box,
          h(
            "table",
            { class: "nodes" },
            h("thead", {}, h("tr", {}, ["name", "role", "health", "capacity", "labels", "runtimes"].map((t) => h("th", {}, t)))),
            h(
              "tbody",
              {},
              nodes.map((n) =>
                h(
                  "tr",
                  { dataset: { node: n.name } },
                  h("td", { class: "name" }, n.name),
                  h("td", {}, n.role),
                  h("td", { class: "health" }, health(n)),
                  h("td", {}, capacity(n)),
                  h("td", { class: "labels" }, Object.entries(n.labels).map(([k, v]) => h("span", { class: "tag" }, `${k}=${v}`))),
                  h("td", { class: "runs" }, runtimesOn(n, store)),
                ),
              ),
            ),
          ),
        );
      })
      .catch((err) => live && clear(box, h("p", { class: "error", role: "alert" }, errorText(err))))
      .finally(() => {
        if (live) timer = setTimeout(load, REFRESH_MS);
      });
  load();
  return () => {
    live = false;
    clearTimeout(timer);
  };
}
