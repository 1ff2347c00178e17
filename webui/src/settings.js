// The settings panel (a <dialog>): system prompt, sampling, max tokens, tools and extra request
// fields. Sampling fields show the checkpoint's defaults (from /web/info) until changed; a value
// equal to the default is stored as "not changed", so that another checkpoint's defaults apply.
import { parseJsonSetting, SAMPLING } from "./chat.js";
import { byId } from "./dom.js";

/**
 * Wires the dialog to `settings` (changed in place); `onChange` is called after each edit.
 * @returns {{fill: () => void}} fill: show the current values (after the defaults arrive)
 */
export function bindSettings(settings, getInfo, onChange) {
  const dialog = /** @type {HTMLDialogElement} */ (byId("settings"));
  const form = /** @type {HTMLFormElement} */ (byId("settings-form"));
  const error = byId("settings-error");
  const field = (name) => /** @type {HTMLInputElement} */ (form.elements.namedItem(name));

  function validate() {
    const problems = [];
    for (const [name, kind, label] of [["tools", "list", "Tools"], ["extra", "object", "Extra request fields"]]) {
      const value = parseJsonSetting(settings[name], kind);
      if (value instanceof Error) problems.push(`${label}: ${value.message}`);
    }
    error.textContent = problems.join(" ");
  }

  function fill() {
    const info = getInfo();
    field("system").value = settings.system;
    for (const name of SAMPLING) {
      const fallback = info?.defaults?.[name];
      field(name).value = settings[name] ?? fallback ?? "";
      byId(`${name}-default`).textContent = fallback == null ? "" : `checkpoint default: ${fallback}`;
    }
    field("max_tokens").value = settings.max_tokens ?? "";
    field("max_tokens").placeholder = info ? `the rest of the context (${info.max_model_len} tokens in all)` : "";
    field("demo_tools").checked = settings.demo_tools;
    field("tools").value = settings.tools;
    field("extra").value = settings.extra;
    validate();
  }

  form.addEventListener("input", (event) => {
    const input = /** @type {HTMLInputElement} */ (event.target);
    const name = input.name;
    if (SAMPLING.includes(name)) {
      const value = input.value === "" ? null : Number(input.value);
      const fallback = getInfo()?.defaults?.[name];
      settings[name] = value == null || !Number.isFinite(value) || value === fallback ? null : value;
    } else if (name === "max_tokens") {
      const value = Number.parseInt(input.value, 10);
      settings.max_tokens = Number.isFinite(value) && value > 0 ? value : null;
    } else if (name === "demo_tools") {
      settings.demo_tools = input.checked;
    } else if (name in settings) {
      settings[name] = input.value;
    }
    validate();
    onChange();
  });
  byId("reset-settings").addEventListener("click", () => {
    for (const name of SAMPLING) settings[name] = null;
    settings.max_tokens = null;
    fill();
    onChange();
  });
  byId("open-settings").addEventListener("click", () => {
    fill();
    dialog.showModal();
  });
  byId("close-settings").addEventListener("click", () => dialog.close());
  return { fill };
}
