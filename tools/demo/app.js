// The kythera demo page: a chat over the chat gear (/chat) and the server's live
// per-shard figures from the stats gear (/stats). Plain DOM, no build step: the files
// are embedded in the kythera binary as they are.
"use strict";

const $ = (id) => document.getElementById(id);
const wsBase = (location.protocol === "https:" ? "wss://" : "ws://") + location.host;

// ----- chat -----

let chat = null;

function setStatus(text, state) {
  const el = $("status");
  el.textContent = text;
  el.dataset.state = state;
}

function addLine(parts, cls) {
  const li = document.createElement("li");
  if (cls) li.className = cls;
  for (const [text, partCls] of parts) {
    const span = document.createElement("span");
    span.textContent = text;
    if (partCls) span.className = partCls;
    li.appendChild(span);
  }
  const list = $("messages");
  list.appendChild(li);
  list.scrollTop = list.scrollHeight;
}

function setJoined(joined) {
  $("join").disabled = joined;
  $("name").disabled = joined;
  $("room").disabled = joined;
  $("leave").disabled = !joined;
  $("text").disabled = !joined;
  $("send").disabled = !joined;
}

function join(name, room) {
  const url = `${wsBase}/chat?room=${encodeURIComponent(room)}&name=${encodeURIComponent(name)}`;
  const ws = new WebSocket(url);
  chat = ws;
  let opened = false;
  setStatus(`joining ${room} as ${name}…`, "joining");
  $("join").disabled = true;
  ws.onopen = () => {
    opened = true;
    setJoined(true);
    setStatus(`in room ${room} as ${name}`, "joined");
    $("text").focus();
  };
  ws.onmessage = (ev) => {
    let msg;
    try {
      msg = JSON.parse(ev.data);
    } catch {
      addLine([[String(ev.data), null]], "error");
      return;
    }
    if (msg.error) {
      addLine([["error: ", "from"], [msg.error, null]], "error");
    } else if (msg.to) {
      addLine([[`${msg.from} → ${msg.to}: `, "from"], [msg.text, "text"], [" (direct)", "meta"]], "direct");
    } else {
      addLine([[`${msg.from}: `, "from"], [msg.text, "text"]], "room");
    }
  };
  ws.onclose = (ev) => {
    if (chat === ws) chat = null;
    setJoined(false);
    if (!opened) {
      // The browser hides the handshake's status; 409 (name taken) is the usual cause.
      setStatus(`could not join: the name "${name}" may be taken, or the server refused`, "error");
    } else if (ev.code === 1000 || ev.code === 1005) {
      setStatus("left the chat", "idle");
    } else {
      setStatus(`disconnected: ${ev.code} ${ev.reason}`, "error");
    }
  };
}

$("join-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const name = $("name").value.trim();
  const room = $("room").value.trim();
  if (name && room && !chat) join(name, room);
});

$("leave").addEventListener("click", () => {
  if (chat) chat.close(1000, "bye");
});

$("send-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("text").value;
  if (!chat || chat.readyState !== WebSocket.OPEN || text === "") return;
  const to = $("to").value.trim();
  chat.send(JSON.stringify(to ? { to, text } : { text }));
  if (to) addLine([[`me → ${to}: `, "from"], [text, "text"]], "direct sent");
  $("text").value = "";
});

// ----- live figures -----

const history = []; // [in_per_sec, out_per_sec], one per second, last minute
const fmt = (n) => (n >= 1000 ? Math.round(n).toLocaleString("en") : String(n));

function drawChart() {
  const canvas = $("rate-chart");
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  const max = Math.max(1, ...history.flat());
  const series = [[0, "#2f6fdd"], [1, "#e07a1f"]];
  for (const [i, color] of series) {
    ctx.beginPath();
    ctx.strokeStyle = color;
    ctx.lineWidth = 2;
    history.forEach((p, x) => {
      const px = (x / 59) * (w - 4) + 2;
      const py = h - 4 - (p[i] / max) * (h - 20);
      if (x === 0) ctx.moveTo(px, py); else ctx.lineTo(px, py);
    });
    ctx.stroke();
  }
  ctx.fillStyle = "#5b6570";
  ctx.font = "11px system-ui";
  ctx.fillText(`max ${fmt(max)}/s   ▬ in  `, 6, 12);
  ctx.fillStyle = "#e07a1f";
  ctx.fillText("▬ out", 110, 12);
}

function showCluster(f) {
  const el = $("cluster");
  if (!f.node) {
    el.hidden = true;
    return;
  }
  el.hidden = false;
  $("node").textContent = f.node;
  $("node-count").textContent = `${f.nodes.length} live node${f.nodes.length === 1 ? "" : "s"}`;
  $("nodes").textContent = f.nodes.join(", ");
}

function showFigures(f) {
  showCluster(f);
  const body = $("shards").tBodies[0];
  body.replaceChildren();
  for (const s of f.shards) {
    const tr = document.createElement("tr");
    tr.dataset.shard = s.shard;
    for (const v of [s.shard, fmt(s.connections), fmt(s.in_per_sec), fmt(s.out_per_sec)]) {
      const td = document.createElement("td");
      td.textContent = v;
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
  $("total-connections").textContent = fmt(f.connections);
  $("total-in").textContent = fmt(f.in_per_sec);
  $("total-out").textContent = fmt(f.out_per_sec);
  history.push([f.in_per_sec, f.out_per_sec]);
  if (history.length > 60) history.shift();
  drawChart();
}

function watch() {
  const ws = new WebSocket(`${wsBase}/stats`);
  const status = $("stats-status");
  ws.onopen = () => {
    status.textContent = "live, every second";
    status.dataset.state = "live";
  };
  ws.onmessage = (ev) => {
    try {
      showFigures(JSON.parse(ev.data));
    } catch (e) {
      console.warn("bad stats frame", e);
    }
  };
  ws.onclose = () => {
    status.textContent = "disconnected from /stats; retrying in 2 s";
    status.dataset.state = "error";
    setTimeout(watch, 2000);
  };
}

watch();
drawChart();
