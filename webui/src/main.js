// The chat page of `lfm2 serve`: state, events, and the conversation list. Rendering is in
// view.js, requests in chat.js, storage in store.js, the settings panel in settings.js.
import { AuthError, getInfo, setApiKey } from "./api.js";
import { requestBody, streamReply } from "./chat.js";
import { byId, download, h } from "./dom.js";
import { bindSettings } from "./settings.js";
import {
  exportText,
  loadConversations,
  loadSettings,
  loadTheme,
  newConversation,
  parseImport,
  saveConversations,
  saveSettings,
  saveTheme,
} from "./store.js";
import { runDemoTool } from "./tools.js";
import { messageView, welcomeView } from "./view.js";

const THEMES = ["auto", "light", "dark"];
const TITLE_LENGTH = 48;

const state = {
  info: null,
  conversations: [],
  currentId: null,
  settings: loadSettings(),
  /** @type {AbortController|null} the reply being streamed */
  busy: null,
  streaming: -1,
  editing: -1,
  openReasoning: new Set(),
  /** data: URLs of images to send with the next message */
  attachments: [],
};

const el = {
  messages: byId("messages"),
  input: /** @type {HTMLTextAreaElement} */ (byId("input")),
  composer: byId("composer"),
  send: byId("send"),
  stop: byId("stop"),
  list: byId("conversation-list"),
  status: byId("status"),
  model: byId("model-name"),
  theme: byId("theme"),
  attach: byId("attach"),
  attachFile: /** @type {HTMLInputElement} */ (byId("attach-file")),
  attachments: byId("attachments"),
  importFile: /** @type {HTMLInputElement} */ (byId("import-file")),
  settings: /** @type {HTMLDialogElement} */ (byId("settings")),
};

const settingsPanel = bindSettings(state.settings, () => state.info, () => saveSettings(state.settings));

// -- conversations ----------------------------------------------------------------------------

function current() {
  let conv = state.conversations.find((c) => c.id === state.currentId);
  if (!conv) {
    conv = newConversation();
    state.conversations.unshift(conv);
    state.currentId = conv.id;
  }
  return conv;
}

function persist() {
  // An empty conversation is not worth keeping, unless it is the one on screen.
  const kept = state.conversations.filter((c) => c.messages.length || c.id === state.currentId);
  if (!saveConversations(kept, state.currentId)) {
    say("The browser's storage is full, so this conversation is not saved: export and delete old ones.");
  }
}

/** A message in the status line (read out by screen readers). */
function say(text) {
  el.status.textContent = text;
}

function switchTo(id) {
  stop();
  state.currentId = id;
  state.editing = -1;
  state.openReasoning.clear();
  document.body.classList.remove("sidebar-open");
  persist();
  render();
  el.input.focus();
}

function newChat() {
  const conv = current();
  if (conv.messages.length) {
    const fresh = newConversation();
    state.conversations.unshift(fresh);
    switchTo(fresh.id);
  } else {
    switchTo(conv.id);
  }
}

function renameStart(item, conv) {
  const input = h("input", { class: "rename", value: conv.title, "aria-label": "New name of the conversation" });
  let done = false;
  const finish = (save) => {
    if (done) return;
    done = true;
    if (save && input.value.trim()) {
      conv.title = input.value.trim();
      conv.titled = true;
      persist();
    }
    renderList();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") finish(true);
    else if (e.key === "Escape") {
      e.stopPropagation();
      finish(false);
    }
  });
  input.addEventListener("blur", () => finish(true));
  item.replaceChildren(input);
  input.focus();
  input.select();
}

function remove(conv, button) {
  if (button.dataset.confirm !== "yes") {
    // Two clicks, no dialog: a dialog would take the keyboard away, and a slip should not delete.
    button.dataset.confirm = "yes";
    button.textContent = "Confirm";
    button.setAttribute("aria-label", `Confirm deleting “${conv.title}”`);
    setTimeout(() => renderList(), 4000);
    return;
  }
  if (conv.id === state.currentId) stop();
  state.conversations = state.conversations.filter((c) => c.id !== conv.id);
  if (conv.id === state.currentId) state.currentId = state.conversations[0]?.id ?? null;
  persist();
  render();
  say(`Deleted “${conv.title}”.`);
}

function exportAll() {
  const kept = state.conversations.filter((c) => c.messages.length);
  download(`lfm2-chats-${new Date().toISOString().slice(0, 10)}.json`, exportText(kept));
  say(`Exported ${kept.length} conversation${kept.length === 1 ? "" : "s"}.`);
}

async function importFile(file) {
  try {
    const imported = parseImport(await file.text());
    for (const conv of imported) {
      // An import restores: a conversation with the same id is replaced by the file's.
      state.conversations = state.conversations.filter((c) => c.id !== conv.id);
      state.conversations.unshift(conv);
    }
    if (imported.length) state.currentId = imported[0].id;
    persist();
    render();
    say(`Imported ${imported.length} conversation${imported.length === 1 ? "" : "s"}.`);
  } catch (err) {
    say(`Could not import ${file.name}: ${err.message}`);
  }
}

