// Building elements: text always goes in as text nodes. The one place HTML strings enter the page
// is markdown.js, whose output is sanitized.

/**
 * An element: `h("button", {class: "x", onclick: fn, "aria-label": "..."}, child, ...)`.
 * Props named on* become listeners, `text` the text content; null, undefined and false are left out.
 * @param {string} tag
 * @param {Record<string, any>} [props]
 * @param {...(Node|string|null|false|Array<Node|string|null|false>)} children
 * @returns {HTMLElement}
 */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value == null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key === "text") el.textContent = value;
    else if (key === "value") el.value = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) if (child != null && child !== false) el.append(child);
  return el;
}

/**
 * The element with this id; throws if index.html lacks it, so that a renamed id fails loudly.
 * @param {string} id
 * @returns {HTMLElement}
 */
export function byId(id) {
  const el = document.getElementById(id);
  if (!el) throw new Error(`index.html has no element #${id}`);
  return el;
}

/** Downloads `text` as a file named `name`, from a blob: URL (no request leaves the page). */
export function download(name, text, type = "application/json") {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const link = h("a", { href: url, download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}
