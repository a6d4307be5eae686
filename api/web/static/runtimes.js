// The runtimes: a live list with state dots, and the actions on one runtime.

import { ApiError, del, get, post } from "./api.js";
import { bytes, clear, confirmButton, dot, h, relative } from "./dom.js";
import { poolSection } from "./pool.js";

export function errorText(err) {
  return err instanceof ApiError ? err.toString() : String(err);
}

// "running", "booting · downloading 12 MB of 200 MB (6%)", "error · oom: killed ..."
export function stateText(rt) {
  const parts = [rt.state];
  if (rt.origin === "attached") parts.push("attached");
  else if (rt.origin === "pool" && rt.state === "running") parts.push("from the warm pool");
  if (rt.phase) parts.push(rt.phase + progressText(rt.progress));
  if (rt.busy) parts.push("busy");
  if (rt.state === "error" && (rt.state_reason || rt.state_message)) {
    parts.push([rt.state_reason, rt.state_message].filter(Boolean).join(": "));
  }
  return parts.join(" · ");
}

// " 12 MB of 200 MB (6%)" while a download or upload with bytes runs; "" otherwise.
export function progressText(progress) {
  if (!progress || !(progress.total > 0)) return progress && progress.done > 0 ? ` ${bytes(progress.done)}` : "";
  const pct = Math.min(100, Math.floor((100 * progress.done) / progress.total));
  return ` ${bytes(progress.done)} of ${bytes(progress.total)} (${pct}%)`;
}

// A lease runtime goes when its client stops renewing (runner/runtimes/leases.py): say until when.
function leaseText(lease) {
  const at = new Date(lease.expires_at).toLocaleTimeString();
  return lease.expired
    ? `lease expired at ${at}: being stopped and deleted`
    : `deleted at ${at} unless its client renews its ${lease.seconds} s lease (a running cell does not keep it)`;
}

// When idle shutdown will happen; `full` adds why (the list shows that as a tooltip).
export function idleText(rt, full = true) {
  if (rt.state !== "running" || !rt.idle) return "";
  if (!rt.idle.shutdown_at) return rt.idle.reason || "no idle shutdown";
  const at = `stops ${relative(rt.idle.shutdown_at)}`;
  return full ? `${at} (${rt.idle.reason})` : at;
}

// Start, stop, reset and delete; an API error goes to `report` as the API gave it.
export function runtimeActions(rt, report, { afterDelete } = {}) {
  const act = (label, method, path, extra = {}) =>
    h(
      "button",
      {
        type: "button",
        dataset: { action: label.toLowerCase() },
        ...extra,
        onclick: async () => {
          report("");
          try {
            await method(path);
          } catch (err) {
            report(errorText(err));
          }
        },
      },
      label,
    );
  const running = rt.state === "running" || rt.state === "booting";
  return h(
    "span",
    { class: "actions" },
    running ? act("Stop", post, `/runtimes/${rt.id}/stop`) : act("Start", post, `/runtimes/${rt.id}/start`),
    act("Reset", post, `/runtimes/${rt.id}/reset`, { title: "throw the unsaved changes away and boot from the version" }),
    confirmButton(
      "Delete",
      "Really delete?",
      async () => {
        report("");
        try {
          await del(`/runtimes/${rt.id}`);
          afterDelete?.();
        } catch (err) {
          report(errorText(err));
        }
      },
      { dataset: { action: "delete" }, class: "danger" },
    ),
  );
}

