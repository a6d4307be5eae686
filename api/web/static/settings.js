// A runtime's settings panel: everything PATCH /runtimes/{id} takes. Name, language and idle
// timeout apply at once; environment, type, variables, machine type, CUDA and mounts need a
// reboot: on a stopped runtime they apply at once, on a running one they are sent for its next
// boot and shown as pending (what the field will become) until a boot applies them.
// Secrets are chosen by reference (TEAM/NAME from the team secret lists); a value is never
// shown or sent. An error naming a field (422 details.field / details.problems) is shown next
// to that field, and the form keeps what was typed.

import { get, patch } from "./api.js";
import { clear, h } from "./dom.js";
import { errorText } from "./runtimes.js";

// per mount type: [key, caption, placeholder]
const MOUNT_FIELDS = {
  git: [["url", "repository URL", "an https URL"], ["ref", "ref", "default branch"]],
  s3: [["bucket", "bucket", "bucket"], ["prefix", "prefix", "optional"]],
  volume: [["name", "volume", "NAME or TEAM/NAME"]],
};
const MOUNT_FLAGS = { s3: ["writeback", "write back on stop"], volume: ["read_only", "read-only"] };
const LABELS = {
  environment: "environment",
  type: "type",
  kernel: "kernel",
  env: "variables",
  machine_type: "machine type",
  cuda: "CUDA",
  mounts: "mounts",
};

// A GET asked up to three times when the connection was cut (status 0), as Chromium does to
// open requests when the host's network interfaces change (Docker adds one per container).
async function again(path, tries = 3) {
  for (let i = 1; ; i += 1) {
    try {
      return await get(path);
    } catch (err) {
      if (err.status !== 0 || i >= tries) throw err;
      await new Promise((resolve) => setTimeout(resolve, 300 * i));
    }
  }
}

// Stable text of a value, keys sorted, for "did it change" comparisons.
function canon(value) {
  if (Array.isArray(value)) return `[${value.map(canon).join(",")}]`;
  if (value && typeof value === "object") {
    return `{${Object.keys(value).sort().map((k) => `${JSON.stringify(k)}:${canon(value[k])}`).join(",")}}`;
  }
  return JSON.stringify(value ?? null);
}

const isRef = (v) => v !== null && typeof v === "object";
const refLabel = (ref) => (ref.team ? `${ref.team}/${ref.secret}` : ref.secret);

export function mountText(m) {
  if (m.type === "git") return `git ${m.url}${m.ref ? "@" + m.ref : ""} at ${m.target}`;
  if (m.type === "s3") return `s3://${m.bucket}/${m.prefix || ""} at ${m.target}${m.writeback ? ", written back" : ""}`;
  return `volume ${m.name} at ${m.target}${m.read_only ? " (read-only)" : ""}`;
}

// What each setting will be after the next boot: the pending value, else the runtime's.
function effective(rt) {
  const p = rt.pending || {};
  return {
    name: rt.name,
    language: rt.language,
    idle_timeout: rt.idle_timeout,
    environment: p.environment ?? rt.environment_ref,
    type: p.type ?? rt.type,
    kernel: "type" in p ? p.kernel ?? null : rt.kernel,
    machine_type: p.machine_type ?? rt.machine_type,
    cuda: "cuda" in p ? p.cuda : rt.cuda,
    env: p.env ?? rt.env ?? {},
    mounts: p.mounts ?? rt.mounts ?? [],
  };
}

// A variable's value in a sentence: a secret by its reference, long text cut.
function shortValue(v) {
  if (isRef(v)) return `secret ${refLabel(v)}`;
  return v.length > 60 ? `${v.slice(0, 60)}…` : v;
}

// "FOO = 1; BAR removed": how the pending variables differ from the runtime's.
function envChange(now, next) {
  const names = [...new Set([...Object.keys(now), ...Object.keys(next)])].sort();
  const parts = [];
  for (const n of names) {
    if (!(n in next)) parts.push(`${n} removed`);
    else if (!(n in now) || canon(now[n]) !== canon(next[n])) parts.push(`${n} = ${shortValue(next[n])}`);
  }
  return parts.join("; ") || "unchanged";
}

