// What the page keeps in the browser's localStorage: the conversations, the current one, the
// settings and the theme. Conversations are also exported and imported as JSON files, in the
// shape they are stored in:
//   {format: "lfm2-chat", version: 1, conversations: [{id, title, created, updated, messages}]}
// A message is {role: "user", content, images?} | {role: "assistant", content, reasoning?,
// tool_calls?, stats?, finish_reason?, stopped?, error?} | {role: "tool", tool_call_id, name?, content}.

const KEYS = { conversations: "lfm2.conversations", current: "lfm2.current", settings: "lfm2.settings", theme: "lfm2.theme" };
export const FORMAT = "lfm2-chat";
const ROLES = new Set(["user", "assistant", "tool", "system"]);

/** A fresh, empty conversation. */
export function newConversation() {
  const now = Date.now();
  return { id: newId(), title: "New chat", titled: false, created: now, updated: now, messages: [] };
}

function newId() {
  return crypto.randomUUID();
}

function read(key, fallback) {
  try {
    const text = localStorage.getItem(key);
    return text == null ? fallback : JSON.parse(text);
  } catch {
    return fallback; // unreadable (another page's data, a damaged value): start over, not fail
  }
}

/**
 * Stores `value`; false when the browser refuses (storage full: images take room).
 * @returns {boolean}
 */
function write(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
    return true;
  } catch {
    return false;
  }
}

/** The stored conversations (checked as an import is), newest first, and the current one's id. */
export function loadConversations() {
  let conversations = [];
  try {
    conversations = checkConversations(read(KEYS.conversations, []));
  } catch {
    conversations = [];
  }
  conversations.sort((a, b) => b.updated - a.updated);
  return { conversations, current: read(KEYS.current, null) };
}

/** @returns {boolean} false when the browser's storage is full */
export function saveConversations(conversations, current) {
  write(KEYS.current, current);
  return write(KEYS.conversations, conversations);
}

export function loadSettings() {
  return { ...DEFAULT_SETTINGS, ...read(KEYS.settings, {}) };
}

export function saveSettings(settings) {
  write(KEYS.settings, settings);
}

export function loadTheme() {
  return read(KEYS.theme, "auto");
}

export function saveTheme(theme) {
  write(KEYS.theme, theme);
}

// Sampling fields left null take the checkpoint's defaults (from /web/info).
export const DEFAULT_SETTINGS = {
  system: "",
  temperature: null,
  min_p: null,
  repetition_penalty: null,
  max_tokens: null,
  demo_tools: false,
  tools: "",
  extra: "",
};

/** The JSON text of an export of `conversations`. */
export function exportText(conversations) {
  return JSON.stringify({ format: FORMAT, version: 1, exported: new Date().toISOString(), conversations }, null, 2);
}

/**
 * The conversations in an exported file (or a bare list of them, or one conversation), checked;
 * throws an Error that says what is wrong.
 * @param {string} text
 */
export function parseImport(text) {
  let data;
  try {
    data = JSON.parse(text);
  } catch (err) {
    throw new Error(`the file is not JSON (${err.message})`);
  }
  if (data && data.format === FORMAT) data = data.conversations;
  else if (data && Array.isArray(data.messages)) data = [data];
  return checkConversations(data);
}

function checkConversations(list) {
  if (!Array.isArray(list)) throw new Error("expected an lfm2-chat export: {format: 'lfm2-chat', conversations: [...]}");
  return list.map((conv, i) => {
    if (!conv || typeof conv !== "object" || !Array.isArray(conv.messages)) {
      throw new Error(`conversation ${i + 1} has no list of messages`);
    }
    const now = Date.now();
    return {
      id: typeof conv.id === "string" && conv.id ? conv.id : newId(),
      title: typeof conv.title === "string" && conv.title ? conv.title : "Imported chat",
      titled: Boolean(conv.titled),
      created: Number.isFinite(conv.created) ? conv.created : now,
      updated: Number.isFinite(conv.updated) ? conv.updated : now,
      messages: conv.messages.map((m, j) => checkMessage(m, `conversation ${i + 1}, message ${j + 1}`)),
    };
  });
}

function checkMessage(m, where) {
  if (!m || typeof m !== "object" || !ROLES.has(m.role)) {
    throw new Error(`${where}: expected a role of ${[...ROLES].join(", ")}`);
  }
  const text = (value) => (typeof value === "string" ? value : "");
  const out = { role: m.role, content: text(m.content) };
  if (Array.isArray(m.content)) {
    out.content = m.content.filter((p) => p?.type === "text").map((p) => text(p.text)).join("");
  }
  if (Array.isArray(m.images)) out.images = m.images.filter((url) => typeof url === "string" && url.startsWith("data:image/"));
  if (m.role === "assistant") {
    for (const key of ["reasoning", "error", "finish_reason"]) if (typeof m[key] === "string") out[key] = m[key];
    if (m.stopped) out.stopped = true;
    if (m.stats && typeof m.stats === "object") out.stats = { ...m.stats };
    if (Array.isArray(m.tool_calls)) {
      out.tool_calls = m.tool_calls.map((call, k) => ({
        id: text(call?.id) || `call_${k}`,
        type: "function",
        function: { name: text(call?.function?.name), arguments: text(call?.function?.arguments) },
      }));
    }
  }
  if (m.role === "tool") {
    out.tool_call_id = text(m.tool_call_id);
    if (typeof m.name === "string") out.name = m.name;
  }
  return out;
}