// -- replies --------------------------------------------------------------------------------

function setBusy(controller) {
  state.busy = controller;
  el.stop.hidden = !controller;
  el.send.hidden = Boolean(controller);
  el.composer.setAttribute("aria-busy", controller ? "true" : "false");
  // A busy live region is read out once it is done, not at every streamed token.
  el.messages.setAttribute("aria-busy", controller ? "true" : "false");
}

function stop() {
  state.busy?.abort();
}

/** Streams the assistant's next message into `conv`. */
async function reply(conv) {
  const message = { role: "assistant", content: "" };
  let body;
  try {
    body = requestBody(conv.messages, state.settings, state.info);
  } catch (err) {
    say(err.message);
    return;
  }
  conv.messages.push(message);
  conv.updated = Date.now();
  const controller = new AbortController();
  setBusy(controller);
  state.streaming = conv.messages.length - 1;
  render();
  let frame = 0;
  const update = () => {
    frame ||= requestAnimationFrame(() => {
      frame = 0;
      if (state.currentId === conv.id) updateMessage(conv, conv.messages.indexOf(message));
    });
  };
  await streamReply(body, message, update, controller.signal);
  cancelAnimationFrame(frame);
  state.streaming = -1;
  setBusy(null);
  conv.updated = Date.now();
  persist();
  render();
  if (message.error) say(`The reply failed: ${message.error}`);
  else if (message.stopped) say("Stopped.");
  if (state.currentId === conv.id && !el.settings.open) el.input.focus();
}

function send() {
  const text = el.input.value.trim();
  if (state.busy || !state.info || (!text && !state.attachments.length)) return;
  try {
    requestBody([], state.settings, state.info); // settings the server would refuse: say so, keep the text
  } catch (err) {
    say(err.message);
    return;
  }
  const conv = current();
  const message = { role: "user", content: text };
  if (state.attachments.length) message.images = [...state.attachments];
  conv.messages.push(message);
  if (!conv.titled && conv.messages.filter((m) => m.role === "user").length === 1) {
    conv.title = text.length > TITLE_LENGTH ? `${text.slice(0, TITLE_LENGTH - 1)}…` : text || "Images";
  }
  el.input.value = "";
  state.attachments = [];
  resizeInput();
  renderAttachments();
  reply(conv);
}

function regenerate() {
  const conv = current();
  if (state.busy || conv.messages.at(-1)?.role !== "assistant") return;
  conv.messages.pop();
  reply(conv);
}

function editAndResend(index, text) {
  const conv = current();
  if (state.busy) return;
  conv.messages[index] = { ...conv.messages[index], content: text };
  conv.messages.splice(index + 1);
  state.editing = -1;
  reply(conv);
}

/** Adds a tool's result; once every call of that message has one, the model continues. */
function addToolResult(index, call, content) {
  const conv = current();
  if (state.busy) return;
  conv.messages.push({ role: "tool", tool_call_id: call.id, name: call.function.name, content });
  const answered = new Set(conv.messages.slice(index + 1).map((m) => m.tool_call_id));
  if ((conv.messages[index].tool_calls ?? []).every((c) => answered.has(c.id))) reply(conv);
  else {
    persist();
    render();
  }
}

// -- rendering ------------------------------------------------------------------------------

const viewContext = {
  get model() {
    return state.info?.model ?? "model";
  },
  get busy() {
    return Boolean(state.busy);
  },
  get streaming() {
    return state.streaming;
  },
  get editing() {
    return state.editing;
  },
  get lastIndex() {
    return current().messages.length - 1;
  },
  openReasoning: state.openReasoning,
  onToggleReasoning: (index, open) => (open ? state.openReasoning.add(index) : state.openReasoning.delete(index)),
  onStartEdit: (index) => {
    state.editing = index;
    render();
  },
  onCancelEdit: () => {
    state.editing = -1;
    render();
  },
  onEdit: editAndResend,
  onRegenerate: regenerate,
  onToolResult: addToolResult,
  onRunDemo: (index, call) => addToolResult(index, call, runDemoTool(call.function.name, call.function.arguments)),
};

function nearBottom() {
  const box = el.messages;
  return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
}

function updateMessage(conv, index) {
  const follow = nearBottom();
  const old = el.messages.querySelector(`article[data-index="${index}"]`);
  const fresh = messageView(conv.messages, index, viewContext);
  if (old && fresh) old.replaceWith(fresh);
  if (follow) el.messages.scrollTop = el.messages.scrollHeight;
}

function renderMessages() {
  const conv = current();
  const views = conv.messages.map((_, i) => messageView(conv.messages, i, viewContext)).filter(Boolean);
  el.messages.replaceChildren(...(views.length ? views : [welcomeView(state.info?.model)]));
  el.messages.scrollTop = el.messages.scrollHeight;
}