function pendingItems(rt) {
  const p = rt.pending || {};
  const items = [];
  if ("environment" in p) items.push(["environment", `${rt.environment} → ${p.environment}`]);
  if ("type" in p) items.push(["type", `${rt.type} → ${p.type}${p.kernel ? ` (${p.kernel})` : ""}`]);
  if ("env" in p) items.push(["env", envChange(rt.env || {}, p.env || {})]);
  if ("machine_type" in p) items.push(["machine_type", `${rt.machine_type} → ${p.machine_type}`]);
  if ("cuda" in p) items.push(["cuda", `${rt.cuda || "none"} → ${p.cuda || "none"}`]);
  if ("mounts" in p) items.push(["mounts", p.mounts.length ? p.mounts.map(mountText).join("; ") : "none"]);
  return items;
}

export function settingsPanel(initial) {
  let rt = initial;
  let shown = null; // canon() of the settings the inputs were last filled from
  let dirty = false;
  const lists = { machines: [], cuda: [], secrets: [] };
  const slots = new Map(); // field -> its error element
  const slot = (field) => {
    const el = h("span", { class: "field-error", role: "alert", dataset: { errorFor: field } });
    slots.set(field, el);
    return el;
  };
  const field = (label, input, name, extra = null) =>
    h("label", { class: "field", dataset: { field: name } }, h("span", {}, label, extra), input, slot(name));

  // --- plain fields
  const name = h("input", { name: "name", required: true, autocomplete: "off" });
  const language = h("select", { name: "language" }, ["python", "bash"].map((l) => h("option", { value: l }, l)));
  const idle = h("input", { name: "idle_timeout", type: "number", min: 0, step: 1, placeholder: "default" });
  const environment = h("input", { name: "environment", list: "settings-environments", autocomplete: "off" });
  const envList = h("datalist", { id: "settings-environments" });
  const type = h("select", { name: "type" }, ["native", "jupyter"].map((t) => h("option", { value: t }, t)));
  const kernel = h("input", { name: "kernel", placeholder: "python3", autocomplete: "off" });
  const kernelField = field("Kernel", kernel, "kernel");
  const machine = h("select", { name: "machine_type" });
  const cuda = h("select", { name: "cuda" });

  // --- variables
  const envRows = h("div", { id: "env-rows" });
  const inheritedToggle = h("input", { type: "checkbox", id: "show-inherited" });
  const inheritedBox = h("div", { id: "inherited", hidden: true });
  let imageVars = new Map(); // name -> value the environment's image sets (GET /runtimes/{id}/env)

  // A secret is chosen from the team secret lists by TEAM/NAME; a value never comes near.
  function secretOptions(select, wanted) {
    const options = lists.secrets.map((s) => `${s.team}/${s.name}`);
    if (wanted && !options.includes(wanted)) options.push(wanted);
    clear(select, h("option", { value: "" }, options.length ? "choose a secret" : "no team secrets"), options.map((o) => h("option", { value: o }, o)));
    select.value = wanted;
  }

  function secretSelect(current) {
    const select = h("select", { class: "env-secret", "aria-label": "secret" });
    secretOptions(select, current ? refLabel(current) : "");
    return select;
  }

  function envRow(varName = "", value = "") {
    const secret = isRef(value);
    const nameInput = h("input", { class: "env-name", placeholder: "NAME", value: varName, autocomplete: "off", spellcheck: "false", "aria-label": "variable name" });
    const kind = h("select", { class: "env-kind", "aria-label": "kind" }, h("option", { value: "text", selected: !secret }, "value"), h("option", { value: "secret", selected: secret }, "secret"));
    const valueInput = h("input", { class: "env-value", placeholder: "value", value: secret ? "" : value, autocomplete: "off", spellcheck: "false", "aria-label": "value" });
    const select = secretSelect(secret ? value : null);
    const error = h("span", { class: "field-error", role: "alert" });
    const badge = h("span", { class: "badge overrides", hidden: !imageVars.has(varName), title: "the environment's image sets it too; this value wins" }, "overrides image");
    const show = () => {
      valueInput.hidden = kind.value === "secret";
      select.hidden = kind.value !== "secret";
    };
    kind.addEventListener("change", show);
    show();
    const row = h(
      "div",
      { class: "env-row" },
      nameInput,
      kind,
      valueInput,
      select,
      h("button", { type: "button", class: "remove", title: "remove", "aria-label": "remove variable", onclick: () => { row.remove(); touched(); } }, "×"),
      badge,
      error,
    );
    row.read = () => {
      const n = nameInput.value.trim();
      if (kind.value === "secret") {
        const [team, ...rest] = select.value.split("/");
        return [n, select.value ? { secret: rest.join("/"), team } : null];
      }
      return [n, valueInput.value];
    };
    row.nameInput = nameInput;
    row.mark = () => (badge.hidden = !imageVars.has(nameInput.value.trim()));
    nameInput.addEventListener("input", row.mark);
    row.error = error;
    return row;
  }

  // GET /runtimes/{id}/env: which variables set here override the image's (marked on their
  // rows), and with "show inherited" the image's own variables.
  async function refreshInherited() {
    inheritedBox.hidden = !inheritedToggle.checked;
    try {
      const view = await again(`/runtimes/${rt.id}/env`);
      imageVars = new Map(view.variables.filter((v) => v.source === "inherited" || v.overrides).map((v) => [v.name, v.overrides ? v.image_value ?? "" : v.value ?? ""]));
      for (const row of envRows.children) row.mark();
      if (!inheritedToggle.checked) return;
      // the image's variables; those the runtime sets (or will set at its next boot) struck through
      const mine = effective(rt).env;
      const row = ([n, value]) =>
        h(
          "tr",
          { class: n in mine ? "overridden" : null, dataset: { name: n } },
          h("td", { class: "path" }, n),
          h("td", { class: "path value" }, value),
          h("td", { class: "note" }, n in mine ? "set here instead" : ""),
        );
      clear(
        inheritedBox,
        h("p", { class: "muted" }, `Set by ${view.environment}'s image (a variable set here of the same name wins):`),
        imageVars.size ? h("table", { class: "inherited" }, h("tbody", {}, [...imageVars].map(row))) : h("p", { class: "muted" }, "The image sets no variables."),
      );
    } catch (err) {
      clear(inheritedBox, h("p", { class: "error" }, errorText(err)));
    }
  }
  inheritedToggle.addEventListener("change", refreshInherited);

  // --- mounts
  const mountRows = h("div", { id: "mount-rows" });

  function mountRow(m = { type: "git", target: "" }) {
    const kind = h("select", { class: "mount-type", "aria-label": "mount type" }, ["git", "s3", "volume"].map((t) => h("option", { value: t, selected: t === m.type }, t)));
    const kindPart = h("label", { class: "mount-part mount-kind" }, h("span", {}, "type"), kind);
    const target = h("input", { class: "mount-target", dataset: { key: "target" }, placeholder: "/mnt/…", value: m.target || "", autocomplete: "off", "aria-label": "target" });
    const fieldsBox = h("span", { class: "mount-fields" });
    const flagBox = h("span", { class: "mount-flag" });
    const errors = new Map();
    const row = h("div", { class: "mount-row" });
    const keep = { ...m }; // values of the other types' fields, so switching back loses nothing
    function draw() {
      for (const input of row.querySelectorAll(".mount-fields [data-key], .mount-flag [data-key]")) {
        keep[input.dataset.key] = input.type === "checkbox" ? input.checked : input.value;
      }
      const parts = [];
      for (const [key, caption, placeholder] of MOUNT_FIELDS[kind.value]) {
        const input = h("input", { class: `mount-${key}`, dataset: { key }, placeholder, value: keep[key] || "", autocomplete: "off", "aria-label": caption });
        if (key === "name") input.setAttribute("list", "settings-volumes");
        parts.push(h("label", { class: "mount-part" }, h("span", {}, caption), input));
      }
      clear(fieldsBox, parts);
      const flag = MOUNT_FLAGS[kind.value];
      clear(flagBox, flag ? h("label", { class: "check" }, h("input", { type: "checkbox", class: `mount-${flag[0]}`, dataset: { key: flag[0] }, checked: Boolean(keep[flag[0]]) }), flag[1]) : null);
    }
    kind.addEventListener("change", draw);
    draw();
    const rowError = h("span", { class: "field-error mount-error", role: "alert" });
    clear(
      row,
      kindPart,
      h("label", { class: "mount-part" }, h("span", {}, "mounted at"), target),
      fieldsBox,
      h("button", { type: "button", class: "remove", title: "remove", "aria-label": "remove mount", onclick: () => { row.remove(); touched(); } }, "×"),
      flagBox,
      rowError,
    );
    row.read = () => {
      const out = { type: kind.value, target: target.value.trim() };
      for (const input of row.querySelectorAll(".mount-fields [data-key], .mount-flag [data-key]")) {
        out[input.dataset.key] = input.type === "checkbox" ? input.checked : input.value.trim();
      }
      return out;
    };
    // an error is said under the row, its input marked red
    row.errorFor = (key) => {
      row.querySelector(`[data-key="${key}"]`)?.classList.add("invalid");
      return rowError;
    };
    return row;
  }

  // --- pending and notes
  const pendingBox = h("div", { id: "pending" });
  const outdated = h("p", { class: "notice", id: "secrets-outdated", hidden: true });
  const status = h("p", { role: "alert", id: "settings-status" });
  const say = (text, kind = "error") => {
    status.textContent = text;
    status.className = kind === "ok" ? "ok" : "error";
  };
  const applyNote = h("p", { class: "muted", id: "apply-note" });

  function drawPending() {
    const items = pendingItems(rt);
    for (const el of form.querySelectorAll("[data-pending]")) el.remove();
    clear(
      pendingBox,
      items.length
        ? h("div", { class: "notice pending" }, h("strong", {}, "Waits for the next boot:"), h("ul", {}, items.map(([f, text]) => h("li", { dataset: { item: f } }, h("span", { class: "muted" }, `${LABELS[f]}: `), text))))
        : null,
    );
    for (const [f] of items) {
      const label = form.querySelector(`[data-field="${f}"] > span`) || form.querySelector(`[data-section="${f}"] h3`);
      if (label) label.append(h("span", { class: "badge warn", dataset: { pending: f }, title: "applied by the next boot" }, "next boot"));
    }
    outdated.hidden = !(rt.secrets_outdated || []).length;
    outdated.textContent = outdated.hidden ? "" : `Changed since this runtime got them: ${rt.secrets_outdated.join(", ")}; a reboot applies the new values.`;
    const running = !["stopped", "error"].includes(rt.state);
    applyNote.textContent = running
      ? "Name, language and idle timeout apply now; the rest is kept for the next boot (shown above until then)."
      : "The runtime is stopped: everything applies now.";
  }

  function fillMachines(current) {
    const names = lists.machines.map((m) => m.name);
    const options = lists.machines.map((m) => h("option", { value: m.name }, `${m.name}${m.description ? " — " + m.description : ""}`));
    if (current && !names.includes(current)) options.push(h("option", { value: current }, current));
    clear(machine, options);
    machine.value = current;
  }

  function fillCuda(current) {
    const versions = [...lists.cuda];
    if (current && !versions.includes(current)) versions.push(current);
    clear(cuda, h("option", { value: "" }, "none"), versions.map((v) => h("option", { value: v }, v)));
    cuda.value = current || "";
    showCuda();
  }

  // CUDA is for GPU machine types: otherwise the choice is off (unless one is set, to undo it)
  function showCuda() {
    const mt = lists.machines.find((m) => m.name === machine.value);
    const gpu = Boolean(mt && mt.gpus > 0);
    cuda.disabled = !gpu && !cuda.value;
    cuda.options[0].textContent = gpu ? (lists.cuda.length ? "none" : "none (no CUDA on this host)") : "none (GPU only)";
  }
  machine.addEventListener("change", showCuda);
  type.addEventListener("change", () => (kernelField.hidden = type.value !== "jupyter"));

  // Put the runtime's settings into the inputs (only when they changed, so that focus and
  // half-typed text survive the live updates of an unrelated field).
  function fill(force = false) {
    const eff = effective(rt);
    const key = canon(eff);
    if (!force && (dirty || key === shown)) return;
    shown = key;
    name.value = eff.name;
    language.value = eff.language;
    idle.value = eff.idle_timeout ?? "";
    environment.value = eff.environment;
    type.value = eff.type;
    kernel.value = eff.kernel || "";
    kernelField.hidden = eff.type !== "jupyter";
    fillMachines(eff.machine_type);
    fillCuda(eff.cuda);
    clear(envRows, Object.entries(eff.env).sort(([a], [b]) => a.localeCompare(b)).map(([k, v]) => envRow(k, v)));
    clear(mountRows, eff.mounts.map((m) => mountRow(m)));
  }

  function clearErrors() {
    for (const el of form.querySelectorAll(".field-error")) el.textContent = "";
    for (const el of form.querySelectorAll(".invalid")) el.classList.remove("invalid");
  }

  function showError(fieldName, problem) {
    let el = null;
    let m;
    if (slots.has(fieldName)) el = slots.get(fieldName);
    else if ((m = /^env\.(.+?)(\.team|\.secret)?$/.exec(fieldName))) {
      const row = [...envRows.children].find((r) => r.nameInput.value.trim() === m[1]);
      el = row ? row.error : slots.get("env");
      row?.classList.add("invalid");
    } else if ((m = /^mounts\[(\d+)\](?:\.(\w+))?$/.exec(fieldName))) {
      const row = mountRows.children[Number(m[1])];
      el = row ? row.errorFor(m[2] || "") : slots.get("mounts");
    } else if (fieldName.startsWith("env")) el = slots.get("env");
    else if (fieldName.startsWith("mounts")) el = slots.get("mounts");
    const shown = problem.startsWith(`${fieldName}: `) ? problem.slice(fieldName.length + 2) : problem;
    if (el) el.textContent = shown;
    el?.closest(".field")?.classList.add("invalid");
    return Boolean(el);
  }

  // The PATCH body: only what differs from what the runtime has (or will have).
  function body() {
    const eff = effective(rt);
    const out = {};
    const problems = [];
    if (name.value !== eff.name) out.name = name.value;
    if (language.value !== eff.language) out.language = language.value;
    const idleValue = idle.value === "" ? null : Number(idle.value);
    if (idleValue !== eff.idle_timeout) out.idle_timeout = idleValue;
    if (environment.value.trim() !== eff.environment) out.environment = environment.value.trim();
    const kernelValue = type.value === "jupyter" ? kernel.value.trim() || null : null;
    if (type.value !== eff.type || kernelValue !== (eff.kernel || null)) {
      out.type = type.value;
      if (kernelValue) out.kernel = kernelValue;
    }
    if (machine.value !== eff.machine_type) out.machine_type = machine.value;
    const cudaValue = cuda.value || null;
    if (cudaValue !== (eff.cuda || null)) out.cuda = cudaValue;
    const env = {};
    const seen = new Set();
    for (const row of envRows.children) {
      const [k, v] = row.read();
      if (!k && (v === "" || v === null)) continue;
      if (!k) problems.push([row.error, "give the variable a name"]);
      else if (seen.has(k)) problems.push([row.error, `${k} is here twice`]);
      else if (v === null) problems.push([row.error, "choose a secret"]);
      seen.add(k);
      if (k) env[k] = v;
    }
    const patchEnv = {};
    for (const k of Object.keys(eff.env)) if (!(k in env)) patchEnv[k] = null;
    for (const [k, v] of Object.entries(env)) if (canon(v) !== canon(eff.env[k])) patchEnv[k] = v;
    if (Object.keys(patchEnv).length) out.env = patchEnv;
    const mounts = [...mountRows.children].map((row) => row.read());
    const normal = (list) => canon(list.map((m) => Object.fromEntries(Object.entries(m).filter(([, v]) => v !== "" && v !== false && v !== null))));
    if (normal(mounts) !== normal(eff.mounts)) out.mounts = mounts;
    return { out, problems };
  }

  async function apply(event) {
    event.preventDefault();
    clearErrors();
    say("");
    const { out, problems } = body();
    if (problems.length) {
      for (const [el, text] of problems) {
        el.textContent = text;
        el.closest(".env-row")?.classList.add("invalid");
      }
      say("Nothing was sent: see the fields marked in red.");
      return;
    }
    if (!Object.keys(out).length) {
      say("Nothing changed.", "ok");
      return;
    }
    const later = Object.keys(LABELS).filter((f) => f in out && f !== "kernel"); // in the API's order
    const running = !["stopped", "error"].includes(rt.state);
    if (running && later.length) out.next_boot = true;
    try {
      rt = await patch(`/runtimes/${rt.id}`, out);
    } catch (err) {
      const problemsOut = err.details?.problems || (err.details?.field ? [{ field: err.details.field, problem: err.message }] : []);
      const placed = problemsOut.map((p) => showError(p.field, p.problem));
      say(placed.length && placed.every(Boolean) ? `Not saved (${err.code}): see the field marked in red.` : `Not saved: ${errorText(err)}`);
      return; // the inputs keep what was typed
    }
    dirty = false;
    fill(true);
    drawPending();
    refreshInherited();
    say(running && later.length ? `Saved; ${later.map((f) => LABELS[f]).join(", ")} wait${later.length === 1 ? "s" : ""} for the next boot.` : "Settings saved.", "ok");
  }

  const touched = () => (dirty = true);
  const form = h(
    "form",
    { class: "settings-panel", id: "settings", novalidate: true, oninput: touched, onchange: touched, onsubmit: apply },
    outdated,
    pendingBox,
    h(
      "div",
      { class: "settings-grid" },
      field("Name", name, "name"),
      field("Language", language, "language"),
      field("Idle timeout (s, 0 never)", idle, "idle_timeout"),
      field("Environment", environment, "environment"),
      envList,
      field("Type", type, "type"),
      kernelField,
      field("Machine type", machine, "machine_type"),
      field("CUDA version", cuda, "cuda"),
    ),
    h(
      "section",
      { class: "sub", dataset: { section: "env" } },
      h("h3", {}, "Environment variables"),
      envRows,
      slot("env"),
      h("div", { class: "bar" },
        h("button", { type: "button", id: "add-variable", onclick: () => { envRows.append(envRow()); envRows.lastChild.querySelector(".env-name").focus(); touched(); } }, "Add variable"),
        h("label", { class: "check" }, inheritedToggle, "Show inherited"),
      ),
      inheritedBox,
    ),
    h(
      "section",
      { class: "sub", dataset: { section: "mounts" } },
      h("h3", {}, "Mounts"),
      mountRows,
      slot("mounts"),
      h("datalist", { id: "settings-volumes" }),
      h("button", { type: "button", id: "add-mount", onclick: () => { mountRows.append(mountRow()); touched(); } }, "Add mount"),
    ),
    status,
    h("div", { class: "bar" }, h("button", { type: "submit", id: "apply-settings" }, "Apply settings"), h("button", { type: "button", id: "revert-settings", onclick: () => { clearErrors(); say(""); dirty = false; fill(true); } }, "Revert")),
    applyNote,
  );

  // The choices the inputs offer. A list that cannot be had is said in the panel, not
  // silently offered empty (a request cut when the host's network changes is asked again).
  async function load() {
    const failed = [];
    const list = (path, what, empty = []) =>
      again(path).catch((err) => {
        failed.push(`${what}: ${errorText(err)}`);
        return empty;
      });
    const teams = rt.team ? [rt.team] : (await list("/teams", "your teams")).filter((t) => t.role).map((t) => t.name);
    const [machines, cudaInfo, volumes, environments, ...secretLists] = await Promise.all([
      list("/machine-types", "machine types"),
      list("/machine-types/cuda", "CUDA versions", { versions: [] }),
      list("/volumes", "volumes"),
      list("/environments", "environments"),
      ...teams.map((t) => list(`/teams/${encodeURIComponent(t)}/secrets`, `secrets of team ${t}`)),
    ]);
    lists.machines = machines;
    lists.cuda = cudaInfo.versions || [];
    lists.secrets = secretLists.flat().map((s) => ({ team: s.team, name: s.name }));
    clear(form.querySelector("#settings-volumes"), volumes.map((v) => h("option", { value: v.name })));
    clear(envList, environments.map((e) => h("option", { value: e.name })));
    // the choices arrived: offer them, keeping whatever the inputs hold now
    fillMachines(machine.value);
    fillCuda(cuda.value);
    for (const select of envRows.querySelectorAll("select.env-secret")) secretOptions(select, select.value);
    if (failed.length) say(`Could not load ${failed.join("; ")}`);
    refreshInherited();
  }

  fill(true);
  drawPending();
  load();
  return {
    node: form,
    // A newer copy of the runtime (live updates): the pending notes follow; the inputs too,
    // unless the user has typed into them.
    update(next) {
      const before = canon([rt.environment, rt.env, rt.pending]);
      rt = next;
      fill();
      drawPending();
      if (canon([rt.environment, rt.env, rt.pending]) !== before) refreshInherited();
    },
  };
}
