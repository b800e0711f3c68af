// Plays /hls/STREAM/index.m3u8 with hls.js (or the browser's own HLS), and
// waits for the stream when it is not live yet.
"use strict";

const stream = whipgate.streamFromPath();
const url = "/hls/" + encodeURIComponent(stream) + "/index.m3u8";
const video = document.getElementById("video");
const state = document.getElementById("state");
document.getElementById("name").textContent = stream;
document.title = stream + " · whipgate";
const playlist = document.getElementById("playlist");
playlist.href = url;
playlist.textContent = url;
document.getElementById("publish-link").href = "/publish/" + encodeURIComponent(stream);
// Absolute URLs to copy into a player or an encoder (click selects).
for (const [id, path] of [["hls-url", url], ["whip-url", "/whip/" + encodeURIComponent(stream)]]) {
  const input = document.getElementById(id);
  input.value = new URL(path, location.href).href;
  input.addEventListener("focus", () => input.select());
}

let hls = null;

function setState(text, live) {
  state.textContent = text;
  state.className = live ? "badge live" : "badge";
}

/** Plays as soon as the playlist exists; tries again every 2 s until then. */
function start() {
  if (hls) {
    hls.destroy();
    hls = null;
  }
  if (window.Hls && Hls.isSupported()) {
    hls = new Hls({ liveSyncDurationCount: 2, lowLatencyMode: true });
    hls.on(Hls.Events.MANIFEST_PARSED, () => {
      setState("playing", true);
      video.play().catch(() => {});
    });
    hls.on(Hls.Events.ERROR, (_, data) => {
      if (!data.fatal) return;
      if (data.type === Hls.ErrorTypes.MEDIA_ERROR) {
        hls.recoverMediaError();
        return;
      }
      setState("waiting for the stream", false);
      setTimeout(start, 2000);
    });
    hls.loadSource(url);
    hls.attachMedia(video);
  } else if (video.canPlayType("application/vnd.apple.mpegurl")) {
    video.src = url;
    video.addEventListener("error", () => {
      setState("waiting for the stream", false);
      setTimeout(() => video.load(), 2000);
    });
    video.play().catch(() => {});
    setState("playing", true);
  } else {
    setState("this browser cannot play HLS", false);
  }
}

video.addEventListener("timeupdate", () => {
  document.getElementById("time").textContent = video.currentTime.toFixed(1) + " s";
});
video.addEventListener("ended", () => setState("ended", false));

start();
