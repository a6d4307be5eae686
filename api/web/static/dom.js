// Building the page: every piece of text goes in as text (textContent), never as HTML, so
// names, messages and outputs are shown exactly as they are and never run.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key in el && typeof value !== "string") el[key] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function clear(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

export function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  let v = Number(n);
  while (Math.abs(v) >= 1000 && i < units.length - 1) {
    v /= 1000;
    i += 1;
  }
  return `${i === 0 ? v : v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
}

export function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
}

export function clock(iso) {
  return iso ? new Date(iso).toLocaleTimeString() : "";
}

export function relative(iso, now = Date.now()) {
  if (!iso) return "";
  const s = Math.round((new Date(iso).getTime() - now) / 1000);
  const a = Math.abs(s);
  const text = a < 60 ? `${a} s` : a < 3600 ? `${Math.round(a / 60)} min` : a < 86400 ? `${Math.round(a / 3600)} h` : `${Math.round(a / 86400)} d`;
  return s >= 0 ? `in ${text}` : `${text} ago`;
}

// A state dot: its colour class says the state; its title says it in words.
export function dot(rt) {
  const color = rt.state_color || "gray";
  return h("span", { class: `dot dot-${color}`, title: rt.state, dataset: { state: rt.state } });
}

// A button that asks once more before it acts (no blocking dialogs).
export function confirmButton(label, confirmLabel, action, attrs = {}) {
  let armed = null;
  const button = h("button", {
    type: "button",
    ...attrs,
    onclick: async () => {
      if (!armed) {
        button.textContent = confirmLabel;
        button.classList.add("armed");
        armed = setTimeout(() => {
          armed = null;
          button.textContent = label;
          button.classList.remove("armed");
        }, 4000);
        return;
      }
      clearTimeout(armed);
      armed = null;
      button.textContent = label;
      button.classList.remove("armed");
      await action();
    },
  }, label);
  return button;
}
