// One runtime: its state, settings (settings.js), unsaved changes (save, reset), runner log
// (live), results and the cell console.

import { follow, get, post } from "./api.js";
import { cellConsole } from "./cells.js";
import { bytes, clear, clock, dot, h, when } from "./dom.js";
import { errorText, idleText, runtimeActions, stateText } from "./runtimes.js";
import { settingsPanel } from "./settings.js";

function logLine(entry) {
  const what = entry.state || entry.event || "";
  return h(
    "li",
    { class: entry.state ? `log-state log-${entry.state}` : "log-event" },
    h("time", { datetime: entry.at, title: when(entry.at) }, clock(entry.at)),
    h("strong", {}, what),
    entry.reason ? h("span", { class: "reason" }, entry.reason) : null,
    entry.message ? h("span", { class: "message" }, entry.message) : null,
  );
}

function changesPanel(rt, report) {
  const box = h("div", { id: "changes" });
  const save = h(
    "form",
    {
      class: "save",
      onsubmit: async (event) => {
        event.preventDefault();
        const data = new FormData(event.target);
        report("");
        try {
          let op = await post(`/runtimes/${rt.id}/save`, {
            environment: data.get("environment"),
            message: data.get("message"),
            tag: data.get("tag") || null,
          });
          report(`Saving… (${op.phase || op.status})`, "ok");
          while (op.status === "running") op = await get(`/operations/${op.id}?wait=20`);
          if (op.status === "failed") report(op.error ? `${op.error.code}: ${op.error.message}` : op.message);
          else report(`Saved as ${op.result.version || op.result.ref || "a new version"}.`, "ok");
          refresh();
        } catch (err) {
          report(errorText(err));
        }
      },
    },
    h("input", { name: "environment", placeholder: "save as (team/)name", required: true, size: 16 }),
    h("input", { name: "message", placeholder: "message", size: 20 }),
    h("input", { name: "tag", placeholder: "tag (optional)", size: 8 }),
    h("button", { type: "submit" }, "Save"),
  );
  async function refresh() {
    let changes;
    try {
      changes = await get(`/runtimes/${rt.id}/changes`);
    } catch (err) {
      clear(box, h("p", { class: "muted" }, errorText(err)));
      return;
    }
    if (!changes.length) {
      clear(box, h("p", { class: "muted", id: "no-changes" }, "No unsaved changes."));
      return;
    }
    clear(
      box,
      h("p", { class: "notice", id: "unsaved" }, `Unsaved changes: ${changes.length} path${changes.length === 1 ? "" : "s"} differ from ${rt.environment}.`),
      h(
        "table",
        { class: "changes" },
        h("tbody", {}, changes.map((c) => h("tr", { class: `change-${c.kind}` }, h("td", {}, c.kind), h("td", { class: "path" }, c.path), h("td", { class: "num" }, bytes(c.size))))),
      ),
      save,
      h("button", { type: "button", id: "reset-changes", onclick: async () => {
        report("");
        try {
          await post(`/runtimes/${rt.id}/reset`);
          report("Reset: the runtime boots from its version again.", "ok");
        } catch (err) {
          report(errorText(err));
        }
      } }, "Reset (throw them away)"),
    );
  }
  return { node: h("section", { class: "card" }, h("h2", {}, "Unsaved changes"), box), refresh };
}

function resultsPanel(rt) {
  const list = h("ul", { class: "results" });
  async function refresh() {
    try {
      const results = await get(`/runtimes/${rt.id}/results`);
      clear(list, results.length ? results.map((r) => h("li", {}, h("button", { type: "button", class: "link", onclick: () => download(r) }, r.path), " ", h("span", { class: "muted" }, `${bytes(r.size)} · ${clock(r.created_at)}`))) : h("li", { class: "muted" }, "Files cells write under /results show here."));
    } catch (err) {
      clear(list, h("li", { class: "muted" }, errorText(err)));
    }
  }
  async function download(r) {
    const blob = await get(`/results/${r.id}/content`);
    const url = URL.createObjectURL(blob);
    const a = h("a", { href: url, download: r.path.split("/").pop() });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }
  return { node: h("section", { class: "card" }, h("h2", {}, "Results"), list), refresh };
}

