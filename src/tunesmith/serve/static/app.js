// tunesmith chat page: plain JS, no build step, talks to this server's OpenAI-compatible API.
"use strict";

const $ = (id) => document.getElementById(id);
const el = {
  model: $("model"), system: $("system"), temperature: $("temperature"), tempOut: $("tempOut"),
  maxTokens: $("maxTokens"), keyRow: $("keyRow"), apiKey: $("apiKey"), settings: $("settings"),
  toggleSettings: $("toggleSettings"), reset: $("reset"), error: $("error"), errorText: $("errorText"),
  errorClose: $("errorClose"), messages: $("messages"), empty: $("empty"), composer: $("composer"),
  input: $("input"), send: $("send"), stop: $("stop"),
};

let history = [];        // [{role, content}] of finished turns
let controller = null;   // AbortController of the answer being streamed

// ------------------------------------------------------------------ helpers

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = el.apiKey.value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(message) {
  el.errorText.textContent = message;
  el.error.hidden = false;
}

function clearError() {
  el.error.hidden = true;
  el.errorText.textContent = "";
}

async function errorMessage(res) {
  try {
    const body = await res.json();
    if (body && body.error && body.error.message) return `${res.status}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `${res.status} ${res.statusText || "error"}`;
}

function openSettings(open) {
  el.settings.hidden = !open;
  el.toggleSettings.setAttribute("aria-expanded", String(open));
}

function bubble(role, text) {
  el.empty.hidden = true;
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;  // never innerHTML: model output is untrusted
  el.messages.appendChild(div);
  scrollDown();
  return div;
}

function scrollDown() {
  el.messages.scrollTop = el.messages.scrollHeight;
}

function setBusy(busy) {
  el.send.hidden = busy;
  el.stop.hidden = !busy;
  el.model.disabled = busy;
}

function autosize() {
  el.input.style.height = "auto";
  el.input.style.height = Math.min(el.input.scrollHeight, 192) + "px";
  el.input.style.overflowY = el.input.scrollHeight > 192 ? "auto" : "hidden";
}

// ------------------------------------------------------------------ server

async function loadModels() {
  let res;
  try {
    res = await fetch("/v1/models", { headers: headers() });
  } catch (e) {
    showError("cannot reach the server: " + e.message);
    return;
  }
  if (res.status === 401) {
    el.model.innerHTML = "";
    el.model.appendChild(new Option("enter the API key in Settings", ""));
    el.keyRow.hidden = false;
    openSettings(true);
    el.apiKey.focus();
    showError(el.apiKey.value ? "the API key was refused" : "this server needs an API key: enter it in Settings");
    return;
  }
  if (!res.ok) {
    showError("could not list models: " + (await errorMessage(res)));
    return;
  }
  const data = (await res.json()).data || [];
  const previous = el.model.value || localStorage.getItem("tunesmith.model");
  el.model.innerHTML = "";
  for (const m of data) {
    el.model.appendChild(new Option(m.parent ? `${m.id}  (adapter on ${m.parent})` : m.id, m.id));
  }
  if (data.some((m) => m.id === previous)) el.model.value = previous;
  clearError();
}

// Yields the `data:` payload of each server-sent event in a fetch response body.
async function* sseData(res) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const data = block.split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield data;  // comment lines (": keep-alive") carry no data
    }
  }
}

async function send(text) {
  clearError();
  const model = el.model.value;
  if (!model) {
    showError("no model selected" + (el.keyRow.hidden ? "" : " (is the API key right?)"));
    return;
  }
  const system = el.system.value.trim();
  const messages = [
    ...(system ? [{ role: "system", content: system }] : []),
    ...history,
    { role: "user", content: text },
  ];
  const body = {
    model, messages, stream: true, stream_options: { include_usage: true },
    temperature: Number(el.temperature.value),
    max_tokens: Math.max(1, parseInt(el.maxTokens.value, 10) || 512),
  };

  bubble("user", text);
  const out = bubble("assistant", "");
  out.classList.add("pending");
  controller = new AbortController();
  setBusy(true);
  let answer = "";
  let usage = null;
  let firstAt = 0;
  const started = performance.now();
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!res.ok) throw new Error(await errorMessage(res));
    for await (const data of sseData(res)) {
      if (data === "[DONE]") break;
      const ev = JSON.parse(data);
      if (ev.error) throw new Error(ev.error.message || "generation failed");
      if (ev.usage) usage = ev.usage;
      const piece = ev.choices && ev.choices[0] && ev.choices[0].delta && ev.choices[0].delta.content;
      if (piece) {
        if (!firstAt) firstAt = performance.now();
        answer += piece;
        out.textContent = answer;
        scrollDown();
      }
    }
    history.push({ role: "user", content: text }, { role: "assistant", content: answer });
  } catch (e) {
    if (e.name === "AbortError") {
      // stopped by the user: keep what came so far
      history.push({ role: "user", content: text }, { role: "assistant", content: answer });
    } else {
      out.classList.add("failed");
      if (!answer) out.textContent = "(no answer)";
      showError(e.message);
      if (!answer && !el.input.value) el.input.value = text;
    }
  } finally {
    out.classList.remove("pending");
    controller = null;
    setBusy(false);
    if (usage && answer) {
      const meta = document.createElement("span");
      meta.className = "meta";
      const secs = (performance.now() - (firstAt || started)) / 1000;
      const rate = secs > 0 ? ` · ${(usage.completion_tokens / secs).toFixed(1)} tok/s` : "";
      meta.textContent = `${usage.completion_tokens} tokens${rate}`;
      out.appendChild(meta);
    }
    el.input.focus();
  }
}

function reset() {
  if (controller) controller.abort();
  history = [];
  for (const node of [...el.messages.querySelectorAll(".msg")]) node.remove();
  el.empty.hidden = false;
  clearError();
  el.input.focus();
}

// ------------------------------------------------------------------ wiring

el.composer.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = el.input.value.trim();
  if (!text || controller) return;
  el.input.value = "";
  autosize();
  send(text);
});
el.input.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    el.composer.requestSubmit();
  }
});
el.input.addEventListener("input", autosize);
el.stop.addEventListener("click", () => controller && controller.abort());
el.reset.addEventListener("click", reset);
el.errorClose.addEventListener("click", clearError);
el.toggleSettings.addEventListener("click", () => openSettings(el.settings.hidden));
el.temperature.addEventListener("input", () => { el.tempOut.textContent = el.temperature.value; });
el.model.addEventListener("change", () => localStorage.setItem("tunesmith.model", el.model.value));
el.system.addEventListener("change", () => localStorage.setItem("tunesmith.system", el.system.value));
el.apiKey.addEventListener("change", () => {
  sessionStorage.setItem("tunesmith.key", el.apiKey.value.trim());  // this tab only
  loadModels();
});

(async function init() {
  el.system.value = localStorage.getItem("tunesmith.system") || "";
  el.apiKey.value = sessionStorage.getItem("tunesmith.key") || "";
  autosize();
  try {
    const health = await (await fetch("/health")).json();
    if (health.auth_required) el.keyRow.hidden = false;
  } catch (e) {
    showError("cannot reach the server: " + e.message);
  }
  await loadModels();
})();
