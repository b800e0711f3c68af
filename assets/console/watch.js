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
    // Playing up to 1.5x fast catches up with the live edge after a start
    // on a keyframe further back than the target latency.
    hls = new Hls({ lowLatencyMode: true, maxLiveSyncPlaybackRate: 1.5 });
    // Two segments behind live for plain HLS (hls.js's default is three).
    // Set after construction: given to the constructor, it would also
    // override an LL-HLS playlist's PART-HOLD-BACK (hls.js then sat 2 target
    // durations, over 4 s, behind LL-HLS instead of 3 parts).
    hls.config.liveSyncDurationCount = 2;
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

/** How far behind live the picture on screen is, in seconds: `wallClock`
 *  is this machine's clock minus the EXT-X-PROGRAM-DATE-TIME of the frame
 *  shown (the gateway's clock when that frame arrived; needs synchronized
 *  clocks), `latency` and `target` are hls.js's distance to the playlist's
 *  live edge and the distance it aims for. Null without hls.js. */
function behindLive() {
  if (!hls) return null;
  const date = hls.playingDate;
  return {
    wallClock: date ? (Date.now() - date.getTime()) / 1000 : null,
    latency: hls.latency,
    target: hls.targetLatency,
  };
}
window.behindLive = behindLive;

video.addEventListener("timeupdate", () => {
  const behind = behindLive();
  const seconds = behind && (behind.wallClock ?? behind.latency);
  document.getElementById("time").textContent = video.currentTime.toFixed(1) + " s"
    + (seconds == null ? "" : ` · ${seconds.toFixed(1)} s behind live`);
});
video.addEventListener("ended", () => setState("ended", false));

start();
