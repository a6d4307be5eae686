// Apps (GET /teams/{team}/apps): each app of the caller's teams with a state dot per instance,
// its deployments (who deployed what, when, on which version) and its own output, live.

import { get } from "./api.js";
import { clear, h, when } from "./dom.js";
import { errorText } from "./runtimes.js";

const REFRESH_MS = 3000;
const COLORS = { running: "green", starting: "yellow", restarting: "yellow", downloading: "yellow", pending: "gray", failed: "red", stopped: "gray" };

function instanceDot(i) {
  const color = COLORS[i.status] || "gray";
  const title = `deployment ${i.deployment}: ${i.status}${i.restarts ? `, ${i.restarts} restarts` : ""}${i.message ? ` (${i.message})` : ""}`;
  return h("span", { class: `dot dot-${color}`, title, dataset: { state: i.status } });
}

function deploymentRow(d) {
  return h(
    "tr",
    { dataset: { number: String(d.number) } },
    h("td", {}, String(d.number)),
    h("td", { class: "status" }, h("span", { class: `dot dot-${COLORS[d.status] || "gray"}` }), ` ${d.status}`),
    h("td", {}, d.author),
    h("td", {}, when(d.created_at)),
    h("td", {}, d.version + (d.rollback_of ? ` (rollback of ${d.rollback_of})` : "")),
    h("td", { class: "message" }, d.message),
  );
}

function appCard(a, logs) {
  const outdated = a.running.some((i) => (i.secrets_outdated || []).length);
  return h(
    "section",
    { class: "card app", dataset: { app: `${a.team}/${a.name}` } },
    h(
      "h2",
      {},
      h("span", { class: "instances" }, a.running.map(instanceDot)),
      " ",
      h("a", { href: a.url, target: "_blank", rel: "noopener" }, `${a.team}/${a.name}`),
      h("span", { class: "tag" }, a.access),
      a.current ? h("span", { class: "muted" }, ` serving deployment ${a.current}`) : h("span", { class: "muted" }, " not serving"),
      outdated ? h("span", { class: "badge warn" }, "out of date: secrets changed") : "",
    ),
    h(
      "table",
      { class: "deployments" },
      h("thead", {}, h("tr", {}, ["#", "status", "by", "when", "version", ""].map((t) => h("th", {}, t)))),
      h("tbody", {}, a.deployments.map(deploymentRow)),
    ),
    h("details", { open: true }, h("summary", {}, "output"), h("pre", { class: "app-output" }, logs || "")),
  );
}

async function logsOf(a) {
  const blob = await get(`/teams/${encodeURIComponent(a.team)}/apps/${encodeURIComponent(a.name)}/logs`);
  return blob && blob.text ? blob.text() : String(blob || "");
}

export function appsView(root) {
  const box = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  clear(root, h("section", { class: "card" }, h("h1", {}, "Apps"), box));
  let live = true;
  let timer = null;
  const load = async () => {
    try {
      const teams = (await get("/teams")).filter((t) => t.role).map((t) => t.name);
      const apps = (await Promise.all(teams.map((t) => get(`/teams/${encodeURIComponent(t)}/apps`)))).flat();
      const logs = await Promise.all(apps.map((a) => logsOf(a).catch((err) => errorText(err))));
      if (!live) return;
      if (!apps.length) {
        clear(box, h("p", { class: "muted" }, "No apps in your teams: `envctl app deploy NOTEBOOK --team TEAM --name NAME`."));
        return;
      }
      clear(box, ...apps.map((a, n) => appCard(a, logs[n])));
    } catch (err) {
      if (live) clear(box, h("p", { class: "error", role: "alert" }, errorText(err)));
    } finally {
      if (live) timer = setTimeout(load, REFRESH_MS);
    }
  };
  load();
  return () => {
    live = false;
    clearTimeout(timer);
  };
}
