// A cell's outputs (Jupyter's shapes), shown safely: text as text, HTML only inside a sandboxed
// frame that may run nothing, pictures as images.

import { h } from "./dom.js";

const ANSI = /\u001b\[[0-9;?]*[A-Za-z]/g;

const plain = (value) => (Array.isArray(value) ? value.join("") : String(value ?? ""));

// The output's HTML without what could never run in the frame anyway (scripts, event
// handlers, javascript: links, nested frames), so the browser has nothing to refuse and log.
// This is tidying, not the barrier: the frame's sandbox is. It works on the text, because
// parsing the HTML in this page (DOMParser, <template>) already counts as meeting its handlers.
export function inertHtml(html) {
  let out = String(html)
    .replace(/<(script|iframe|frame|object|embed)\b[\s\S]*?(<\/\1\s*>|$)/gi, "")
    .replace(/<(base|meta)\b[^>]*>/gi, "");
  const handler = /(<[a-z][^>]*?)\s(on[a-z]+|href|src|action|formaction)\s*=\s*("\s*javascript:[^"]*"|'\s*javascript:[^']*'|javascript:[^\s>]*)/gi;
  const events = /(<[a-z][^>]*?)\son[a-z]+\s*=\s*("[^"]*"|'[^']*'|[^\s>]+)/gi;
  for (let before = ""; before !== out; ) {
    before = out;
    out = out.replace(events, "$1").replace(handler, "$1");
  }
  return out;
}

function htmlFrame(html) {
  // sandbox with no permissions: no script, no form, no same-origin access, no navigation.
  const frame = h("iframe", { sandbox: "", class: "html-output", title: "HTML output", referrerpolicy: "no-referrer" });
  frame.srcdoc = inertHtml(html);
  return frame;
}

function richData(data) {
  if (data["text/html"] !== undefined) return htmlFrame(plain(data["text/html"]));
  if (data["image/png"] !== undefined) {
    return h("img", { class: "image-output", alt: "PNG output", src: `data:image/png;base64,${plain(data["image/png"]).trim()}` });
  }
  if (data["image/jpeg"] !== undefined) {
    return h("img", { class: "image-output", alt: "JPEG output", src: `data:image/jpeg;base64,${plain(data["image/jpeg"]).trim()}` });
  }
  if (data["image/svg+xml"] !== undefined) {
    // As an image, an SVG cannot run scripts or load anything.
    const url = `data:image/svg+xml;charset=utf-8,${encodeURIComponent(plain(data["image/svg+xml"]))}`;
    return h("img", { class: "image-output", alt: "SVG output", src: url });
  }
  if (data["application/json"] !== undefined) {
    return h("pre", { class: "json-output" }, JSON.stringify(data["application/json"], null, 2));
  }
  if (data["text/markdown"] !== undefined) return h("pre", { class: "text-output" }, plain(data["text/markdown"]));
  return h("pre", { class: "text-output" }, plain(data["text/plain"]));
}

export function outputNode(out) {
  switch (out.output_type) {
    case "stream":
      return h("pre", { class: `stream ${out.name === "stderr" ? "stderr" : "stdout"}`, dataset: { name: out.name } }, plain(out.text));
    case "error":
      return h(
        "pre",
        { class: "error-output" },
        h("strong", {}, `${out.ename}: ${out.evalue}`),
        "\n",
        plain((out.traceback || []).map((line) => String(line).replace(ANSI, "")).join("\n")),
      );
    case "execute_result":
    case "display_data":
      return h("div", { class: out.output_type.replace("_", "-") }, richData(out.data || {}));
    default:
      return h("pre", { class: "text-output" }, JSON.stringify(out));
  }
}

// Append one output to a cell's output area; stream text of the same stream joins the last
// block, as a notebook shows it.
export function addOutput(area, out) {
  const last = area.lastElementChild;
  if (out.output_type === "stream" && last && last.matches("pre.stream") && last.dataset.name === out.name) {
    last.append(document.createTextNode(plain(out.text)));
    return;
  }
  area.append(outputNode(out));
}
