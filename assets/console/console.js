// The stream list: polls GET /api/v1/streams every 2 s.
"use strict";

const { el } = whipgate;
const tbody = document.getElementById("streams");
const status = document.getElementById("status");

function row(s) {
  const p = s.publisher;
  const v = p && p.video;
  const a = p && p.audio;
  const state = s.live
    ? el("span", { class: "badge live" }, "live")
    : el("span", { class: "badge" }, s.running ? "idle" : "configured");
  const kick = p
    ? el("button", { "data-kick": s.name, title: "End this publication" }, "Kick")
    : null;
  const push = (s.push || []).map((t) =>
    el("div", { title: t.last_error || "" }, t.state + " ", el("span", { class: "muted" }, t.url_masked)));
  return el("tr", { "data-stream": s.name, "data-live": String(s.live) },
    el("td", {}, el("strong", {}, s.name), el("div", { class: "muted" }, s.source)),
    el("td", { class: "state" }, state, s.settings && !s.settings.enabled ? " disabled" : ""),
    el("td", {}, s.preset, s.settings_pending ? el("div", { class: "muted" }, "→ " + s.settings.preset + " next time") : null),
    el("td", {}, p ? (p.ip || "") : ""),
    el("td", {}, v ? `${v.codec} ${v.width}×${v.height} ${v.frame_rate} fps ${whipgate.bitrate(v.bitrate)}` : ""),
    el("td", {}, a ? `${a.codec} ${a.sample_rate / 1000} kHz ${whipgate.bitrate(a.bitrate)}` : ""),
    el("td", {}, p ? whipgate.duration(p.uptime_secs) : "",
      p && p.packet_loss != null ? el("div", { class: "muted" }, `${(p.packet_loss * 100).toFixed(1)}% loss`) : null),
    el("td", {}, ...push),
    el("td", {},
      el("a", { href: "/watch/" + encodeURIComponent(s.name) }, "watch"), " ",
      el("a", { href: "/publish/" + encodeURIComponent(s.name) }, "publish"), " ",
      kick),
  );
}

async function refresh() {
  try {
    const { streams } = await whipgate.api("GET", "/streams");
    tbody.replaceChildren(...streams.map(row));
    const live = streams.filter((s) => s.live).length;
    status.className = "muted";
    status.textContent = `${streams.length} stream(s), ${live} live; updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    status.className = "error";
    status.textContent = e.status === 401 || e.status === 403
      ? `The API refused: ${e.message}. Set the API token below.`
      : `Cannot list streams: ${e.message}`;
    if (e.status === 401 || e.status === 403) document.getElementById("token-box").open = true;
  }
}

tbody.addEventListener("click", async (ev) => {
  const name = ev.target.getAttribute("data-kick");
  if (!name) return;
  try {
    await whipgate.api("POST", "/streams/" + encodeURIComponent(name) + "/kick");
  } catch (e) {
    status.className = "error";
    status.textContent = "Kick: " + e.message;
  }
  refresh();
});

document.getElementById("token").value = whipgate.apiToken();
document.getElementById("save-token").addEventListener("click", (ev) => {
  ev.preventDefault();
  whipgate.setApiToken(document.getElementById("token").value.trim());
  refresh();
});
document.getElementById("open").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const name = document.getElementById("open-name").value.trim();
  location.href = "/" + ev.submitter.value + "/" + encodeURIComponent(name);
});

refresh();
setInterval(refresh, 2000);
