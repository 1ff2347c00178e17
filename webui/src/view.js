// A conversation's messages as elements. Tool results are shown in the card of the call they
// answer; a call without a result gets a form (type the result, or run a demo tool).
import { h } from "./dom.js";
import { renderMarkdown } from "./markdown.js";
import { isDemoTool, parseArguments } from "./tools.js";

/**
 * `<think>...</think>` at the start of a reply is reasoning, as thinking checkpoints write it inline.
 * @param {string} content
 */
export function splitThinking(content) {
  const match = /^\s*<think>([\s\S]*?)(?:<\/think>|$)/.exec(content);
  if (!match) return { reasoning: "", content };
  return { reasoning: match[1].trim(), content: content.slice(match[0].length).trimStart() };
}

/** A message's text for the user (images aside). */
export function messageText(message) {
  return typeof message.content === "string" ? message.content : "";
}

function markdown(text, className = "md") {
  const el = h("div", { class: className });
  el.innerHTML = renderMarkdown(text); // sanitized: markdown.js
  for (const pre of el.querySelectorAll("pre")) {
    const button = h("button", { type: "button", class: "copy", text: "Copy", "aria-label": "Copy the code" });
    button.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(pre.querySelector("code")?.textContent ?? pre.textContent);
        button.textContent = "Copied";
      } catch {
        button.textContent = "Copy failed";
      }
      setTimeout(() => (button.textContent = "Copy"), 1500);
    });
    pre.prepend(button);
  }
  return el;
}

function statsLine(stats) {
  if (!stats) return null;
  const parts = [];
  if (stats.ttft_ms != null) parts.push(`first token ${stats.ttft_ms} ms`);
  if (stats.tokens_per_s != null) parts.push(`${stats.tokens_per_s.toFixed(1)} tokens/s`);
  if (stats.prompt_tokens != null) parts.push(`${stats.prompt_tokens} prompt tokens`);
  if (stats.completion_tokens != null) parts.push(`${stats.completion_tokens} completion tokens`);
  return parts.length ? h("p", { class: "stats", "aria-label": "Reply statistics", text: parts.join(" · ") }) : null;
}

function prettyArguments(text) {
  const args = parseArguments(text);
  return args ? JSON.stringify(args, null, 2) : text;
}

function toolCard(call, result, pending, ctx, index) {
  const name = call.function.name || "(no name)";
  const card = h(
    "section",
    { class: "tool-card", "aria-label": `Tool call: ${name}` },
    h("header", {}, h("span", { class: "tool-label", text: "Tool call" }), h("code", { class: "tool-name", text: name })),
    h("pre", { class: "tool-args", "aria-label": "Arguments" }, h("code", { text: prettyArguments(call.function.arguments) })),
  );
  if (result) {
    card.append(
      h("div", { class: "tool-result" }, h("span", { class: "tool-label", text: "Result" }), h("pre", {}, h("code", { text: result.content }))),
    );
  } else if (pending) {
    const field = h("textarea", { rows: 2, class: "tool-input", "aria-label": `Result of ${name}`, placeholder: "Paste the tool's result (JSON or text)" });
    const submit = (content) => ctx.onToolResult(index, call, content);
    const form = h(
      "form",
      { class: "tool-form", onsubmit: (e) => (e.preventDefault(), field.value.trim() && submit(field.value.trim())) },
      field,
      h("div", { class: "row" },
        h("button", { type: "submit", text: "Send result" }),
        isDemoTool(name) && h("button", { type: "button", class: "demo", text: "Run demo tool", onclick: () => ctx.onRunDemo(index, call) }),
        isDemoTool(name) && h("span", { class: "hint", text: "demo tools run in this page; get_weather makes its weather up" })),
    );
    card.append(form);
  } else {
    card.append(h("p", { class: "hint", text: "No result was given." }));
  }
  return card;
}

function editForm(index, message, ctx) {
  const field = h("textarea", { class: "edit-input", rows: 3, "aria-label": "Edit your message", value: messageText(message) });
  const send = () => field.value.trim() && ctx.onEdit(index, field.value.trim());
  field.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    } else if (e.key === "Escape") {
      e.stopPropagation();
      ctx.onCancelEdit();
    }
  });
  queueMicrotask(() => field.focus());
  return h(
    "form",
    { class: "edit-form", onsubmit: (e) => (e.preventDefault(), send()) },
    field,
    h("div", { class: "row" },
      h("button", { type: "submit", text: "Send" }),
      h("button", { type: "button", text: "Cancel", onclick: () => ctx.onCancelEdit() })),
  );
}