export function runtimeView(root, id, store) {
  const stops = [];
  let built = null;

  function build(rt) {
    const message = h("p", { class: "error", role: "alert", id: "error" });
    const report = (text, kind = "error") => {
      message.textContent = text;
      message.className = kind === "ok" ? "ok" : "error";
    };
    const head = h("div", { class: "bar runtime-head" });
    const log = h("ol", { class: "log", id: "log" });
    const changes = changesPanel(rt, report);
    const results = resultsPanel(rt);
    const settings = settingsPanel(rt);
    const cells = cellConsole(rt, {
      onFinished: () => {
        changes.refresh();
        results.refresh();
      },
    });
    stops.push(cells.close);
    stops.push(
      follow(`/runtimes/${rt.id}/log/events`, {
        onEvent: ({ event, data }) => {
          if (event === "entry") {
            const stick = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
            log.append(logLine(data));
            if (stick) log.scrollTop = log.scrollHeight;
          }
          return event === "gone" ? "stop" : undefined;
        },
        onError: (err) => report(errorText(err)),
      }),
    );
    clear(
      root,
      h("p", { class: "crumbs" }, h("a", { href: "#/" }, "Runtimes"), " / ", rt.name),
      head,
      message,
      h(
        "div",
        { class: "columns" },
        h("div", { class: "main" }, cells.node),
        h(
          "div",
          { class: "side" },
          changes.node,
          h("section", { class: "card" }, h("h2", {}, "Runner log"), log),
          h("section", { class: "card" }, h("h2", {}, "Settings"), settings.node),
          results.node,
        ),
      ),
    );
    changes.refresh();
    results.refresh();
    return { head, report, changes, settings, state: rt.state };
  }

  function show(rt) {
    if (!built) built = build(rt);
    else built.settings.update(rt);
    const facts = [
      ["environment", rt.environment],
      ["machine", rt.machine_type],
      ["type", rt.kernel ? `${rt.type} (${rt.kernel})` : rt.type],
      ["runner", rt.runner],
      ...(rt.node ? [["node", rt.node]] : []),
    ];
    clear(
      built.head,
      dot(rt),
      h("h1", { id: "runtime-name" }, rt.name),
      h("span", { class: "state", id: "state" }, stateText(rt)),
      runtimeActions(rt, built.report, { afterDelete: () => (location.hash = "#/") }),
      h("span", { class: "facts" }, facts.map(([k, v]) => h("span", {}, h("span", { class: "muted" }, `${k} `), v))),
      h("span", { class: "muted idle" }, idleText(rt)),
      rt.unreachable ? h("span", { class: "muted" }, rt.unreachable) : null,
    );
    document.title = `envctl — ${rt.name}`;
    if (built.state !== rt.state) {
      built.state = rt.state;
      if (rt.state === "running" || rt.state === "stopped") built.changes.refresh();
    }
  }

  function fromStore() {
    const rt = store.runtimes.get(id);
    if (rt) show(rt);
    else if (store.loaded) {
      clear(root, h("p", { class: "crumbs" }, h("a", { href: "#/" }, "Runtimes")), h("p", { class: "error", role: "alert" }, `runtime_not_found: runtime ${id} does not exist (or was deleted)`));
    }
  }

  clear(root, h("p", { class: "muted" }, "Loading…"));
  fromStore();
  const off = store.on((change) => {
    if (change.kind === "snapshot" || (change.kind === "runtime" && change.runtime.id === id) || (change.kind === "removed" && change.id === id)) {
      fromStore();
    }
  });
  return () => {
    off();
    stops.forEach((stop) => stop());
  };
}
