//! A camera that films the clock, for glass-to-glass delay: the publish page
//! gets a canvas whose pictures carry `Date.now()` (milliseconds modulo
//! 2^30) as black and white cells, each bit drawn twice (once inverted, so a
//! blurred or half-updated picture is recognized and not misread); the
//! watch page draws its video element into a canvas, reads the cells back
//! and subtracts them from its own `Date.now()`. Both pages run in the same
//! browser, hence on the same clock: the difference is the age of the
//! picture on screen, from the moment it was drawn ("glass") through
//! encoding, WebRTC, the gateway, HLS and hls.js to the decoded picture
//! shown ("glass").
#![allow(dead_code)]

use serde::Deserialize;

use super::browser::Page;

/// Replaces the publish page's `getUserMedia` with one that returns the
/// clock pictures (640x360, 30 fps) and the fake microphone.
pub const INSTALL_ON_PUBLISH_PAGE: &str = r##"(() => {
  const W = 640, H = 360, CELL = 40, BITS = 30;
  const canvas = document.createElement("canvas");
  canvas.width = W;
  canvas.height = H;
  const g = canvas.getContext("2d");
  function draw() {
    const now = Date.now();
    const value = now % 2 ** BITS;
    g.fillStyle = "#404040";
    g.fillRect(0, 0, W, H);
    for (let i = 0; i < BITS; i++) {
      const bit = Math.floor(value / 2 ** i) % 2;
      const col = i % 16, row = Math.floor(i / 16);
      g.fillStyle = bit ? "#fff" : "#000";
      g.fillRect(col * CELL, row * CELL, CELL, CELL);
      g.fillStyle = bit ? "#000" : "#fff";
      g.fillRect(col * CELL, (row + 2) * CELL, CELL, CELL);
    }
    g.fillStyle = "#fff";
    g.font = "48px monospace";
    g.fillText(new Date(now).toISOString().slice(11, 23), 20, 240);
    g.fillRect((now / 4) % W, 290, 16, 60);
  }
  draw();
  setInterval(draw, 1000 / 30);
  const track = canvas.captureStream(30).getVideoTracks()[0];
  window.clockCamera = canvas;
  const devices = navigator.mediaDevices;
  const original = devices.getUserMedia.bind(devices);
  devices.getUserMedia = async (constraints) => {
    const media = constraints.audio ? await original({ audio: constraints.audio }) : new MediaStream();
    media.addTrack(track);
    return media;
  };
  return true;
})()"##;

/// Keeps hls.js's errors (stalls, gaps, failed loads) on the watch page for
/// [`sample`] to collect.
pub const RECORD_HLS_ERRORS: &str = r##"(() => {
  window.hlsErrors = [];
  hls.on(Hls.Events.ERROR, (_, d) => {
    const video = document.getElementById("video");
    hlsErrors.push(`${video.currentTime.toFixed(2)} ${d.details}${d.fatal ? " (fatal)" : ""}`);
  });
  return true;
})()"##;

/// One look at the watch page: the clock read from the picture on screen,
/// the page's own view of how far behind live it is (`behindLive()` in
/// watch.js) and the playback position.
const SAMPLE_ON_WATCH_PAGE: &str = r##"(() => {
  const W = 640, H = 360, CELL = 40, BITS = 30;
  const video = document.getElementById("video");
  const behind = window.behindLive ? behindLive() : null;
  const sample = {
    ageMs: null,
    wallClockS: behind && behind.wallClock,
    latencyS: behind && behind.latency,
    targetS: behind && behind.target,
    currentTime: video.currentTime,
    paused: video.paused,
    buffered: Array.from({ length: video.buffered.length },
      (_, i) => video.buffered.start(i).toFixed(2) + "-" + video.buffered.end(i).toFixed(2)).join(" "),
    errors: window.hlsErrors ? hlsErrors.splice(0) : [],
  };
  if (!video.videoWidth) return sample;
  if (!window.clockReader) {
    window.clockReader = document.createElement("canvas");
    window.clockReader.width = W;
    window.clockReader.height = H;
  }
  const g = window.clockReader.getContext("2d", { willReadFrequently: true });
  g.drawImage(video, 0, 0, W, H);
  const shownAt = Date.now();
  const px = g.getImageData(0, 0, W, 4 * CELL).data;
  // Mean luma of the middle half of a cell.
  const luma = (col, row) => {
    let sum = 0, n = 0;
    for (let y = row * CELL + CELL / 4; y < (row + 1) * CELL - CELL / 4; y++) {
      for (let x = col * CELL + CELL / 4; x < (col + 1) * CELL - CELL / 4; x++) {
        const o = (y * W + x) * 4;
        sum += 0.299 * px[o] + 0.587 * px[o + 1] + 0.114 * px[o + 2];
        n++;
      }
    }
    return sum / n;
  };
  let value = 0;
  for (let i = 0; i < BITS; i++) {
    const col = i % 16, row = Math.floor(i / 16);
    const bit = luma(col, row), inverted = luma(col, row + 2);
    if (Math.abs(bit - inverted) < 64) return sample;
    if (bit > inverted) value += 2 ** i;
  }
  sample.ageMs = (((shownAt - value) % 2 ** BITS) + 2 ** BITS) % 2 ** BITS;
  return sample;
})()"##;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sample {
    /// Glass to glass: now minus the clock in the picture on screen (None
    /// when the picture could not be read).
    pub age_ms: Option<f64>,
    /// Now minus the program date time of the frame on screen.
    pub wall_clock_s: Option<f64>,
    /// hls.js: distance to the live edge of the playlist, and its aim.
    pub latency_s: Option<f64>,
    pub target_s: Option<f64>,
    pub current_time: f64,
    pub paused: bool,
    /// The video element's buffered ranges, "start-end" in seconds.
    pub buffered: String,
    /// hls.js errors since the last sample, after [`RECORD_HLS_ERRORS`].
    pub errors: Vec<String>,
}

pub async fn sample(watch: &mut Page) -> anyhow::Result<Sample> {
    let v = watch.eval(SAMPLE_ON_WATCH_PAGE).await?;
    Ok(serde_json::from_value(v)?)
}

/// Median and 95th percentile (nearest rank) of `values`, None if empty.
pub fn median_p95(values: &[f64]) -> Option<(f64, f64)> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank =
        |p: f64| sorted[((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1];
    Some((rank(0.5), rank(0.95)))
}