/**
 * The element of message `index` of `messages`.
 * @param {Array<object>} messages
 * @param {number} index
 * @param {object} ctx model, busy, streaming (index), editing (index), lastIndex, and the handlers
 */
export function messageView(messages, index, ctx) {
  const message = messages[index];
  const streaming = ctx.streaming === index;
  if (message.role === "user") {
    const editing = ctx.editing === index;
    return h(
      "article",
      { class: "msg user", "data-index": index, "aria-label": "You" },
      h("h3", { class: "who", text: "You" }),
      editing ? editForm(index, message, ctx) : h("div", { class: "plain", text: messageText(message) }),
      (message.images ?? []).length > 0 &&
        h("div", { class: "images" }, message.images.map((url, i) => h("img", { src: url, alt: `attached image ${i + 1}` }))),
      !editing && !ctx.busy && h("div", { class: "actions" }, h("button", { type: "button", text: "Edit", "aria-label": "Edit and resend this message", onclick: () => ctx.onStartEdit(index) })),
    );
  }
  if (message.role === "assistant") {
    const split = splitThinking(message.content);
    const reasoning = [message.reasoning, split.reasoning].filter(Boolean).join("\n\n");
    const results = new Map(messages.slice(index + 1).filter((m) => m.role === "tool").map((m) => [m.tool_call_id, m]));
    const onlyToolsAfter = messages.slice(index + 1).every((m) => m.role === "tool");
    const calls = message.tool_calls ?? [];
    const empty = !split.content && !reasoning && !calls.length;
    const article = h(
      "article",
      { class: "msg assistant", "data-index": index, "aria-label": ctx.model },
      h("h3", { class: "who", text: ctx.model }),
      reasoning &&
        h("details", { class: "reasoning", open: ctx.openReasoning.has(index) || null, ontoggle: (e) => ctx.onToggleReasoning(index, e.target.open) },
          h("summary", { text: streaming && !split.content ? "Reasoning…" : "Reasoning" }),
          markdown(reasoning, "md reasoning-text")),
      split.content && markdown(split.content),
      empty && streaming && h("p", { class: "typing", text: "…", "aria-label": "Writing" }),
      calls.map((call) => toolCard(call, results.get(call.id), !ctx.busy && onlyToolsAfter, ctx, index)),
      message.stopped && h("p", { class: "note", text: "Stopped." }),
      message.error && h("p", { class: "error", role: "alert", text: `Error: ${message.error}` }),
      message.finish_reason === "length" && h("p", { class: "note", text: "The reply reached its token limit." }),
      !streaming && statsLine(message.stats),
      !streaming && !ctx.busy && index === ctx.lastIndex &&
        h("div", { class: "actions" }, h("button", { type: "button", text: "Regenerate", "aria-label": "Regenerate this reply", onclick: () => ctx.onRegenerate() })),
    );
    return article;
  }
  if (message.role === "tool") {
    const answered = messages.slice(0, index).some((m) => m.role === "assistant" && (m.tool_calls ?? []).some((c) => c.id === message.tool_call_id));
    if (answered) return null; // shown in its call's card
    return h("article", { class: "msg tool", "data-index": index, "aria-label": "Tool result" },
      h("h3", { class: "who", text: `Tool result${message.name ? `: ${message.name}` : ""}` }),
      h("pre", {}, h("code", { text: messageText(message) })));
  }
  return h("article", { class: "msg system", "data-index": index, "aria-label": "System" },
    h("h3", { class: "who", text: "System" }), h("div", { class: "plain", text: messageText(message) }));
}

/** The empty conversation's welcome. */
export function welcomeView(model) {
  return h(
    "div",
    { class: "welcome" },
    h("h2", { text: model ? `Chat with ${model}` : "Chat" }),
    h("p", { text: "Replies stream from this server; this page talks to no other." }),
    h("p", { class: "hint", text: "Enter sends, Shift+Enter starts a new line, Escape stops a reply. Settings hold the system prompt, sampling and tools." }),
  );
}
