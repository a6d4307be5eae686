// Environments: the list with tags, and one environment's versions as a lineage tree (each
// version under its parent, across environments, down from the base image).

import { get } from "./api.js";
import { bytes, clear, h, when } from "./dom.js";
import { errorText } from "./runtimes.js";

const envLink = (name, text = name) => h("a", { href: `#/environments/${encodeURIComponent(name)}` }, text);
const nameOf = (ref) => ref.split("@")[0];

function tagChips(tags) {
  return h("span", { class: "tags" }, tags.map((t) => h("span", { class: "tag" }, t)));
}

export function environmentsView(root) {
  const box = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  clear(root, h("section", { class: "card" }, h("h1", {}, "Environments"), box));
  let live = true;
  get("/environments")
    .then((envs) => {
      if (!live) return;
      clear(
        box,
        h(
          "table",
          { class: "environments" },
          h("thead", {}, h("tr", {}, ["name", "latest", "versions", "tags", "owner"].map((t) => h("th", {}, t)))),
          h(
            "tbody",
            {},
            envs.map((env) =>
              h(
                "tr",
                {},
                h("td", { class: "name" }, envLink(env.name)),
                h("td", {}, env.latest || ""),
                h("td", { class: "num" }, env.versions.length),
                h("td", {}, tagChips(Object.entries(env.tags).map(([tag, ref]) => `${tag} → ${ref}`))),
                h("td", {}, env.owner || "—"),
              ),
            ),
          ),
        ),
      );
    })
    .catch((err) => clear(box, h("p", { class: "error", role: "alert" }, errorText(err))));
  return () => {
    live = false;
  };
}

// The versions that matter to `name` (its own, their ancestors and descendants) as a tree.
export function lineageTree(envs, name) {
  const byRef = new Map();
  for (const env of envs) for (const v of env.versions) byRef.set(v.ref, v);
  const children = new Map();
  for (const v of byRef.values()) {
    if (v.parent) children.set(v.parent, [...(children.get(v.parent) || []), v]);
  }
  const keep = new Set();
  const own = [...byRef.values()].filter((v) => nameOf(v.ref) === name);
  for (const v of own) {
    for (let p = v; p && !keep.has(p.ref); p = p.parent ? byRef.get(p.parent) : null) keep.add(p.ref);
    const below = [v];
    while (below.length) {
      const next = below.pop();
      keep.add(next.ref);
      below.push(...(children.get(next.ref) || []));
    }
  }
  const node = (v) =>
    h(
      "li",
      { class: nameOf(v.ref) === name ? "own" : "", dataset: { ref: v.ref } },
      h(
        "div",
        { class: "version" },
        nameOf(v.ref) === name ? h("strong", {}, v.ref) : envLink(nameOf(v.ref), v.ref),
        v.tags.length ? tagChips(v.tags) : null,
        h("span", { class: "message" }, v.message || "(no message)"),
        h("span", { class: "muted" }, `${v.author || "?"} · ${when(v.created_at)} · +${bytes(v.size_added)}`),
        v.parent_hidden ? h("span", { class: "muted hidden-parent" }, "on a version you may not see (hidden)") : null,
      ),
      (children.get(v.ref) || []).some((c) => keep.has(c.ref))
        ? h("ul", {}, (children.get(v.ref) || []).filter((c) => keep.has(c.ref)).map(node))
        : null,
    );
  const roots = [...keep].map((ref) => byRef.get(ref)).filter((v) => !v.parent || !keep.has(v.parent));
  return h("ul", { class: "tree", id: "lineage" }, roots.map(node));
}

const refPath = (ref) => ref.split("/").map(encodeURIComponent).join("/");

// The packages one version adds (green), removes (red) and changes (old → new) against another.
export function diffList(diff) {
  const kinds = { deb: "Debian packages", python: "Python packages" };
  return Object.entries(kinds).map(([kind, title]) => {
    const d = diff[kind];
    const items = [
      ...d.added.map((p) => h("li", { class: "added" }, `+ ${p.name} ${p.version}`)),
      ...d.removed.map((p) => h("li", { class: "removed" }, `− ${p.name} ${p.version}`)),
      ...d.changed.map((c) => h("li", { class: "changed" }, `~ ${c.name} ${c.old} → ${c.new}`)),
    ];
    return h(
      "div",
      { class: "pkg-kind", dataset: { kind } },
      h("h3", {}, `${title}: ${d.added.length} added, ${d.removed.length} removed, ${d.changed.length} changed`),
      items.length ? h("ul", { class: "pkg-diff" }, items) : h("p", { class: "muted" }, "no difference"),
    );
  });
}

function packagesDiff(env, envs) {
  const byRef = new Map();
  for (const e of envs) for (const v of e.versions) byRef.set(v.ref, v);
  const refs = env.versions.map((v) => v.ref).reverse();
  for (const v of env.versions) for (let p = byRef.get(v.parent); p && !refs.includes(p.ref); p = byRef.get(p.parent)) refs.push(p.ref);
  const latest = byRef.get(env.latest || refs[0]);
  const choose = (id, label, selected) =>
    h("label", {}, `${label} `, h("select", { id }, refs.map((ref) => h("option", { value: ref, selected: ref === selected }, ref))));
  const out = h("div", { id: "packages-diff" });
  const oldSel = choose("diff-old", "from", latest && latest.parent ? latest.parent : refs[refs.length - 1]);
  const newSel = choose("diff-new", "to", latest ? latest.ref : refs[0]);
  const compare = async () => {
    const from = oldSel.querySelector("select").value;
    const to = newSel.querySelector("select").value;
    clear(out, h("p", { class: "muted" }, "Reading packages… (the first time a version is read takes a few seconds)"));
    try {
      const diff = await get(`/environments/${refPath(to)}/packages/diff?against=${encodeURIComponent(from)}`);
      clear(out, h("p", { class: "muted" }, `${diff.against} → ${diff.ref}`), diffList(diff));
    } catch (err) {
      clear(out, h("p", { class: "error", role: "alert" }, errorText(err)));
    }
  };
  return h(
    "div",
    { class: "packages" },
    h("h2", {}, "Packages"),
    h("p", { class: "muted" }, "Choose two versions to see the packages the second adds, removes and changes."),
    h("div", { class: "diff-choice" }, oldSel, " ", newSel, " ", h("button", { type: "button", id: "diff-compare", onclick: compare }, "Compare")),
    out,
  );
}

export function environmentView(root, name) {
  const box = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  clear(root, h("p", { class: "crumbs" }, h("a", { href: "#/environments" }, "Environments"), " / ", name), h("section", { class: "card" }, h("h1", {}, name), box));
  let live = true;
  get("/environments")
    .then((envs) => {
      if (!live) return;
      const env = envs.find((e) => e.name === name);
      if (!env) {
        clear(box, h("p", { class: "error", role: "alert" }, `environment_not_found: there is no environment ${name}`));
        return;
      }
      clear(
        box,
        h("p", {}, `Owner: ${env.owner || "—"} · latest: ${env.latest || "—"} · `, tagChips(Object.entries(env.tags).map(([t, r]) => `${t} → ${r}`))),
        h("h2", {}, "Lineage"),
        h("p", { class: "muted" }, "Each version under the version it was saved from, down from its base image."),
        lineageTree(envs, name),
        packagesDiff(env, envs),
      );
    })
    .catch((err) => clear(box, h("p", { class: "error", role: "alert" }, errorText(err))));
  return () => {
    live = false;
  };
}