function row(rt, report) {
  return h(
    "tr",
    { dataset: { id: rt.id } },
    h("td", {}, dot(rt)),
    h(
      "td",
      { class: "name" },
      h("a", { href: `#/runtimes/${encodeURIComponent(rt.id)}` }, rt.name),
      rt.team ? [" ", h("span", { class: "badge team", title: `shared with team ${rt.team}` }, rt.team)] : null,
      rt.lease ? [" ", h("span", { class: "badge lease", title: leaseText(rt.lease) }, "lease")] : null,
    ),
    h("td", { class: "state" }, stateText(rt), rt.unreachable ? h("div", { class: "muted" }, rt.unreachable) : null),
    h("td", {}, h("a", { href: `#/environments/${encodeURIComponent(rt.environment.split("@")[0])}` }, rt.environment)),
    h("td", {}, rt.machine_type, rt.node ? h("div", { class: "muted node" }, `on ${rt.node}`) : null),
    h("td", {}, rt.unsaved_changes ? h("span", { class: "badge warn" }, "unsaved") : ""),
    h("td", { class: "idle", title: idleText(rt) }, idleText(rt, false)),
    h("td", { class: "act" }, runtimeActions(rt, report)),
  );
}

function createForm(report) {
  const name = h("input", { name: "name", placeholder: "name", required: true, size: 12 });
  const environment = h("select", { name: "environment" });
  const language = h("select", { name: "language" }, h("option", {}, "python"), h("option", {}, "bash"));
  const machine = h("select", { name: "machine_type" });
  Promise.all([get("/environments"), get("/machine-types")])
    .then(([envs, machines]) => {
      for (const env of envs) {
        if (env.latest) environment.append(h("option", { value: env.name, selected: env.name === "python3" }, env.name));
      }
      for (const m of machines) machine.append(h("option", { value: m.name }, `${m.name} — ${m.description || `${m.cpus} CPU`}`));
    })
    .catch((err) => report(errorText(err)));
  return h(
    "form",
    {
      class: "create",
      onsubmit: async (event) => {
        event.preventDefault();
        report("");
        try {
          const rt = await post("/runtimes", {
            name: name.value,
            environment: environment.value,
            language: language.value,
            machine_type: machine.value || "small",
          });
          name.value = "";
          location.hash = `#/runtimes/${encodeURIComponent(rt.id)}`;
        } catch (err) {
          report(errorText(err));
        }
      },
    },
    name,
    environment,
    language,
    machine,
    h("button", { type: "submit" }, "Create runtime"),
  );
}

export function runtimesView(root, store) {
  const error = h("p", { class: "error", role: "alert", id: "error" });
  const report = (text) => {
    error.textContent = text;
  };
  const body = h("tbody");
  const empty = h("p", { class: "muted" }, "Loading…");
  const table = h(
    "table",
    { class: "runtimes" },
    h(
      "thead",
      {},
      h("tr", {}, ["", "name", "state", "environment", "machine", "changes", "idle shutdown", ""].map((t) => h("th", {}, t))),
    ),
    body,
  );
  clear(root, h("section", { class: "card" }, h("div", { class: "bar" }, h("h1", {}, "Runtimes"), createForm(report)), error, table, empty), poolSection());

  const rows = new Map();
  function put(rt) {
    const tr = row(rt, report);
    const old = rows.get(rt.id);
    if (old) old.replaceWith(tr);
    else body.append(tr);
    rows.set(rt.id, tr);
  }
  function all() {
    body.replaceChildren();
    rows.clear();
    for (const rt of store.runtimes.values()) put(rt);
    empty.textContent = store.runtimes.size ? "" : "No runtimes yet: create one above, or with `envctl runtime create`.";
    root.dataset.rendered = String(store.runtimes.size);
  }
  if (store.loaded) all();
  const off = store.on((change) => {
    if (change.kind === "snapshot") all();
    else if (change.kind === "runtime") put(change.runtime);
    else if (change.kind === "removed") {
      rows.get(change.id)?.remove();
      rows.delete(change.id);
    }
    empty.textContent = store.runtimes.size ? "" : "No runtimes yet.";
  });
  const ticker = setInterval(() => {
    for (const [id, tr] of rows) {
      const rt = store.runtimes.get(id);
      if (rt) tr.querySelector(".idle").textContent = idleText(rt, false);
    }
  }, 15000);
  return () => {
    off();
    clearInterval(ticker);
  };
}
