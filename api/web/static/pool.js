// The warm pool (GET /pool): what this runner keeps booted ahead, and what waits now.

import { get } from "./api.js";
import { bytes, h } from "./dom.js";

export function poolSection() {
  const body = h("p", { class: "muted" }, "Loading…");
  const section = h("section", { class: "card", id: "pool" }, h("h2", {}, "Warm pool"), body);
  get("/pool")
    .then((pool) => {
      if (!pool.targets.length && !pool.hot_budget) {
        body.textContent = "No warm pool (ENVCTL_RUNNER_POOL is not set): runtimes boot when they start.";
        return;
      }
      if (!pool.targets.length) {
        body.textContent =
          `Hot mode (${bytes(pool.hot_budget)}): nothing was booted often enough in the last hour to be kept warm yet.`;
        return;
      }
      const budget = pool.memory_budget ? ` of ${bytes(pool.memory_budget)}` : "";
      const hot = pool.hot_budget ? `; hot mode budget ${bytes(pool.hot_budget)}` : "";
      const hidden = pool.hidden ? `; ${pool.hidden} more of versions you cannot see` : "";
      body.replaceWith(
        h(
          "table",
          { class: "pool" },
          h(
            "thead",
            {},
            h("tr", {}, ["environment", "version", "machine", "why", "waiting", "booting"].map((t) => h("th", {}, t))),
          ),
          h(
            "tbody",
            {},
            pool.targets.map((t) =>
              h(
                "tr",
                {},
                h("td", {}, t.environment),
                h("td", {}, t.version || "names no version"),
                h("td", {}, t.machine_type),
                h("td", { class: t.boots == null ? "" : "hot" }, t.why),
                h("td", {}, `${t.waiting} of ${t.count}`),
                h("td", {}, String(t.booting)),
              ),
            ),
          ),
        ),
        h("p", { class: "muted" }, `memory reserved: ${bytes(pool.memory_reserved)}${budget}${hot}${hidden}`),
      );
    })
    .catch((err) => {
      body.textContent = `The pool could not be read: ${err}`;
    });
  return section;
}