function renderList() {
  const items = state.conversations
    .filter((c) => c.messages.length || c.id === state.currentId)
    .map((conv) => {
      const isCurrent = conv.id === state.currentId;
      const item = h("li", { class: isCurrent ? "current" : null });
      item.append(
        h("button", { type: "button", class: "open", text: conv.title, "aria-current": isCurrent ? "page" : null, onclick: () => switchTo(conv.id) }),
        h("button", { type: "button", class: "small", text: "Rename", "aria-label": `Rename “${conv.title}”`, onclick: () => renameStart(item, conv) }),
        h("button", { type: "button", class: "small danger", text: "Delete", "aria-label": `Delete “${conv.title}”`, onclick: (e) => remove(conv, e.currentTarget) }),
      );
      return item;
    });
  el.list.replaceChildren(...items);
}

function render() {
  renderMessages();
  renderList();
  document.title = `${current().title} · lfm2`;
}

function renderAttachments() {
  el.attachments.replaceChildren(
    ...state.attachments.map((url, i) =>
      h("figure", {},
        h("img", { src: url, alt: `image ${i + 1} to send` }),
        h("button", { type: "button", class: "small", text: "Remove", "aria-label": `Remove image ${i + 1}`, onclick: () => {
          state.attachments.splice(i, 1);
          renderAttachments();
        } }))),
  );
}

function resizeInput() {
  el.input.style.height = "auto";
  el.input.style.height = `${Math.min(el.input.scrollHeight, 240)}px`;
}

// -- theme ----------------------------------------------------------------------------------

function applyTheme(theme) {
  if (theme === "auto") delete document.documentElement.dataset.theme;
  else document.documentElement.dataset.theme = theme;
  el.theme.textContent = `Theme: ${theme}`;
  el.theme.setAttribute("aria-label", `Theme: ${theme}. Change the theme`);
}

// -- start ----------------------------------------------------------------------------------

function bindEvents() {
  el.composer.addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  el.input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  el.input.addEventListener("input", resizeInput);
  el.stop.addEventListener("click", stop);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && state.busy && !el.settings.open) {
      e.preventDefault();
      stop();
    }
  });
  byId("new-chat").addEventListener("click", newChat);
  byId("export").addEventListener("click", exportAll);
  byId("import").addEventListener("click", () => el.importFile.click());
  el.importFile.addEventListener("change", () => {
    const file = el.importFile.files?.[0];
    el.importFile.value = "";
    if (file) importFile(file);
  });
  el.attach.addEventListener("click", () => el.attachFile.click());
  el.attachFile.addEventListener("change", async () => {
    const files = [...(el.attachFile.files ?? [])];
    el.attachFile.value = "";
    for (const file of files) {
      state.attachments.push(
        await new Promise((resolve, reject) => {
          const reader = new FileReader();
          reader.onload = () => resolve(String(reader.result));
          reader.onerror = () => reject(reader.error);
          reader.readAsDataURL(file);
        }),
      );
    }
    renderAttachments();
  });
  byId("open-sidebar").addEventListener("click", () => {
    const open = document.body.classList.toggle("sidebar-open");
    byId("open-sidebar").setAttribute("aria-expanded", String(open));
  });
  byId("close-sidebar").addEventListener("click", () => {
    document.body.classList.remove("sidebar-open");
    byId("open-sidebar").setAttribute("aria-expanded", "false");
  });
  el.theme.addEventListener("click", () => {
    const next = THEMES[(THEMES.indexOf(loadTheme()) + 1) % THEMES.length];
    saveTheme(next);
    applyTheme(next);
  });
  // Another tab of this page changed the conversations: show them, unless a reply is streaming here.
  window.addEventListener("storage", (e) => {
    if (e.key === "lfm2.conversations" && !state.busy) {
      state.conversations = loadConversations().conversations;
      render();
    }
  });
}

async function start() {
  applyTheme(loadTheme());
  const stored = loadConversations();
  state.conversations = stored.conversations;
  state.currentId = stored.current;
  bindEvents();
  setBusy(null);
  render();
  for (;;) {
    try {
      state.info = await getInfo();
      break;
    } catch (err) {
      if (err instanceof AuthError) {
        // lfm2 serve --api-key: ask for the key once, keep it in this browser, send it with every call
        const key = window.prompt("This server needs its API key (lfm2 serve --api-key). Key:");
        if (key) {
          setApiKey(key.trim());
          continue;
        }
        setApiKey(null);
        say("This server needs its API key: reload the page to enter it.");
      } else {
        say(`${err.message}. Is lfm2 serve still running?`);
      }
      el.send.disabled = true;
      return;
    }
  }
  el.model.textContent = state.info.model;
  el.attach.hidden = !state.info.capabilities?.vision;
  settingsPanel.fill();
  render();
  el.input.focus();
  document.body.dataset.ready = "true"; // for tests: the page has its model's facts
}

start();
