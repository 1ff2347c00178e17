// One reply: the request built from a conversation and the settings, and the streamed chunks
// gathered into the assistant message (content, reasoning, tool calls, statistics).
import { streamChat } from "./api.js";
import { DEMO_TOOLS } from "./tools.js";

export const SAMPLING = ["temperature", "min_p", "repetition_penalty"];

/**
 * The stored messages as OpenAI's API takes them: the system prompt first, images as image_url
 * parts, and the page's own fields (reasoning, stats, errors) left out.
 * @param {Array<object>} messages
 * @param {string} system
 */
export function apiMessages(messages, system) {
  const out = system.trim() ? [{ role: "system", content: system }] : [];
  for (const m of messages) {
    if (m.role === "user") {
      const images = m.images ?? [];
      out.push({
        role: "user",
        content: images.length
          ? [{ type: "text", text: m.content }, ...images.map((url) => ({ type: "image_url", image_url: { url } }))]
          : m.content,
      });
    } else if (m.role === "assistant") {
      const calls = m.tool_calls ?? [];
      if (!m.content && !calls.length) continue; // an error, or stopped before its first token
      out.push(calls.length ? { role: "assistant", content: m.content, tool_calls: calls } : { role: "assistant", content: m.content });
    } else if (m.role === "tool") {
      out.push({ role: "tool", tool_call_id: m.tool_call_id, content: m.content }); // the name is the page's, for display
    } else {
      out.push({ role: m.role, content: m.content });
    }
  }
  return out;
}

/**
 * A JSON setting's value, or an Error saying what is wrong with it.
 * @param {string} text
 * @param {"list"|"object"} kind
 */
export function parseJsonSetting(text, kind) {
  if (!text.trim()) return kind === "list" ? [] : {};
  let value;
  try {
    value = JSON.parse(text);
  } catch (err) {
    return new Error(`not valid JSON: ${err.message}`);
  }
  const ok = kind === "list" ? Array.isArray(value) : value && typeof value === "object" && !Array.isArray(value);
  return ok ? value : new Error(kind === "list" ? "expected a JSON list of tools" : "expected a JSON object");
}

/**
 * The request for the next reply to `messages`. Sampling values the user left alone are sent as the
 * checkpoint's defaults, so that the request says what was used. Throws on invalid JSON settings.
 */
export function requestBody(messages, settings, info) {
  const body = {
    model: info.model,
    messages: apiMessages(messages, settings.system),
    stream: true,
    stream_options: { include_usage: true },
  };
  for (const name of SAMPLING) body[name] = settings[name] ?? info.defaults[name];
  if (settings.max_tokens) body.max_tokens = settings.max_tokens;
  const custom = parseJsonSetting(settings.tools, "list");
  if (custom instanceof Error) throw new Error(`Settings, tools: ${custom.message}`);
  const tools = [...(settings.demo_tools ? DEMO_TOOLS : []), ...custom];
  if (tools.length) body.tools = tools;
  const extra = parseJsonSetting(settings.extra, "object");
  if (extra instanceof Error) throw new Error(`Settings, extra request fields: ${extra.message}`);
  return { ...body, ...extra };
}

/** Adds a streamed tool-call delta to `calls`: by index, arguments arriving in pieces or whole. */
function mergeToolCall(calls, delta) {
  const index = delta.index ?? calls.length;
  const call = (calls[index] ??= { id: "", type: "function", function: { name: "", arguments: "" } });
  if (delta.id) call.id = delta.id;
  if (delta.function?.name) call.function.name += delta.function.name;
  if (delta.function?.arguments) call.function.arguments += delta.function.arguments;
}

/**
 * Streams the reply to `body` into `reply` (an assistant message), calling `onUpdate` after each
 * chunk. Ends with `reply.stats` set; a stop (aborted `signal`) sets `reply.stopped`, a failure
 * `reply.error`: neither throws.
 */
export async function streamReply(body, reply, onUpdate, signal) {
  const start = performance.now();
  let first = null;
  let usage = null;
  const calls = [];
  try {
    for await (const chunk of streamChat(body, signal)) {
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices?.[0];
      if (!choice) continue;
      const delta = choice.delta ?? {};
      if (delta.content || delta.reasoning_content || delta.tool_calls?.length) first ??= performance.now();
      if (delta.reasoning_content) reply.reasoning = (reply.reasoning ?? "") + delta.reasoning_content;
      if (delta.content) reply.content += delta.content;
      for (const call of delta.tool_calls ?? []) mergeToolCall(calls, call);
      if (calls.length) reply.tool_calls = calls.filter(Boolean);
      if (choice.finish_reason) reply.finish_reason = choice.finish_reason;
      onUpdate();
    }
  } catch (err) {
    if (err?.name === "AbortError") reply.stopped = true;
    else reply.error = err?.message ?? String(err);
  }
  const end = performance.now();
  const completion = usage?.completion_tokens;
  reply.stats = {
    ttft_ms: first == null ? null : Math.round(first - start),
    total_ms: Math.round(end - start),
    prompt_tokens: usage?.prompt_tokens ?? null,
    completion_tokens: completion ?? null,
    // As the server's log counts it: the tokens after the first, over the time after the first.
    tokens_per_s: completion > 1 && first != null && end > first ? (completion - 1) / ((end - first) / 1000) : null,
  };
}
