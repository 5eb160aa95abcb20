// The ownlm chat page. No dependencies and no build step; it talks only to the server that served
// it, through the OpenAI routes (/v1/models, /v1/chat/completions with stream: true).
// Model text is never parsed as HTML: the markdown renderer below builds DOM nodes and puts
// the text in text nodes, so nothing the model writes can become markup or script.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY = "ownlm.apiKey"; // sessionStorage: this tab only, forgotten when it closes
  const CHATS = "ownlm.chats"; // localStorage: [{id, title, model, updated, messages: [{role, content, meta}]}]
  const CURRENT = "ownlm.current";
  const SETTINGS = "ownlm.settings";

  // ---------------------------------------------------------------- markdown to DOM nodes
  const INLINE = new RegExp([
    "`([^`\\n]+)`", // `code`
    "\\[([^[\\]\\n]+)\\]\\(([^()\\s]+)\\)", // [label](url): no "[" inside, so a line of "[" is not quadratic
    "\\*\\*([^*\\n]+)\\*\\*", // **bold**
    "\\*([^*\\s](?:[^*\\n]*[^*\\s])?)\\*", // *italic*
  ].join("|"), "g");
  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
  const ITEM = /^ {0,3}([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const QUOTE = /^ {0,3}>\s?(.*)$/;
  const MAX_QUOTES = 8; // deeper quotes are shown as text: a line of 5,000 ">" nested past the stack

  function add(parent, tag) {
    return parent.appendChild(document.createElement(tag));
  }

  // only absolute http(s) links become links; anything else (javascript:, data:, relative) stays text
  function safeUrl(text) {
    try {
      const url = new URL(text);
      return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
    } catch (e) {
      return null;
    }
  }

  function inline(parent, text) {
    let last = 0;
    for (const m of text.matchAll(INLINE)) {
      if (m.index > last) parent.append(text.slice(last, m.index));
      if (m[1] !== undefined) {
        add(parent, "code").textContent = m[1];
      } else if (m[2] !== undefined) {
        const href = safeUrl(m[3]);
        if (href) {
          const a = add(parent, "a");
          a.href = href;
          a.rel = "noopener noreferrer";
          a.target = "_blank";
          inline(a, m[2]);
        } else {
          parent.append(m[0]);
        }
      } else if (m[4] !== undefined) {
        inline(add(parent, "strong"), m[4]);
      } else {
        inline(add(parent, "em"), m[5]);
      }
      last = m.index + m[0].length;
    }
    if (last < text.length) parent.append(text.slice(last));
  }

  // text as markdown, or as plain text if it cannot be drawn: one message never stops the page
  function renderMarkdown(container, text) {
    try {
      markdown(container, text, 0);
    } catch (e) {
      container.replaceChildren();
      container.textContent = text;
    }
  }

  // code fences (an unclosed one, while streaming, runs to the end), headings, lists, quotes, paragraphs
  function markdown(container, text, depth) {
    container.replaceChildren();
    const lines = text.split(/\r?\n/);
    let para = [];
    const flush = () => {
      if (para.length) inline(add(container, "p"), para.join("\n"));
      para = [];
    };
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if ((m = line.match(FENCE))) {
        flush();
        const close = new RegExp("^ {0,3}" + (m[1][0] === "`" ? "`" : "~") + "{" + m[1].length + ",}\\s*$");
        const body = [];
        for (i++; i < lines.length && !close.test(lines[i]); i++) body.push(lines[i]);
        i++;
        const code = add(add(container, "pre"), "code");
        if (m[2]) code.className = "language-" + m[2];
        code.textContent = body.join("\n");
      } else if ((m = line.match(/^ {0,3}(#{1,6})\s+(.*)$/))) {
        flush();
        inline(add(container, "h" + m[1].length), m[2]);
        i++;
      } else if ((m = line.match(ITEM))) {
        flush();
        const ordered = /\d/.test(m[1]);
        const list = add(container, ordered ? "ol" : "ul");
        if (ordered && parseInt(m[1], 10) !== 1) list.start = parseInt(m[1], 10);
        while (i < lines.length && (m = lines[i].match(ITEM)) && /\d/.test(m[1]) === ordered) {
          inline(add(list, "li"), m[2]);
          i++;
        }
      } else if (QUOTE.test(line) && depth < MAX_QUOTES) {
        flush();
        const quoted = [];
        for (; i < lines.length && (m = lines[i].match(QUOTE)); i++) quoted.push(m[1]);
        markdown(add(container, "blockquote"), quoted.join("\n"), depth + 1);
      } else if (!line.trim()) {
        flush();
        i++;
      } else {
        para.push(line);
        i++;
      }
    }
    flush();
  }

  // ---------------------------------------------------------------- storage
  function load(store, key, fallback) {
    try {
      const value = JSON.parse(store.getItem(key));
      return value === null ? fallback : value;
    } catch (e) {
      return fallback;
    }
  }

  // Another tab of this page writes the same storage: conversations it added are kept (merged
  // in by id, the newer of two copies winning), those this tab removed stay removed.
  function save() {
    const stored = load(localStorage, CHATS, []);
    const mine = new Map(chats.map((c) => [c.id, c]));
    for (const c of Array.isArray(stored) ? stored : []) {
      if (!c || typeof c.id !== "string" || removed.has(c.id)) continue;
      const own = mine.get(c.id);
      if (!own) chats.push(c);
      else if (c.updated > own.updated && !(controller && c.id === current)) chats[chats.indexOf(own)] = c;
    }
    try {
      localStorage.setItem(CHATS, JSON.stringify(chats));
      localStorage.setItem(CURRENT, JSON.stringify(current));
      unsaved = null;
    } catch (e) {
      unsaved = e.message; // said with every status until a save succeeds
      status("could not keep the conversation in this browser: " + e.message, true);
    }
  }

  function saveSettings() {
    const settings = {model: $("model").value, system: $("system").value, temperature: $("temperature").value,
                      maxTokens: $("max-tokens").value};
    try {
      localStorage.setItem(SETTINGS, JSON.stringify(settings));
    } catch (e) { /* settings are a convenience */ }
  }

  let chats = load(localStorage, CHATS, []);
  if (!Array.isArray(chats)) chats = [];
  let current = load(localStorage, CURRENT, null);
  const removed = new Set(); // conversations deleted in this tab
  let unsaved = null; // why the last save failed (storage full), while it does
  let controller = null; // the AbortController of the answer being streamed

  const apiKey = () => sessionStorage.getItem(KEY) || "";
  const auth = () => (apiKey() ? {Authorization: "Bearer " + apiKey()} : {});
  const currentChat = () => chats.find((c) => c.id === current) || null;

  function status(text, error) {
    if (unsaved && !error) [text, error] = [text + " \u00b7 not kept in this browser: " + unsaved, true];
    $("status").textContent = text;
    $("status").classList.toggle("error", !!error);
  }

  async function errorOf(response) {
    const text = await response.text();
    try {
      const body = JSON.parse(text);
      const e = body.error;
      return (e && (e.message || (typeof e === "string" && e))) || body.detail || text;
    } catch (e) {
      return text || response.statusText;
    }
  }

  // ---------------------------------------------------------------- views
  function renderSidebar() {
    const list = $("conversations");
    list.replaceChildren();
    for (const chat of [...chats].sort((a, b) => b.updated - a.updated)) {
      const li = add(list, "li");
      li.dataset.id = chat.id;
      li.classList.toggle("current", chat.id === current);
      const open = add(li, "button");
      open.type = "button";
      open.className = "open";
      open.textContent = chat.title;
      open.title = chat.title;
      open.addEventListener("click", () => select(chat.id));
      const del = add(li, "button");
      del.type = "button";
      del.className = "delete";
      del.textContent = "\u00d7";
      del.title = "Delete this conversation";
      del.setAttribute("aria-label", "Delete " + chat.title);
      del.addEventListener("click", () => remove(chat.id));
    }
  }

  function messageView(message) {
    const div = add($("messages"), "div");
    div.className = "message " + message.role;
    add(div, "div").className = "role";
    div.firstChild.textContent = message.role === "user" ? "You" : "Assistant";
    const content = add(div, "div");
    content.className = "content";
    renderMarkdown(content, message.content);
    const meta = add(div, "div");
    meta.className = "meta" + (message.error ? " error" : "");
    meta.textContent = message.meta || "";
    div.scrollIntoView({block: "end"});
    return {div, content, meta};
  }

  function renderMessages() {
    $("messages").replaceChildren();
    const chat = currentChat();
    for (const message of chat ? chat.messages : []) messageView(message);
  }

  function select(id) {
    if (controller) return;
    current = id;
    save();
    renderSidebar();
    renderMessages();
    $("input").focus();
  }

  function remove(id) {
    if (controller) return;
    chats = chats.filter((c) => c.id !== id);
    removed.add(id);
    if (current === id) current = null;
    save();
    renderSidebar();
    renderMessages();
  }

  function setBusy(busy) {
    $("send").hidden = busy;
    $("stop").hidden = !busy;
    $("new-chat").disabled = busy;
  }

  // ---------------------------------------------------------------- the server
  function askKey(reason) {
    $("key-reason").textContent = reason;
    $("key-panel").hidden = false;
    $("key").value = "";
    $("key").focus();
  }

  async function loadModels() {
    status("loading the models\u2026");
    $("forget-key").hidden = !apiKey();
    let response;
    try {
      response = await fetch("/v1/models", {headers: auth()});
    } catch (e) {
      return status("cannot reach the server: " + e.message, true);
    }
    if (response.status === 401) {
      const had = !!apiKey();
      sessionStorage.removeItem(KEY);
      $("forget-key").hidden = true;
      status("an API key is needed", true);
      return askKey(had ? "The server refused that key: try again." : "This server needs an API key.");
    }
    if (!response.ok) return status("the models could not be listed: " + (await errorOf(response)), true);
    const ids = ((await response.json()).data || []).map((m) => m.id);
    const select = $("model");
    const wanted = select.value || (currentChat() && currentChat().model) || load(localStorage, SETTINGS, {}).model;
    select.replaceChildren();
    for (const id of ids) {
      const option = add(select, "option");
      option.value = id;
      option.textContent = id;
    }
    if (ids.includes(wanted)) select.value = wanted;
    status(ids.length ? "ready" : "this server has no models: start it with ownlm serve MODEL", !ids.length);
  }

  // the data of each server-sent event, in batches: all the events one network read brought
  async function* sseBatches(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const {value, done} = await reader.read();
        if (done) return;
        buffer = (buffer + decoder.decode(value, {stream: true})).replace(/\r\n/g, "\n");
        const events = buffer.split("\n\n");
        buffer = events.pop();
        const batch = [];
        for (const event of events) {
          const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, ""));
          if (data.length) batch.push(data.join("\n"));
        }
        if (batch.length) yield batch;
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  function request(chat) {
    const messages = [];
    const system = $("system").value.trim();
    if (system) messages.push({role: "system", content: system});
    for (const m of chat.messages) if (m.content) messages.push({role: m.role, content: m.content}); // not a stopped empty answer
    const body = {model: $("model").value, messages, stream: true, stream_options: {include_usage: true}};
    const temperature = $("temperature").value.trim();
    if (temperature !== "") body.temperature = Number(temperature);
    const maxTokens = $("max-tokens").value.trim();
    if (maxTokens !== "") body.max_tokens = Number(maxTokens);
    return body;
  }

  async function send(text) {
    if (controller || !text.trim()) return;
    if (!$("model").value) return status("no model to talk to (is an API key needed?)", true);
    let chat = currentChat();
    if (!chat) {
      chat = {id: Date.now().toString(36) + Math.random().toString(36).slice(2, 8), title: "New chat", messages: []};
      chats.push(chat);
      current = chat.id;
    }
    if (!chat.messages.length) chat.title = text.trim().split("\n")[0].slice(0, 60);
    chat.model = $("model").value;
    chat.updated = Date.now();
    const user = {role: "user", content: text};
    chat.messages.push(user);
    save();
    renderSidebar();
    messageView(user);
    const body = request(chat);
    const answer = {role: "assistant", content: ""};
    const view = messageView(answer);
    view.div.classList.add("streaming");
    view.div.dataset.state = "streaming";
    view.div.dataset.chunks = "0";
    controller = new AbortController();
    setBusy(true);
    status("answering\u2026");
    let finish = null;
    let usage = null;
    let error = null;
    const started = performance.now();
    // repaint at most once a frame, and less often while a long answer takes long to render, so
    // the page (and its stop button) stays responsive however fast the tokens come
    let timer = null;
    let painted = 0;
    let cost = 0;
    const paint = () => {
      timer = null;
      const t = performance.now();
      renderMarkdown(view.content, answer.content);
      view.div.dataset.chunks = String(Number(view.div.dataset.chunks) + 1);
      view.div.scrollIntoView({block: "end"});
      painted = performance.now();
      cost = painted - t;
    };
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST", headers: {"Content-Type": "application/json", ...auth()}, body: JSON.stringify(body),
        signal: controller.signal});
      if (!response.ok) {
        error = await errorOf(response);
        if (response.status === 401) {
          sessionStorage.removeItem(KEY);
          askKey("The server refused the key: enter it again.");
        }
      } else {
        read: for await (const batch of sseBatches(response.body)) {
          for (const data of batch) {
            if (data === "[DONE]") break read;
            let event;
            try {
              event = JSON.parse(data);
            } catch (e) {
              continue;
            }
            if (event.error) {
              error = event.error.message || String(event.error);
              break read;
            }
            if (event.usage) usage = event.usage;
            const choice = event.choices && event.choices[0];
            if (!choice) continue;
            if (choice.delta && choice.delta.content) answer.content += choice.delta.content;
            if (choice.finish_reason) finish = choice.finish_reason;
          }
          if (timer === null) timer = setTimeout(paint, Math.max(0, 16 + 3 * cost - (performance.now() - painted)));
        }
      }
    } catch (e) {
      if (e.name === "AbortError") finish = "stopped";
      else error = e.message;
    } finally {
      clearTimeout(timer);
      controller = null;
      setBusy(false);
    }
    const notes = [];
    if (finish === "stopped") notes.push("stopped");
    else if (finish === "length") notes.push("cut at the max tokens limit");
    if (usage) {
      const seconds = (performance.now() - started) / 1000;
      notes.push(usage.completion_tokens + " tokens, " + (usage.completion_tokens / seconds).toFixed(1) + " tokens/s");
    }
    if (error) {
      notes.push("error: " + error);
      answer.error = true;
    }
    answer.meta = notes.join(" \u00b7 ");
    chat.messages.push(answer);
    chat.updated = Date.now();
    save();
    renderMarkdown(view.content, answer.content);
    view.meta.textContent = answer.meta;
    view.meta.classList.toggle("error", !!error);
    view.div.classList.remove("streaming");
    view.div.dataset.finish = error ? "error" : finish || "";
    view.div.dataset.state = "done";
    status(error ? "error" : "ready", !!error);
  }

  // ---------------------------------------------------------------- wiring
  function start() {
    const settings = load(localStorage, SETTINGS, {});
    if (typeof settings.system === "string") $("system").value = settings.system;
    if (settings.temperature !== undefined) $("temperature").value = settings.temperature;
    if (settings.maxTokens !== undefined) $("max-tokens").value = settings.maxTokens;
    for (const id of ["model", "system", "temperature", "max-tokens"]) $(id).addEventListener("change", saveSettings);

    $("composer").addEventListener("submit", (e) => {
      e.preventDefault();
      const text = $("input").value;
      if (!text.trim() || controller) return;
      $("input").value = "";
      send(text);
    });
    $("input").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        $("composer").requestSubmit();
      }
    });
    $("stop").addEventListener("click", () => controller && controller.abort());
    window.addEventListener("storage", (e) => { // another tab saved: show its conversations too
      if (e.key !== CHATS || controller) return;
      const stored = load(localStorage, CHATS, []);
      if (!Array.isArray(stored)) return;
      chats = stored.filter((c) => c && typeof c.id === "string" && !removed.has(c.id));
      renderSidebar();
      renderMessages();
    });
    document.addEventListener("keydown", (e) => {
      if (e.key === "Escape" && !e.isComposing && controller) controller.abort();
    });
    $("new-chat").addEventListener("click", () => select(null));
    $("key-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const key = $("key").value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY, key);
      $("key-panel").hidden = true;
      loadModels();
    });
    $("forget-key").addEventListener("click", () => {
      sessionStorage.removeItem(KEY);
      loadModels();
    });
    if (!currentChat()) current = null;
    renderSidebar();
    renderMessages();
    loadModels();
  }

  start();
})();
