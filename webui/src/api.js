// The server's own endpoints: /web/info (the page's facts about the model) and the
// OpenAI-compatible /v1/chat/completions, streamed as server-sent events.

export class ApiError extends Error {}

/** The server wants an API key (lfm2 serve --api-key) and none, or a wrong one, was sent. */
export class AuthError extends ApiError {}

const KEY = "lfm2.apiKey";

/** Keep the key the user typed (in this browser's local storage), or forget it (null). */
export function setApiKey(key) {
  if (key) localStorage.setItem(KEY, key);
  else localStorage.removeItem(KEY);
}

function authHeaders() {
  const key = localStorage.getItem(KEY);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function failure(res) {
  const message = await errorMessage(res);
  return res.status === 401 ? new AuthError(message) : new ApiError(message);
}

/** The message of an error answer: OpenAI's {"error": {"message"}} body, else the status line. */
async function errorMessage(res) {
  try {
    const body = await res.json();
    if (body?.error?.message) return `${res.status}: ${body.error.message}`;
  } catch {
    // not JSON: fall through to the status line
  }
  return `${res.status} ${res.statusText}`.trim();
}

/**
 * The served model's name, context length, sampling defaults and capabilities.
 * @returns {Promise<{model: string, max_model_len: number, defaults: Record<string, number>,
 *   capabilities: {tools: boolean, vision: boolean}}>}
 */
export async function getInfo() {
  const res = await fetch("/web/info", { headers: authHeaders() });
  if (res.status === 401) throw await failure(res);
  if (!res.ok) throw new ApiError(`could not read /web/info: ${await errorMessage(res)}`);
  return res.json();
}

/**
 * Each chunk of a streamed chat completion, in order; returns at `[DONE]`. An error event (the
 * server's {"error": ...} in the stream) or an error status throws ApiError; aborting `signal`
 * throws the browser's AbortError.
 * @param {object} body the request, with stream: true
 * @param {AbortSignal} signal
 */
export async function* streamChat(body, signal) {
  const res = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json", ...authHeaders() },
    body: JSON.stringify(body),
    signal,
  });
  if (!res.ok) throw await failure(res);
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    // An event ends at a blank line; its data is the "data:" lines joined.
    for (let end = buffer.search(/\r?\n\r?\n/); end >= 0; end = buffer.search(/\r?\n\r?\n/)) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = event
        .split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(chunk.error.message || "the server reported an error");
      yield chunk;
    }
  }
  throw new ApiError("the stream ended before [DONE]: the server may have stopped");
}
