// The web chat (chat.html): multi-turn, streaming, thumbs up / down and report on each answer.
// A rating names the answer by the completion id the server gave it; the server stores what it served.
"use strict";
const $ = (id) => document.getElementById(id);
let model = null, history = [], conversationId = newId(), busy = false;

function newId() {
  return (crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) + Math.random().toString(16).slice(2));
}
function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("apikey").value || localStorage.getItem("cherrytop-key");
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}
async function apiError(resp) {
  if (resp.status === 401) $("keylabel").hidden = false;
  try { return (await resp.json()).error.message; } catch (e) { return resp.status + " " + resp.statusText; }
}
function add(cls, text) {
  const div = document.createElement("div");
  div.className = "msg " + cls;
  const span = document.createElement("div");
  span.className = "text";
  span.textContent = text;
  div.appendChild(span);
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}
function showError(text) {
  const div = document.createElement("div");
  div.className = "error";
  div.textContent = text;
  $("log").appendChild(div);
}

async function loadModel() {
  const resp = await fetch("/v1/models", {headers: headers()});
  if (!resp.ok) { showError(await apiError(resp)); return; }
  model = (await resp.json()).data[0].id;
  $("model").textContent = model;
}

async function send(text) {
  if (!model) await loadModel();
  if (!model) return;
  busy = true; $("send").disabled = true;
  history.push({role: "user", content: text});
  add("user", text);
  const settings = {temperature: parseFloat($("temperature").value), max_tokens: parseInt($("max_tokens").value, 10)};
  const prompt = history.slice();
  const div = add("assistant streaming", "");
  const out = div.querySelector(".text");
  let answer = "", finish = null, lastDelta = "", servedId = null;
  try {
    const resp = await fetch("/v1/chat/completions", {method: "POST", headers: headers(),
      body: JSON.stringify({model, messages: prompt, stream: true, ...settings})});
    if (!resp.ok) throw new Error(await apiError(resp));
    const reader = resp.body.getReader(), decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut); buf = buf.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        servedId = chunk.id;
        for (const c of chunk.choices) {
          if (c.delta && c.delta.content) { answer += c.delta.content; lastDelta = c.delta.content; out.textContent = answer; }
          if (c.finish_reason) finish = c.finish_reason;
        }
        $("log").scrollTop = $("log").scrollHeight;
      }
    }
  } catch (e) {
    div.remove(); history.pop(); showError(String(e.message || e));
    busy = false; $("send").disabled = false;
    return;
  }
  div.classList.remove("streaming");
  div.dataset.finish = finish || "";
  if (finish === "content_filter") {  // the server ends a blocked answer with its safe message
    div.classList.add("filtered");
    answer = out.textContent = lastDelta;  // (sent as one piece after any text released before the block)
    history.pop();  // leave the blocked exchange out of the conversation the model sees next
  } else {
    history.push({role: "assistant", content: answer});
  }
  addActions(div, servedId);
  busy = false; $("send").disabled = false;
  $("input").focus();
}

const ICON = (d) => '<svg viewBox="0 0 24 24" width="15" height="15" fill="none" stroke="currentColor" ' +
  'stroke-width="2" stroke-linecap="round" stroke-linejoin="round" aria-hidden="true"><path d="' + d + '"/></svg>';
const ICONS = {  // Feather's thumbs-up / thumbs-down (MIT), inline so no emoji font is needed
  up: ICON("M14 9V5a3 3 0 0 0-3-3l-4 9v11h11.28a2 2 0 0 0 2-1.7l1.38-9a2 2 0 0 0-2-2.3zM7 22H4a2 2 0 0 1-2-2v-7a2 2 0 0 1 2-2h3"),
  down: ICON("M10 15v4a3 3 0 0 0 3 3l4-9V2H5.72a2 2 0 0 0-2 1.7l-1.38 9a2 2 0 0 0 2 2.3zm7-13h2.67A2.31 2.31 0 0 1 22 4v7a2.31 2.31 0 0 1-2.33 2H17"),
};

function addActions(div, servedId) {
  const bar = document.createElement("div");
  bar.className = "actions";
  const thanks = document.createElement("span");
  thanks.className = "thanks";
  const rate = async (rating, button, comment) => {
    const resp = await fetch("/v1/feedback", {method: "POST", headers: headers(), body: JSON.stringify({
      id: servedId, index: 0, rating, conversation_id: conversationId, comment: comment || null})});
    if (!resp.ok) { thanks.textContent = "not saved: " + await apiError(resp); return; }
    bar.querySelectorAll("button").forEach((b) => b.classList.remove("chosen"));
    button.classList.add("chosen");
    thanks.textContent = rating === "report" ? "reported, thank you" : "thanks for the feedback";
  };
  const make = (label, title, onClick) => {
    const b = document.createElement("button");
    b.type = "button"; b.title = title; b.setAttribute("aria-label", title);
    if (ICONS[label]) b.innerHTML = ICONS[label]; else b.textContent = label;
    b.addEventListener("click", () => onClick(b));
    bar.appendChild(b);
    return b;
  };
  make("up", "good answer", (b) => rate("up", b));
  make("down", "bad answer", (b) => rate("down", b));
  make("report", "report this answer", (b) => {
    if (div.querySelector(".report-box")) return;
    const box = document.createElement("div");
    box.className = "report-box";
    const input = document.createElement("input");
    input.placeholder = "What is wrong with this answer? (optional)";
    input.maxLength = 2000;  // the server's limit on a comment
    const ok = document.createElement("button");
    ok.type = "button"; ok.textContent = "send report";
    ok.addEventListener("click", async () => { await rate("report", b, input.value); box.remove(); });
    box.append(input, ok);
    div.appendChild(box);
    input.focus();
  });
  bar.appendChild(thanks);
  div.appendChild(bar);
}

$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || busy) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("form").requestSubmit(); }
});
$("apikey").addEventListener("change", () => { localStorage.setItem("cherrytop-key", $("apikey").value); loadModel(); });
$("reset").addEventListener("click", () => { history = []; conversationId = newId(); $("log").innerHTML = ""; });
loadModel();
