// The cell console of one runtime: type a cell, run it (Shift-Enter), watch its outputs arrive,
// interrupt it; earlier executions below, newest first.

import { follow, get, post } from "./api.js";
import { clock, h } from "./dom.js";
import { addOutput } from "./outputs.js";
import { errorText } from "./runtimes.js";

const FINAL = new Set(["ok", "error", "interrupted"]);

function cellCard(ex) {
  const status = h("span", { class: `status status-${ex.status}`, dataset: { status: ex.status } }, ex.status);
  const outputs = h("div", { class: "outputs" });
  const card = h(
    "article",
    { class: "cell", dataset: { id: ex.id, seq: ex.seq } },
    h(
      "header",
      {},
      h("span", { class: "seq" }, `[${ex.seq}]`),
      h("span", { class: "lang" }, ex.language),
      status,
      h("span", { class: "muted" }, clock(ex.created_at)),
      ex.submitted_by ? h("span", { class: "muted by" }, `by ${ex.submitted_by}`) : null,
    ),
    h("pre", { class: "code" }, ex.code),
    outputs,
  );
  const setStatus = (value, truncated = false) => {
    status.textContent = truncated ? `${value} (output truncated)` : value;
    status.className = `status status-${value}`;
    status.dataset.status = value;
    card.dataset.status = value;
  };
  setStatus(ex.status, ex.truncated);
  return { card, outputs, setStatus };
}

export function cellConsole(runtime, { onFinished }) {
  const error = h("p", { class: "error", role: "alert" });
  const code = h("textarea", {
    id: "code",
    rows: 6,
    spellcheck: "false",
    placeholder: "A cell: Python or Bash. Shift-Enter runs it.",
  });
  const language = h(
    "select",
    { id: "language", "aria-label": "language" },
    ["python", "bash"].map((l) => h("option", { value: l, selected: l === runtime.language }, l)),
  );
  const run = h("button", { type: "submit", id: "run" }, "Run");
  const interrupt = h("button", { type: "button", id: "interrupt", disabled: true }, "Interrupt");
  const list = h("div", { class: "cells", id: "cells" });
  const stops = new Set();
  const shown = new Set(); // execution ids with a card: the first listing and a new cell may both carry one
  let current = null;

  function watch(ex, view) {
    let stop = null;
    stop = follow(`/executions/${ex.id}/events`, {
      onEvent: ({ event, data }) => {
        if (event === "output") {
          if (view.card.dataset.status === "queued") view.setStatus("running"); // it prints: it runs
          addOutput(view.outputs, data);
        }
        if (event === "status") {
          view.setStatus(data.status, data.truncated);
          stops.delete(stop);
          if (current === ex.id) {
            current = null;
            interrupt.disabled = true;
          }
          onFinished?.(ex);
          return "stop";
        }
        return undefined;
      },
      onError: (err) => {
        error.textContent = errorText(err);
      },
    });
    stops.add(stop);
  }

  async function submit() {
    const text = code.value;
    if (!text.trim()) return;
    error.textContent = "";
    run.disabled = true;
    try {
      const ex = await post(`/runtimes/${runtime.id}/executions`, { code: text, language: language.value });
      current = ex.id;
      interrupt.disabled = false;
      if (!shown.has(ex.id)) {
        shown.add(ex.id);
        const view = cellCard(ex);
        list.prepend(view.card);
        watch(ex, view);
      }
    } catch (err) {
      error.textContent = errorText(err);
    } finally {
      run.disabled = false;
    }
  }

  code.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && event.shiftKey) {
      event.preventDefault();
      submit();
    }
  });
  interrupt.addEventListener("click", async () => {
    if (!current) return;
    try {
      await post(`/executions/${current}/interrupt`);
    } catch (err) {
      error.textContent = errorText(err);
    }
  });

  get(`/runtimes/${runtime.id}/executions`)
    .then((executions) => {
      for (const ex of executions) {
        if (shown.has(ex.id)) continue;
        shown.add(ex.id);
        const view = cellCard(ex);
        list.append(view.card);
        if (FINAL.has(ex.status)) ex.outputs.forEach((out) => addOutput(view.outputs, out));
        else watch(ex, view);
      }
    })
    .catch((err) => {
      error.textContent = errorText(err);
    })
    .finally(() => {
      list.dataset.loaded = "true";
    });

  const node = h(
    "section",
    { class: "card console" },
    h("h2", {}, "Cells"),
    h(
      "form",
      {
        onsubmit: (event) => {
          event.preventDefault();
          submit();
        },
      },
      code,
      h("div", { class: "bar" }, language, run, interrupt, h("span", { class: "muted" }, "Shift-Enter runs the cell")),
    ),
    error,
    list,
  );
  return { node, close: () => stops.forEach((stop) => stop()) };
}
